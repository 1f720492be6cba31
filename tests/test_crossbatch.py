"""Crossbatch attention against a reference written straight from the rules in docs/architecture.md."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fot_jax.model.attention import CrossbatchSpec, crossbatch_attention
from fot_jax.model.kernels import KernelOptions

# (backend, reference-path variant): the reference's two tilings and every kernel backend that
# runs on CPU (splash in Pallas interpret mode; cudnn needs a GPU).
PATHS = [("reference", "dense"), ("reference", "blockwise"), ("xla", "dense"), ("splash", "dense")]
PATH_IDS = ["dense", "blockwise", "xla", "splash"]


def kernel_options(backend, block=128):
    return KernelOptions(backend=backend, block_q=block, block_kv=block, interpret=True)


def design_visible(row, r, k, stepping):
    """docs/architecture.md: with stepping (and k > 1), row i sees min((i mod k)*s + 1, r + 1,
    i + 1) contexts, s = ceil((r+1)/max(k-1,1)); without, or with k = 1, min(r + 1, i + 1)."""
    if stepping and k > 1:
        s = math.ceil((r + 1) / max(k - 1, 1))
        return min((row % k) * s + 1, r + 1, row + 1)
    return min(r + 1, row + 1)


def reference_mask(B, T, r, k, stepping, seg=None, doc_mask=False):
    """[B*T, B*T] bool: query (b, t) sees key (b', t')? Built element by element from the rules."""
    mask = np.zeros((B, T, B, T), bool)
    for b in range(B):
        n = design_visible(b, r, k, stepping)
        for c in range(n):
            src = b - c
            for t in range(T):
                for t2 in range(T):
                    if c == 0 and t2 > t:
                        continue  # own context: causal
                    if doc_mask and src // k == b // k and seg[src, t2] != seg[b, t]:
                        continue  # same stream, other document
                    mask[b, t, src, t2] = True
    return mask.reshape(B * T, B * T)


def reference_attention(q, k_own, k_other, v, mask):
    """Dense attention over all B*T keys of the batch: a row's own keys are k_own, the keys
    of other rows k_other; one softmax over everything visible."""
    B, T, H, D = q.shape
    G = H // k_own.shape[2]
    kk_own = jnp.repeat(k_own, G, axis=2).reshape(B * T, H, D)
    kk_other = jnp.repeat(k_other, G, axis=2).reshape(B * T, H, D)
    vv = jnp.repeat(v, G, axis=2).reshape(B * T, H, D)
    qq = q.reshape(B * T, H, D)
    s_own = jnp.einsum("qhd,khd->hqk", qq, kk_own)
    s_other = jnp.einsum("qhd,khd->hqk", qq, kk_other)
    rows = np.repeat(np.arange(B), T)
    same_row = rows[:, None] == rows[None, :]
    s = jnp.where(same_row, s_own, s_other)
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("hqk,khd->qhd", p, vv).reshape(B, T, H, D)


def _inputs(B, T, H, Hkv, D, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s).astype(np.float32))
            for s in [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hkv, D)]]


GRID = [
    # B, T, r, k, stepping, Hkv
    (4, 5, 0, 1, False, 2),
    (4, 5, 1, 2, True, 2),
    (6, 4, 2, 2, True, 1),
    (6, 4, 2, 3, True, 2),
    (6, 4, 3, 2, False, 4),
    (8, 3, 5, 4, True, 2),
    (8, 3, 7, 1, False, 1),
    (6, 4, 3, 3, False, 2),
    (8, 3, 3, 1, True, 2),      # k = 1: stepping does not apply, every row sees the full range
    (8, 4, 3, 4, True, 4),      # LongLLaMA's k = 4, r = 3
]


@pytest.mark.parametrize("B,T,r,k,stepping,Hkv", GRID)
@pytest.mark.parametrize("backend,implementation", PATHS, ids=PATH_IDS)
def test_crossbatch_matches_reference(B, T, r, k, stepping, Hkv, backend, implementation):
    H, D = 4, 8
    q, k_own, k_other, v = _inputs(B, T, H, Hkv, D, seed=B * 100 + r)
    spec = CrossbatchSpec(range_max=r, k_packing=k, stepping=stepping, implementation=implementation)
    mask = reference_mask(B, T, r, k, stepping)

    def mine(*a):
        return crossbatch_attention(*a, spec=spec, kernel=kernel_options(backend))

    def ref(*a):
        return reference_attention(*a, mask)

    out = mine(q, k_own, k_other, v)
    np.testing.assert_allclose(out, ref(q, k_own, k_other, v), atol=2e-5, rtol=1e-5)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=out.shape).astype(np.float32))
    g_mine = jax.grad(lambda *a: jnp.sum(mine(*a) * cot), argnums=(0, 1, 2, 3))(q, k_own, k_other, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2, 3))(q, k_own, k_other, v)
    for a, b in zip(g_mine, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    # Gradients reach the keys/values of every visible earlier row (no stop-gradient).
    if r > 0 and max(design_visible(b, r, k, stepping) for b in range(B)) > 1:
        assert float(jnp.abs(g_mine[2]).sum()) > 0


def test_visible_context_count_matches_design():
    from fot_jax.model.attention import visible_context_count
    for r, k, stepping in itertools.product(range(0, 9), range(1, 5), [True, False]):
        got = np.asarray(visible_context_count(16, r, k, stepping))
        assert got.tolist() == [design_visible(row, r, k, stepping) for row in range(16)]


def test_k1_stepping_gives_every_row_the_full_range():
    """LongLLaMA's cross_batch: `if dataset_packing == 1 or not cross_batch_stepping` every row
    gets the whole range; k = 1 with stepping must not silently train r = 0."""
    from fot_jax.model.attention import visible_context_count
    assert [design_visible(i, 3, 1, True) for i in range(6)] == [1, 2, 3, 4, 4, 4]
    np.testing.assert_array_equal(visible_context_count(6, 3, 1, True), [1, 2, 3, 4, 4, 4])
    np.testing.assert_array_equal(visible_context_count(6, 3, 1, True), visible_context_count(6, 3, 1, False))


@pytest.mark.parametrize("backend,implementation", PATHS, ids=PATH_IDS)
def test_doc_mask_matches_reference(backend, implementation):
    B, T, H, Hkv, D, r, k = 6, 6, 4, 2, 8, 3, 2
    q, k_own, k_other, v = _inputs(B, T, H, Hkv, D, seed=5)
    rng = np.random.default_rng(3)
    seg = np.cumsum(rng.random((B, T)) < 0.3, axis=1).astype(np.int32) + 10 * (np.arange(B) // k)[:, None]
    # Chunks of one stream continue the same documents: row 2s+1 starts with row 2s's last doc.
    for b in range(B):
        if b % k:
            seg[b] += seg[b - 1, -1] - seg[b, 0]
    spec = CrossbatchSpec(range_max=r, k_packing=k, stepping=False, doc_mask=True,
                          implementation=implementation)
    mine = lambda *a: crossbatch_attention(*a, spec=spec, segment_ids=jnp.asarray(seg),  # noqa: E731
                                           kernel=kernel_options(backend))
    mask = reference_mask(B, T, r, k, False, seg=seg, doc_mask=True)
    ref = lambda *a: reference_attention(*a, mask)  # noqa: E731
    out = mine(q, k_own, k_other, v)
    np.testing.assert_allclose(out, ref(q, k_own, k_other, v), atol=2e-5)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=out.shape).astype(np.float32))
    g_mine = jax.grad(lambda *a: jnp.sum(mine(*a) * cot), argnums=(0, 1, 2, 3))(q, k_own, k_other, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2, 3))(q, k_own, k_other, v)
    for a, b in zip(g_mine, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_range_zero_is_causal_attention():
    B, T, H, D = 3, 7, 2, 4
    q, k_own, k_other, v = _inputs(B, T, H, H, D, seed=9)
    out = crossbatch_attention(q, k_own, k_other, v, spec=CrossbatchSpec(range_max=0))
    qn, kn, vn = map(np.asarray, (q, k_own, v))
    s = np.einsum("bqhd,bkhd->bhqk", qn, kn)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", p, vn), atol=1e-5)


def test_dynamic_range_below_static_max():
    """A traced r below range_max (per-step sampling) equals the computation compiled for r."""
    B, T, H, D = 8, 4, 2, 4
    q, k_own, k_other, v = _inputs(B, T, H, H, D, seed=2)
    f = jax.jit(
        lambda r: crossbatch_attention(
            q, k_own, k_other, v, spec=CrossbatchSpec(range_max=5, k_packing=2, stepping=True), r=r
        )
    )
    for r in [0, 1, 3, 5]:
        mask = reference_mask(B, T, r, 2, True)
        np.testing.assert_allclose(
            f(jnp.int32(r)), reference_attention(q, k_own, k_other, v, mask), atol=2e-5
        )


@pytest.mark.parametrize("backend,implementation", PATHS, ids=PATH_IDS)
def test_sharded_equals_unsharded(backend, implementation):
    """Batch sharded over 8 devices: same values and gradients, and rows arrive by collective
    permute (the kernel backends run under shard_map over the mesh's batch axes)."""
    from fot_jax.parallel import mesh as mesh_lib
    devices = jax.devices()
    assert len(devices) == 8
    B, T, H, Hkv, D = 16, 8, 4, 2, 8
    q, k_own, k_other, v = _inputs(B, T, H, Hkv, D, seed=4)
    spec = CrossbatchSpec(range_max=3, k_packing=2, stepping=True, implementation=implementation)
    f = lambda *a: crossbatch_attention(*a, spec=spec, kernel=kernel_options(backend))  # noqa: E731
    loss = lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    expected, g_expected = f(q, k_own, k_other, v), jax.grad(loss, argnums=(0, 1, 2, 3))(q, k_own, k_other, v)
    mesh = jax.make_mesh((8, 1, 1), mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sh = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, sh) for a in (q, k_own, k_other, v)]
    with mesh_lib.use_mesh(mesh):
        jf = jax.jit(f, in_shardings=sh, out_shardings=sh)
        out = jf(*args)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), in_shardings=sh, out_shardings=sh)(*args)
        hlo = jf.lower(*args).compile().as_text()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    for a, b in zip(grads, g_expected):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)   # float32 sums in another order
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo
