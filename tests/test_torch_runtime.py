"""The PyTorch LongLLaMA runtime (fot_jax.torch) against fot_jax's own ingest and generation on an
exported tiny model: several windows with memory, dense and top-k, FIFO overflow included."""
import numpy as np
import pytest
from flax import nnx

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import save_params
from fot_jax.convert import api
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama

try:                      # every test here runs fot_jax.torch: each skips, with the reason, without torch
    import torch  # noqa: F401

    from fot_jax.torch import MemoryGenerator, load
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch: pip install 'fot_jax[torch]'")


def _cfg(**model):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 64, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
    m.max_position_embeddings = 16
    m.mem_layers = [1, 2]
    m.init_std = 0.2
    m.last_context_length = 6
    c.data.seq_len = 16
    for k, v in model.items():
        m[k] = v
    return c


CASES = {
    "as_first_dense": (dict(), None, 64),
    "as_first_topk_fifo": (dict(), 5, 32),                      # 75 tokens > capacity 32: FIFO drops
    "none_qknorm_topk_tied": (dict(mem_positionals="none", qk_norm="memory", tie_embeddings=True), 7, 64),
    "as_first_topk_bfloat16_store": (dict(), 5, 64, "bfloat16"),  # selection in the store's precision
    # log-n scaling past a full (FIFO) store; the export records the base, fot_jax.torch reads it
    "qknorm_topk_fifo_logn": (dict(qk_norm="memory"), 5, 32, "float32", 8),
    # Memorizing-Transformer gate: memory-only and local-only attention mixed per head
    "gated_topk": (dict(mem_attention="gated"), 5, 64),
}


@needs_torch
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_runtime_equals_fot_jax_ingest(tmp_path, case):
    overrides, top_k, capacity, *rest = CASES[case]
    store_dtype, logn_base = (list(rest) + ["float32", 0][len(rest):])[:2]
    c = _cfg(**overrides)
    c.memory.logn_base = logn_base
    checks.validate(c)
    model = llama.create(c.model, seed=3)
    save_params(str(tmp_path / "run"), c, nnx.state(model, nnx.Param))
    extensions = c.model.qk_norm != "none" or c.model.mem_attention == "gated"
    api.export_model(str(tmp_path / "run"), str(tmp_path / "hf"), fot_extensions=extensions,
                     log=lambda *_: None)
    tm = load(str(tmp_path / "hf"))
    doc = np.random.default_rng(0).integers(3, 64, 75)  # 4 windows of 16 + a tail of 6
    settings = MemorySettings(
        top_k=top_k or 10_000,
        capacity=capacity,
        dtype=store_dtype,
        last_context_length=6,
        chunk=16,
        search="dense" if top_k is None else "exact",
        logn_base=logn_base,
    )
    _, (expected,) = MemoryRuntime(model, 1, settings).ingest([doc], return_logits=True)
    gen = MemoryGenerator(tm, top_k=top_k, capacity=capacity, mem_dtype=store_dtype)
    got = gen.ingest(doc, return_logits=True).numpy()
    assert got.shape == (75, 64)
    # a bfloat16 store: the same rounding on both sides, float32 sums in different orders
    np.testing.assert_allclose(got, expected[:, :64], atol=1e-4 if store_dtype == "float32" else 1e-3, rtol=0)
    # greedy generation past the window (the cache moves to memory) gives the same tokens
    want = MemoryRuntime(model, 1, settings).generate([doc], 14, stop_token=-1)[0]
    assert gen.generate(doc, 14, eos_token_id=-1) == want.tolist()
