"""Attention kernel backends: splash (Pallas, interpret mode on CPU) and jax.nn.dot_product_attention
against dense attention written from the rules; the compiled memory of the kernel path; config
errors. (Every backend also runs through the crossbatch grid of test_crossbatch.py.)"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_crossbatch import _inputs, kernel_options, reference_attention, reference_mask

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.model import kernels
from fot_jax.model.attention import CrossbatchSpec, crossbatch_attention


def _grads(f, args, cot):
    return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2, 3))(*args)


@pytest.mark.parametrize("backend", ["splash", "xla"])
def test_several_blocks_padding_gqa_doc_mask(backend):
    """T = 200 with 128-token blocks: two query and key blocks, the last one padded; GQA; the
    causal diagonal crosses block edges; r = 3, k = 2, stepping, document mask."""
    B, T, H, Hkv, D, r, k = 4, 200, 4, 2, 16, 3, 2
    args = _inputs(B, T, H, Hkv, D, seed=11)
    rng = np.random.default_rng(0)
    seg = np.cumsum(rng.random((B, T)) < 0.01, axis=1).astype(np.int32) + 10 * (np.arange(B) // k)[:, None]
    for b in range(B):
        if b % k:
            seg[b] += seg[b - 1, -1] - seg[b, 0]
    spec = CrossbatchSpec(range_max=r, k_packing=k, stepping=True, doc_mask=True)
    mine = lambda *a: crossbatch_attention(*a, spec=spec, segment_ids=jnp.asarray(seg),  # noqa: E731
                                           kernel=kernel_options(backend))
    mask = reference_mask(B, T, r, k, True, seg=seg, doc_mask=True)
    ref = lambda *a: reference_attention(*a, mask)  # noqa: E731
    out = mine(*args)
    np.testing.assert_allclose(out, ref(*args), atol=2e-5, rtol=1e-5)
    cot = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    for a, b in zip(_grads(mine, args, cot), _grads(ref, args, cot)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["splash", "xla"])
def test_bfloat16_within_tolerance(backend):
    B, T, H, Hkv, D, r = 4, 64, 4, 4, 32, 1
    args32 = _inputs(B, T, H, Hkv, D, seed=3)
    args16 = [a.astype(jnp.bfloat16) for a in args32]
    spec = CrossbatchSpec(range_max=r, k_packing=2, stepping=True)
    mine = lambda *a: crossbatch_attention(*a, spec=spec, kernel=kernel_options(backend))  # noqa: E731
    ref = lambda *a: reference_attention(*a, reference_mask(B, T, r, 2, True))  # noqa: E731
    out = mine(*args16)
    assert out.dtype == jnp.bfloat16
    # The reference sees the same rounded inputs, in float32.
    ref_args = [a.astype(jnp.float32) for a in args16]
    np.testing.assert_allclose(out.astype(jnp.float32), ref(*ref_args), atol=2e-2, rtol=2e-2)
    # Gradients: within 2e-2 of their scale (bfloat16 outputs feed the backward pass; the
    # reference path itself is 1e-2 off in bfloat16 on these inputs).
    cot = jnp.asarray(np.random.default_rng(4).normal(size=out.shape).astype(np.float32))
    for a, b in zip(_grads(mine, args16, cot), _grads(ref, ref_args, cot)):
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 2e-2 * float(jnp.abs(b).max())


def _compiled(backend, T, r, rows=2, heads=8, head_dim=64, implementation="dense"):
    """Forward + backward of crossbatch attention (every row sees r others), compiled."""
    spec = CrossbatchSpec(range_max=r, k_packing=rows, stepping=False, implementation=implementation)
    shape = jax.ShapeDtypeStruct((rows, T, heads, head_dim), jnp.float32)
    opts = kernels.KernelOptions(backend=backend, block_q=512, block_kv=512, interpret=True)

    def loss(q, k, v):
        return crossbatch_attention(q, k, k, v, spec=spec, kernel=opts).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()


def _score_shaped_float32_buffers(hlo_text, t):
    """float32 shapes with two dimensions of at least T: a [.., T, T] or [.., T, r*T] score matrix."""
    shapes = re.findall(r"f32\[([0-9,]+)\]", hlo_text)
    return sorted({s for s in shapes if sum(int(x) >= t for x in s.split(",")) >= 2})


@pytest.mark.slow
def test_splash_path_holds_no_score_matrix_and_memory_is_linear_in_r():
    """T = 2048: no float32 buffer with two dimensions of T or more anywhere in the compiled forward and
    backward (local, r = 0, and crossbatch, r = 7), and at r = 7 the temporaries are at most a
    quarter of the reference's, growing linearly with r (the rolled keys and values)."""
    T = 2048
    temps = {}
    for r in (0, 1, 3, 7):
        compiled = _compiled("splash", T, r)
        assert _score_shaped_float32_buffers(compiled.as_text(), T) == [], r
        mem = compiled.memory_analysis()
        temps[r] = mem.temp_size_in_bytes + mem.output_size_in_bytes
    # The check sees a score matrix where there is one: the xla backend materialises [B, H, T, (r+1)*T].
    assert _score_shaped_float32_buffers(_compiled("xla", T, 1).as_text(), T) != []
    reference = _compiled("reference", T, 7).memory_analysis()
    reference_bytes = reference.temp_size_in_bytes + reference.output_size_in_bytes
    assert temps[7] <= reference_bytes / 4, (temps, reference_bytes)
    # Linear in r: from r = 3 to 7 each context costs what it costs from 1 to 3, within 10%
    # (r = 0 has no earlier-rows part at all).
    per_context_low = (temps[3] - temps[1]) / 2
    per_context_high = (temps[7] - temps[3]) / 4
    assert 0.9 < per_context_high / per_context_low < 1.1, temps


def test_resolve_auto_per_platform():
    assert kernels.resolve("auto", "tpu") == "splash"
    assert kernels.resolve("auto", "gpu") == "cudnn"
    assert kernels.resolve("auto", "cuda") == "cudnn"
    assert kernels.resolve("auto", "cpu") == "reference"
    assert kernels.resolve("xla", "tpu") == "xla"
    assert kernels.options_from_config(config_lib.base_config().model).backend == "reference"  # this CPU


@pytest.mark.parametrize(
    "override,platform,field,words",
    [
        ("model.attention_backend=flash", "cpu", "model.attention_backend", "not one of"),
        ("model.attention_backend=splash", "gpu", "model.attention_backend", "does not run on gpu"),
        ("model.attention_backend=cudnn", "cpu", "model.attention_backend", "does not run on cpu"),
        ("model.attention_backend=cudnn", "tpu", "model.attention_backend", "auto, reference, xla, splash"),
        ("model.attention_block_q=100", "tpu", "model.attention_block_q", "multiples of 128"),
        (
            "model.attention_block_kv=384",
            "cpu",
            "model.attention_block_kv",
            "does not divide the sequence length 1024",
        ),
        ("model.attention_block_q=0", "tpu", "model.attention_block_q", "must be positive"),
        ("model.head_dim=12", "gpu", "model.head_dim", "multiple of 8"),
    ],
)
def test_bad_backend_settings_are_config_errors(override, platform, field, words):
    cfg = config_lib.base_config()
    cfg.model.max_position_embeddings = 1024
    cfg.data.seq_len = 1024
    cfg.data.doc_length = 2048
    cfg.data.query_length = 256
    if "block" in override:
        cfg.model.attention_backend = "splash"
    if "head_dim" in override:
        cfg.model.attention_backend = "cudnn"
    checks.validate(cfg)  # valid before the override (no platform: nothing platform-bound checked)
    config_lib.apply_overrides(cfg, ["--config." + override])
    with pytest.raises(config_lib.ConfigError) as err:
        checks.validate(cfg, platform)
    assert f"'{field}'" in str(err.value) and words in str(err.value), str(err.value)


def test_mfu_denominator_is_the_chips_published_peak_or_a_measured_matmul():
    from fot_jax.train import metrics
    assert metrics.chip_peak_flops("TPU v5 lite") == 197e12
    assert metrics.chip_peak_flops("TPU v5p") == 459e12
    assert metrics.chip_peak_flops("TPU v4") == 275e12
    assert metrics.chip_peak_flops("NVIDIA H200") == 989e12
    assert metrics.chip_peak_flops("TPU v6 lite") == 918e12
    assert metrics.chip_peak_flops("cpu") is None
    peak, source = metrics.peak_flops()      # this CPU: measured
    assert peak > 0 and "measured" in source
