"""Memory evaluations and the generate / eval commands on a tiny trained checkpoint."""
import json
import os

import numpy as np
import pytest

from fot_jax import cli
from fot_jax.checkpoint import CheckpointError, load_model
from fot_jax.evals import memory
from fot_jax.model import llama

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("run"))
    rc = cli.main(["train", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", workdir,
                   "--config.train.steps=6", "--config.train.log_every=3"])
    assert rc == 0
    return workdir


def test_checkpoint_holds_config_and_params(trained):
    cfg, model = load_model(trained)
    assert cfg.name == "tiny" and cfg.train.steps == 6
    fresh = llama.create(cfg.model, seed=123)
    assert not np.allclose(np.asarray(model.embed_tokens[...]), np.asarray(fresh.embed_tokens[...]))
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_model(os.path.join(trained, "missing"))
    with pytest.raises(CheckpointError, match="step 999 not found"):
        load_model(trained, step=999)


def test_memory_scaling_accuracy_is_counted_on_the_query_values(trained):
    """Accuracy is measured on value tokens only: a model that always predicts the right value
    token gets 1.0, and the counting matches the documents' masks."""
    cfg, model = load_model(trained)
    rows = memory.memory_scaling(cfg, model, sizes=[128, 256], num_docs=2, top_k=4, baseline=(cfg, model),
                                 mem_dtype="float32", log=lambda *_: None)
    assert [r["tokens_in_memory"] for r in rows] == [128, 256]
    for r in rows:
        assert 0.0 <= r["fot_accuracy"] <= 1.0 and 0.0 <= r["baseline_accuracy"] <= 1.0
        tokens, mask = memory._doc(cfg, 0, r["tokens_in_memory"], "test", 0)
        assert r["queries"] == 2 * mask.sum() // cfg.data.value_length
    # counting against a perfect predictor built from the query window itself
    tokens, mask = memory._doc(cfg, 1, 256, "test", 0)
    window, wmask = tokens[-cfg.data.query_length:], mask[-cfg.data.query_length:]
    perfect = np.eye(64)[np.concatenate([window[1:], [0]])]
    assert memory._hits(perfect, window, wmask) == (wmask.sum(), wmask.sum())
    wrong = np.eye(64)[np.zeros_like(window)]
    assert memory._hits(wrong, window, wmask)[0] == 0


def test_more_query_windows_read_the_same_memory(trained):
    """Query window j, read after rewinding to the end of the definitions, scores as a fresh
    runtime that reads the definitions and then only window j; each window asks distinct keys
    that the document defines, with their values."""
    cfg, model = load_model(trained)
    q = cfg.data.query_length
    (defs, windows), = memory._documents(cfg, 512, 1, 3, "test", 0, layout="windows")
    keys, values = memory._records(defs, memory.dictionary.KEY)
    defined = {tuple(k): tuple(v) for k, v in zip(keys, values)}
    for tokens, mask in windows[1:]:
        qk, qv = memory._records(tokens, memory.dictionary.QUERY)
        assert len(qk) == (q - 1) // 10 and len({tuple(k) for k in qk}) == len(qk)
        assert all(defined[tuple(k)] == tuple(v) for k, v in zip(qk, qv))
        assert mask.sum() == 4 * len(qk) and tokens[-1] == memory.dictionary.EOS
    row, = memory.memory_scaling(cfg, model, sizes=[512], num_docs=1, top_k=4, mem_dtype="float32",
                                 query_windows=3, log=lambda *_: None)
    settings = memory.MemorySettings(top_k=4, capacity=512, dtype="float32", last_context_length=q)
    hits = total = 0
    for tokens, mask in windows:
        rt = memory.MemoryRuntime(model, 1, settings)
        _, (tail,) = rt.ingest([np.concatenate([defs, tokens])], return_logits="tail")
        h, n = memory._hits(tail, tokens, mask)
        hits, total = hits + h, total + n
    assert row["queries"] == total // 4 and row["fot_accuracy"] == pytest.approx(hits / total, abs=1e-9)


def test_layouts_place_whole_records_and_count_cut_ones():
    """`lay_out` against a record-by-record construction: "stream" puts records back to back after
    bos; "windows" starts a record only where it ends inside the same window. `_cut_values`
    marks exactly the value tokens of questions whose definition straddles a boundary."""
    rng = np.random.default_rng(0)
    keys = rng.integers(6, 64, (100, 4)).astype(np.int32)
    values = rng.integers(6, 64, (100, 4)).astype(np.int32)
    for window in (None, 64, 25):
        defs, n = memory.lay_out(keys, values, 300, window)
        expect, pos, i = [memory.dictionary.BOS], 1, 0
        while i < len(keys):
            if pos + 10 > 300:
                break
            if window and pos // window != (pos + 9) // window:
                expect.append(memory.dictionary.PAD)
                pos += 1
                continue
            expect += [memory.dictionary.KEY, *keys[i], memory.dictionary.VALUE, *values[i]]
            pos, i = pos + 10, i + 1
        expect += [memory.dictionary.PAD] * (300 - len(expect))
        np.testing.assert_array_equal(defs, expect)
        assert n == i
    with pytest.raises(ValueError, match="cannot hold one 10-token record"):
        memory.lay_out(keys, values, 300, 8)
    # questions about records 5 (tokens 51..60) and 6 (61..70: cut by the boundary at 64)
    defs, _ = memory.lay_out(keys, values, 300)
    d = memory.dictionary
    q = np.concatenate([[d.QUERY, *keys[k], d.VALUE, *values[k]] for k in (5, 6)])
    cut = memory._cut_values(memory._cut_keys(defs, 64), q)
    np.testing.assert_array_equal(cut, np.r_[np.zeros(16, bool), np.ones(4, bool)])
    assert not memory._cut_values(memory._cut_keys(memory.lay_out(keys, values, 300, 64)[0], 64), q).any()


def test_stream_layout_reports_cut_questions(trained):
    """With records back to back, the row's share of cut questions is what `_cut_values` counts on
    the same documents, and the whole-record accuracy is the accuracy over the others."""
    cfg, model = load_model(trained)
    row, = memory.memory_scaling(cfg, model, sizes=[512], num_docs=2, top_k=4, mem_dtype="float32",
                                 query_windows=2, layout="stream", log=lambda *_: None)
    docs = memory._documents(cfg, 512, 2, 2, "test", 0, layout="stream")
    cut = sum(memory._cut_values(memory._cut_keys(d, 64), t)[m].sum() for d, win in docs for t, m in win)
    values = sum(m.sum() for _, win in docs for _, m in win)
    assert 0 < cut < values
    assert row["cut_queries"] == pytest.approx(cut / values)
    settings = memory.MemorySettings(top_k=4, capacity=512, dtype="float32", last_context_length=64)
    hits = total = 0
    for defs, win in docs:
        for tokens, mask in win:
            rt = memory.MemoryRuntime(model, 1, settings)
            _, (tail,) = rt.ingest([np.concatenate([defs, tokens])], return_logits="tail")
            h, n = memory._hits(tail, tokens, mask & ~memory._cut_values(memory._cut_keys(defs, 64), tokens))
            hits, total = hits + h, total + n
    assert row["whole_accuracy"] == pytest.approx(hits / total, abs=1e-9)
    windows, = memory.memory_scaling(cfg, model, sizes=[512], num_docs=2, top_k=4, mem_dtype="float32",
                                     log=lambda *_: None)
    assert "cut_queries" not in windows
    with pytest.raises(ValueError, match="layout must be one of"):
        memory.memory_scaling(cfg, model, sizes=[512], num_docs=1, layout="rows", log=lambda *_: None)


def test_generated_answers_on_own_documents(trained):
    """Documents built outside the training builder (unique keys, the documented layout), and
    greedy answers through rewind equal a fresh runtime per question (definitions read, committed
    to memory, then the question)."""
    cfg, model = load_model(trained)
    (defs, keys, values), = memory.own_documents(300, 1, 3, seed=5, window=64)
    assert defs[0] == memory.dictionary.BOS and defs.size == 300
    k_all, v_all = memory._records(defs, memory.dictionary.KEY)
    # windows of 64 hold 6 whole records (the first: bos and 6), the last 44 tokens 4
    assert len(k_all) == 4 * 6 + 4 and len({tuple(k) for k in k_all}) == len(k_all)
    assert {tuple(k) for k in keys} <= {tuple(k) for k in k_all}
    settings = memory.MemorySettings(top_k=4, capacity=512, dtype="float32", last_context_length=64)
    assert cfg.model.max_position_embeddings == 64
    got = memory.generation_accuracy(cfg, model, 300, 1, 3, settings, seed=5)
    right = answers = 0
    for k, v in zip(keys, values):
        rt = memory.MemoryRuntime(model, 1, settings)
        rt.ingest([defs])
        rt.commit()
        assert rt.cache_len[0] == 0
        out = rt.generate([np.concatenate([[5], k, [4]])], 4, stop_token=-1, continue_documents=True)[0]
        right, answers = right + int((out == v).sum()), answers + int((out == v).all())
    assert got == {"generate_accuracy": right / 12, "generate_answers": answers / 3}


def test_distraction_mass_is_a_share_that_falls_with_distractors(trained):
    cfg, model = load_model(trained)
    rows = memory.distraction(cfg, model, ds=(1, 2, 8), num_docs=2)
    assert rows[0]["positive_share"] == pytest.approx(1.0)
    for r in rows:
        assert 0.0 < r["positive_mass"] <= r["positive_share"] <= 1.0 + 1e-9
    assert rows[2]["positive_share"] < rows[0]["positive_share"]


