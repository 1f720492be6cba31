"""The lm-evaluation-harness model and the few-shot evaluation: log-likelihoods against a direct
NumPy computation on the model's logits, greedy generation against the runtime, an offline local
task end to end through `lm_eval.simple_evaluate`, the few-shot packer, and the bad-input errors."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from fot_jax import checks, cli
from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.data.text import builtin_tokenizer_path
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.evals import few_shot
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'fot_jax[eval]'")
from fot_jax.evals import harness  # noqa: E402

W, TAIL = 16, 8


def _setup():
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 32000, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads = 2, 2, 2
    m.max_position_embeddings, m.last_context_length, m.mem_layers = W, TAIL, [1]
    m.mem_dtype, m.init_std = "float32", 0.5
    c.data.seq_len, c.data.doc_length, c.data.query_length = 16, 64, 16
    c.memory.capacity, c.memory.search = 256, "dense"
    checks.validate(c)
    return c, llama.create(c.model, seed=1), load_tokenizer(builtin_tokenizer_path("open_llama_v2"))


class _Req:
    def __init__(self, *args):
        self.args = args


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loglikelihood_equals_direct_computation_short_and_long_contexts():
    c, model, tok = _setup()
    lm = harness.FotJaxLM(model=model, cfg=c, tokenizer=tok, batch_size=2)
    short = ("The cat", " sat")                                             # within the window
    long = (" ".join(["one two three four five"] * 8), " six seven")    # ~40 tokens: through memory
    got = lm.loglikelihood([_Req(*short), _Req(*long)])
    # short: the plain model's forward over the same tokens, NumPy log-softmax
    ctx, cont = lm._encode_pair(*short)
    logits = np.asarray(model(np.asarray([ctx + cont], np.int32)).logits)[0, :, :32000]
    lp = _log_softmax(logits[len(ctx) - 1: -1])[np.arange(len(cont)), cont]
    np.testing.assert_allclose(got[0][0], lp.sum(), rtol=1e-5, atol=1e-5)
    assert got[0][1] == bool((logits[len(ctx) - 1: -1].argmax(-1) == cont).all())
    # long: every token's logits as the runtime reads the document (windows to memory), NumPy sum
    ctx, cont = lm._encode_pair(*long)
    assert len(ctx) > 2 * W
    seq = ctx + cont
    _, (all_logits,) = MemoryRuntime(model, 1, MemorySettings.from_config(c)).ingest(
        [np.asarray(seq[:-1], np.int32)], return_logits=True)
    lp = _log_softmax(all_logits[len(ctx) - 1:, :32000])[np.arange(len(cont)), cont]
    np.testing.assert_allclose(got[1][0], lp.sum(), rtol=1e-5, atol=1e-5)
    # rolling: the whole text after bos
    (rolled,) = lm.loglikelihood_rolling([_Req(long[0])])
    ids = tok.encode(long[0], bos=True)
    _, (lg,) = MemoryRuntime(model, 1, MemorySettings.from_config(c)).ingest(
        [np.asarray(ids[:-1], np.int32)], return_logits=True)
    want = _log_softmax(lg[:, :32000])[np.arange(len(ids) - 1), ids[1:]].sum()
    np.testing.assert_allclose(rolled, want, rtol=1e-5, atol=1e-5)


def test_generate_until_stops_at_the_stop_sequence_and_equals_the_runtime():
    c, model, tok = _setup()
    lm = harness.FotJaxLM(model=model, cfg=c, tokenizer=tok)
    context = " ".join(["alpha beta gamma"] * 6)
    ids = tok.encode(context, bos=True)
    rt = MemoryRuntime(model, 1, MemorySettings.from_config(c))
    gen = rt.generate([ids], 12, stop_token=c.model.eos_token_id)
    text = tok.decode([t for t in gen[0].tolist() if t != c.model.eos_token_id])
    (full,) = lm.generate_until([_Req(context, {"until": [], "max_gen_toks": 12})])
    assert full == text
    stop = text.strip()[2:5]                      # a piece of what the model generates
    assert stop and stop in text
    (cut,) = lm.generate_until([_Req(context, {"until": [stop], "max_gen_toks": 12})])
    assert cut == text[: text.find(stop)] and stop not in cut


def _workdir(tmp_path):
    c, model, tok = _setup()
    wd = str(tmp_path / "run")
    save_params(wd, c, nnx.state(model, nnx.Param))
    os.makedirs(os.path.join(wd, "tokenizer"))
    with open(tok.path, "rb") as r, open(os.path.join(wd, "tokenizer", "tokenizer.model"), "wb") as w:
        w.write(r.read())
    return wd


@pytest.mark.slow
def test_local_task_runs_end_to_end_through_simple_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    wd = _workdir(tmp_path)
    table = harness.run(wd, ["word_categories_mc", "word_categories_gen"], str(tmp_path / "eval"), limit=6,
                        num_fewshot=2, model_args={"batch_size": 4})
    assert "word_categories_mc" in table and "acc" in table and "exact_match" in table
    res = json.load(open(tmp_path / "eval" / "harness_word_categories_mc_word_categories_gen.json"))
    acc = res["results"]["word_categories_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_few_shot_packer_fills_each_size_and_never_shows_the_test_example(tmp_path):
    _, _, tok = _setup()
    examples, labels = few_shot.load_examples(os.path.join(harness.TASK_DIR, "word_categories.jsonl"))
    assert labels == ["animal", "color", "country", "fruit", "tool", "vehicle"] and len(examples) == 150
    longest = max(len(few_shot.label_ids(tok, e["label"])) for e in examples)
    assert few_shot.label_ids(tok, "animal") == tok.encode("Label: animal")[-1:]   # no lone space piece
    order = np.random.default_rng(0).permutation(len(examples))
    prev = 0
    for size in (64, 128, 512, 1024):
        for test in (0, 7, int(order[0])):
            ids, n = few_shot.pack(tok, examples, test, size, order)
            assert len(ids) + longest <= size
            text = tok.decode(ids)
            assert text.endswith(few_shot.QUESTION.format(input=examples[test]["input"]))
            shown = [i for i in order if i != test][:n]
            assert test not in shown and text.count("Input: ") == n + 1
            # one more demonstration would not have fitted
            nxt = [i for i in order if i != test][n]
            more = tok.encode("".join(few_shot.DEMO.format(**examples[i]) for i in shown + [nxt])
                              + few_shot.QUESTION.format(input=examples[test]["input"]), bos=True)
            assert len(more) + longest > size
        assert n > prev
        prev = n
    with pytest.raises(few_shot.FewShotError, match="smaller than one demonstration"):
        few_shot.pack(tok, examples, 0, 12, order)


def test_few_shot_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    with pytest.raises(few_shot.FewShotError, match="'input' and 'label'"):
        few_shot.load_examples(str(bad))
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"input": f"w{i}", "label": "a"}) + "\n" for i in range(5)))
    with pytest.raises(few_shot.FewShotError, match="two distinct labels"):
        few_shot.load_examples(str(one))
    with pytest.raises(few_shot.FewShotError, match="no such file"):
        few_shot.load_examples(str(tmp_path / "missing.jsonl"))


def test_few_shot_evaluate_runs_both_modes():
    c, model, tok = _setup()
    examples, labels = few_shot.load_examples(os.path.join(harness.TASK_DIR, "word_categories.jsonl"))
    for mode in ("classify", "generate"):
        rows = few_shot.evaluate(model, c, tok, MemorySettings.from_config(c), examples, labels, [32, 64],
                                 num_tests=3, mode=mode, batch_size=3, log=lambda *_: None)
        assert [r["context"] for r in rows] == [32, 64]
        assert rows[1]["demonstrations"] > rows[0]["demonstrations"]
        assert all(0 <= r["accuracy"] <= 1 and 0 <= r["baseline_accuracy"] <= 1 for r in rows)


def test_cli_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    wd = _workdir(tmp_path)
    hub = tmp_path / "tasks"
    hub.mkdir()
    (hub / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: someone/some_dataset\noutput_type: multiple_choice\n"
        "doc_to_text: x\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    cases = [
        (["--task", "harness", "--tasks", "hub_task", "--include", str(hub)], "needs a download"),
        (["--task", "harness", "--tasks", "no_such_task"], "unknown harness task"),
        (["--task", "few_shot", "--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--task", "few_shot", "--data", os.path.join(harness.TASK_DIR, "word_categories.jsonl"),
          "--contexts", "8"], "smaller than one demonstration"),
    ]
    for args, message in cases:
        assert cli.main(["eval", "--workdir", wd, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_next_token_logprobs_equal_one_token_loglikelihoods():
    """The one-read shortcut for one-token labels scores what the general path scores."""
    from fot_jax.evals.scoring import Scorer
    c, model, tok = _setup()
    scorer = Scorer(model, MemorySettings.from_config(c), batch_size=2)
    contexts = [tok.encode("Input: dog\nLabel:", bos=True),
                tok.encode(" ".join(["one two three"] * 12), bos=True)]
    assert len(contexts[1]) > 2 * W
    lp = scorer.next_token_logprobs(contexts)
    for i, ctx in enumerate(contexts):
        for t in (5, 6848, 31999):
            (ll, _), = scorer.loglikelihoods([ctx + [t]], [len(ctx)])
            np.testing.assert_allclose(lp[i, t], ll, rtol=1e-5, atol=1e-5)


def _word_tokenizer(path, words):
    """A word-level tokenizer.json (with bos / eos) that both fot_jax and transformers load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(sorted(set(words)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              open(os.path.join(path, "tokenizer_config.json"), "w"))
    return len(vocab)


@pytest.mark.slow
def test_ruler_tasks_run_offline_per_length(tmp_path, monkeypatch):
    """RULER's synthetic tasks through the harness with no network: nltk's sentence model comes
    from offline_nltk (a download or any connection fails the test), prompts are sized by the
    given tokenizer, one evaluation per length, a table with the mean; essay-haystack tasks are
    refused."""
    import socket

    import nltk

    def no_network(*a, **k):
        raise AssertionError("RULER tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(nltk, "download", no_network)
    words = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
             "What is the special magic number for mentioned in the provided text? One of the numbers "
             "VAR = Memorize and track chain(s) of variable assignment hidden in following Question: "
             "Find all variables that are assigned value above. Answer: According to variables").split()
    padding = [f"w{i}" for i in range(20)]                 # the model config wants 64+ ids
    vocab = _word_tokenizer(str(tmp_path / "tok"), words + [str(d) for d in range(10)] + padding)
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = vocab, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads = 2, 2, 2
    m.max_position_embeddings, m.last_context_length, m.mem_layers = 256, 128, [1]
    c.data.seq_len, c.data.doc_length, c.data.query_length = 256, 512, 256
    c.memory.capacity = 8192
    checks.validate(c)
    tok = load_tokenizer(str(tmp_path / "tok"))
    lm = harness.FotJaxLM(model=llama.create(m, seed=1), cfg=c, tokenizer=tok, max_gen_toks=8)
    table = harness.run(None, ["niah_single_1", "ruler_vt"], str(tmp_path / "out"), limit=2, lm=lm,
                        lengths=[4096], tokenizer_dir=str(tmp_path / "tok"))
    assert "| niah_single_1 |" in table and "| ruler_vt |" in table and "| mean |" in table
    saved = json.load(open(tmp_path / "out" / "harness_niah_single_1_ruler_vt.json"))
    assert set(saved["ruler"]) == {"niah_single_1", "ruler_vt"}
    assert all(0 <= v <= 1 for r in saved["ruler"].values() for v in r.values())
    kept = tmp_path / "out" / "harness_niah_single_1_ruler_vt_samples.jsonl"
    rows = [json.loads(line) for line in open(kept)]
    pairs = sorted((r["task"], r["length"]) for r in rows)
    assert pairs == [("niah_single_1", 4096)] * 2 + [("ruler_vt", 4096)] * 2
    for t in ("niah_single_1", "ruler_vt"):            # the kept answers carry the scores the table shows
        mine = [r for r in rows if r["task"] == t]
        assert all(r["target"] and isinstance(r["response"][0], str) and r["prompt_tail"] for r in mine)
        assert all(list(r["scores"]) == ["4096"] for r in mine)

        assert np.mean([r["scores"]["4096"] for r in mine]) == pytest.approx(saved["ruler"][t]["4096"])
    with pytest.raises(harness.HarnessError, match="niah_single_2.*download"):
        harness.run(None, ["niah_single_2"], str(tmp_path / "out2"), lm=lm, lengths=[4096],
                    tokenizer_dir=str(tmp_path / "tok"))


def test_kept_samples_say_whether_a_wrong_answer_was_copied_from_the_prompt():
    prompt = "filler " * 200 + "The code of amber-basin is: 4821733. The code of cedar-delta is: 1234567.\nQ?"
    logged = [{"doc_id": i, "target": ["4821733"], "arguments": [(prompt, {})], "filtered_resps": [resp],
               "metrics": ["4096"], "4096": score}
              for i, (resp, score) in enumerate([(": 1234567.", 0.0), (" 4821733.", 1.0), (" 9999999", 0.0),
                                                 (" .", 0.0)])]
    rows = harness.sample_rows({"samples": {"niah_multikey_2": logged}}, 4096, prompt_tail=50)
    assert [r["answer_in_prompt"] for r in rows] == [True, True, False, None]
    assert [r["scores"] for r in rows] == [{"4096": 0.0}, {"4096": 1.0}, {"4096": 0.0}, {"4096": 0.0}]
    assert all(r["prompt_tail"] == prompt[-50:] and r["length"] == 4096 for r in rows)
