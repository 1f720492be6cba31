"""Scanned layers: consecutive layers of one structure run as one lax.scan over their stacked
parameters. Same logits and gradients as the unrolled stack; the compiled program does not grow
with depth; the parameter layout (and so checkpoints, import and export) is unchanged."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.model import llama
from fot_jax.model.attention import CrossbatchSpec


def _model_config(num_layers, mem_layers, remat="none", **extra):
    c = config_lib.base_config()
    m = c.model
    m.num_layers, m.mem_layers, m.remat = num_layers, mem_layers, remat
    m.num_heads, m.num_kv_heads, m.hidden_size, m.intermediate_size = 4, 2, 32, 64
    m.max_position_embeddings = 16
    for k, v in extra.items():
        m[k] = v
    return m


def test_layer_runs_split_at_memory_layers():
    assert llama.layer_runs(_model_config(6, [0])) == [(0, 1), (1, 6)]
    assert llama.layer_runs(_model_config(6, [2, 3])) == [(0, 2), (2, 4), (4, 6)]
    assert llama.layer_runs(_model_config(5, [4])) == [(0, 4), (4, 5)]
    assert llama.layer_runs(_model_config(3, [])) == [(0, 3)]


@pytest.mark.parametrize("mem_layers,remat,qk_norm,unroll", [
    ([0], "none", "none", 1),            # memory layer first; one layer a loop trip (as on TPU)
    ([3], "full", "memory", 1),          # in the middle, remat inside the scanned body
    ([6], "dots_no_batch", "none", 2),   # last; two layers a trip (a remainder too)
    ([1, 2, 5], "none", "memory", 0),    # two memory layers in a row; this platform's default
])
def test_scanned_equals_unrolled(mem_layers, remat, qk_norm, unroll):
    m_scan = _model_config(7, mem_layers, remat, qk_norm=qk_norm, scan_unroll=unroll)
    m_unrolled = _model_config(7, mem_layers, remat, qk_norm=qk_norm, scan_layers=False)
    scanned, unrolled = llama.create(m_scan, seed=3), llama.create(m_unrolled, seed=3)
    # Same parameters, same layout: scanning changes how the stacked runs execute, not how they are stored.
    gs, ps = nnx.split(scanned)
    gu, pu = nnx.split(unrolled)
    assert jax.tree.structure(ps) == jax.tree.structure(pu)
    rng = np.random.default_rng(0)
    B, T = 4, 16
    tokens = jnp.asarray(rng.integers(0, 64, (B, T)), jnp.int32)
    segments = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.1, axis=1), jnp.int32)
    spec = CrossbatchSpec(range_max=1, k_packing=2, stepping=True, doc_mask=True)

    def loss(graphdef, params):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segments, crossbatch=spec).logits
        return jnp.sum(jax.nn.log_softmax(logits)[..., :64] * jnp.cos(jnp.arange(64)))
    ls, gscan = jax.value_and_grad(loss, argnums=1)(gs, ps)
    lu, gunr = jax.value_and_grad(loss, argnums=1)(gu, pu)
    np.testing.assert_allclose(ls, lu, rtol=1e-6)
    logits_s = scanned(tokens, segment_ids=segments, crossbatch=spec).logits
    logits_u = unrolled(tokens, segment_ids=segments, crossbatch=spec).logits
    np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
    # float32 gradients of two differently fused programs sum in other orders (with jax 0.10.2 up to
    # 3e-5 apart in the embedding's rows, at magnitude 1); tolerances scale with each leaf's largest
    # entry: a wrong gradient is off by far more
    for a, b in zip(jax.tree.leaves(gscan), jax.tree.leaves(gunr)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=1e-4)


def _dot_count(num_layers, scan):
    m = _model_config(num_layers, [1], scan_layers=scan, scan_unroll=1)   # as on TPU / GPU
    graphdef, params = nnx.split(llama.create(m))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    spec = CrossbatchSpec(range_max=1, k_packing=2, stepping=True)

    def loss(params, tokens):
        return nnx.merge(graphdef, params)(tokens, crossbatch=spec).logits.sum()
    text = jax.jit(jax.grad(loss)).lower(params, tokens).as_text()
    return len(re.findall(r"stablehlo\.dot_general", text))


def test_program_does_not_grow_with_depth_when_scanning():
    """The lowered forward + backward holds as many dot_generals (attention and projections) for 12
    layers as for 4 when the layers are scanned; unrolled, it grows with every layer."""
    assert _dot_count(12, True) == _dot_count(4, True)
    assert _dot_count(12, False) > _dot_count(4, False)