def test_eval_and_generate_commands(trained, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert (
        cli.main(
            [
                "eval",
                "--workdir",
                trained,
                "--sizes",
                "128,256",
                "--num-docs",
                "1",
                "--out",
                out,
                "--memory-shards",
                "8",
                "--query-windows",
                "2",
                "--generate",
                "--config.memory.top_k=4",
            ]
        )
        == 0
    )
    assert os.path.exists(os.path.join(out, "memory_scaling.png"))
    rows = json.load(open(os.path.join(out, "memory_scaling.json")))
    assert len(rows) == 2 and all(r["queries"] == 2 * 6 for r in rows)   # 2 windows of 64 tokens: 6 each
    for r in rows:
        assert 0 <= r["generate_accuracy"] <= 1 and r["store_gib"] > 0 and r["peak_rss_gib"] > 0
    memory.plot_scaling(rows, os.path.join(out, "two.png"), more=[("again", rows[:1])])
    assert os.path.getsize(os.path.join(out, "two.png")) > 0
    assert "windows layout" in open(os.path.join(out, "memory_scaling.md")).read()
    assert cli.main(["eval", "--workdir", trained, "--sizes", "128", "--query-windows", "0"]) == 2
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", trained, "--sizes", str(2 ** 40), "--out", out]) == 2
    assert "do not fit this host" in capsys.readouterr().err
    assert (
        cli.main(["eval", "--workdir", trained, "--task", "distraction", "--num-docs", "1", "--out", out])
        == 0
    )
    assert os.path.exists(os.path.join(out, "distraction.png"))
    capsys.readouterr()
    doc = " ".join(str(t) for t in np.arange(150) % 50 + 6)   # longer than the window: memory is used
    assert cli.main(["generate", "--workdir", trained, "--tokens", doc, "--tokens", "1 3 7",
                     "--max-new-tokens", "5", "--config.memory.capacity=256"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [l["prompt_tokens"] for l in lines] == [150, 3]
    assert all(1 <= len(l["generated"]) <= 5 for l in lines)
    assert cli.main(["generate", "--workdir", trained, "--tokens", "1 2", "--config.memory.top_k=0"]) == 2
    assert "memory.top_k" in capsys.readouterr().err


def test_every_kind_of_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    """Config, data, checkpoint (missing, corrupt), memory store, tokenizer and import mistakes
    through the command line: each prints one line naming the problem on stderr, exits 2, and
    leaves nothing half-written."""
    import glob
    import shutil

    from fot_jax.data import text
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(trained, corrupt)
    for path in glob.glob(os.path.join(corrupt, "checkpoints", "*", "config", "metadata")):
        with open(path, "w") as f:
            f.write("not json")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n{"text": "cut short\n')
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{")
    (tmp_path / "bad.gguf").write_text("garbage")
    cases = [
        (["train", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", str(tmp_path / "r1"),
          "--config.model.no_such_field=1"], "config error: unknown config field 'model.no_such_field'"),
        (["train", "--config", os.path.join(CONFIGS, "stdlib_code.py"), "--workdir", str(tmp_path / "r2"),
          "--config.data.task=jsonl", f"--config.data.source={corpus}",
          f"--config.data.data_dir={tmp_path / 'tfds'}"], "corpus.jsonl:2: not a JSON object"),
        (["generate", "--workdir", str(tmp_path / "none"), "--tokens", "1 2"], "no checkpoints in"),
        (["generate", "--workdir", corrupt, "--tokens", "1 2"], "cannot be restored"),
        (["generate", "--workdir", trained, "--tokens", "1 2", "--config.memory.capacity=99999999999"],
         "do not fit this host"),
        (["generate", "--workdir", trained, "--tokens", "1 999"], "token ids outside [0, 64)"),
        (["generate", "--workdir", trained, "--tokens", "1 x"], "integers separated by spaces"),
        (["generate", "--workdir", trained], "give a prompt"),
        (["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing.model"), "--text", "hi"],
         "does not exist"),
        (["tokenizer", "decode", "--tokenizer", text.builtin_tokenizer_path("open_llama_v2"),
          "--text", "1 y"], "integers separated by spaces"),
        (["import", str(tmp_path / "hf"), "--out", str(tmp_path / "i1")], "config.json: not valid JSON"),
        (["import", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "i2")], "not a readable GGUF"),
        (["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "i3")], "neither an HF model"),
        (["export", "--workdir", trained, "--out", str(tmp_path / "e1"), "--config.memory.top_k=2"],
         "overrides do not apply"),
        (["eval", "--workdir", trained, "--baseline", str(tmp_path / "none")], "--baseline"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fot-jax {argv[0]}: ") and message in err[0], (argv, err)
    for name in ("r1", "i1", "i2", "i3", "e1"):
        assert not os.path.exists(tmp_path / name), name
