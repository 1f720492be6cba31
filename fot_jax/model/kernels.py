"""Attention kernels behind one entry point: the causal local part and the crossbatch part of a
memory layer, computed without a `[T, T]` (or `[T, r*T]`) score matrix in memory.

Backends (`model.attention_backend`; `resolve` turns `auto` into one of them):
- `reference`: the tiled XLA path of `fot_jax.model.attention` (the oracle, and the CPU default).
- `splash`: Pallas TPU splash attention. The own row is one kernel call (causal mask, document
  segment ids); the keys of the `r` earlier rows are one more call (full mask, segment ids that
  encode which rows and documents are visible), two when the document mask splits them into rows
  of the same stream and rows of other streams. Each call returns its log-sum-exp and the parts
  merge exactly into one softmax over `(r+1)*T` keys. The backward pass runs splash's own
  backward kernels once per part with the *merged* output and log-sum-exp, which is exactly the
  gradient of the one softmax (`P = exp(S - lse)`, `D = rowsum(dO * O)` are global quantities).
  Runs on TPU, and on CPU in Pallas interpret mode (what the tests run).
- `cudnn` / `xla`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, plain XLA
  anywhere): causal without a mask array when no document mask applies; otherwise one call over
  `[own keys; earlier rows' keys]` with a boolean mask `[B, 1, T, (r+1)*T]`.

Segment ids given to the kernels are never negative: real documents are shifted by
`_DOC_OFFSET`; smaller values are sentinels that only match what they are meant to match.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from fot_jax import config as config_lib
from fot_jax.parallel import mesh as mesh_lib

BACKENDS = ("auto", "reference", "xla", "splash", "cudnn")
# What runs where: splash is a TPU kernel (interpreted on CPU), cudnn needs an NVIDIA GPU.
PLATFORM_BACKENDS = {
    "cpu": ("reference", "xla", "splash"),
    "tpu": ("reference", "xla", "splash"),
    "gpu": ("reference", "xla", "cudnn"),
}
AUTO_BACKEND = {"cpu": "reference", "tpu": "splash", "gpu": "cudnn"}
CUDNN_MAX_HEAD_DIM = 256
TPU_LANES = 128

# Kernel segment-id sentinels (documents are shifted above them).
_Q_PAD, _KV_PAD, _KV_HIDDEN, _ALL = 3, 2, 0, 1
_DOC_OFFSET = 4


def platform_of(platform: str | None = None) -> str:
    p = platform or jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def resolve(name: str, platform: str | None = None) -> str:
    """`auto` -> the platform's kernel; any other name unchanged."""
    return AUTO_BACKEND.get(platform_of(platform), "reference") if name == "auto" else name


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How attention is computed (never what it computes). `backend` is resolved (not `auto`)."""
    backend: str = "reference"
    block_q: int = 512
    block_kv: int = 512
    interpret: bool = False     # Pallas interpret mode (splash off TPU)

    @property
    def is_kernel(self) -> bool:
        return self.backend != "reference"


def options(name: str, block_q: int, block_kv: int, platform: str | None = None) -> KernelOptions:
    """The options of backend `name` (`auto` resolved for `platform`, default: the running one)."""
    backend = resolve(name, platform)
    return KernelOptions(backend=backend, block_q=int(block_q), block_kv=int(block_kv),
                         interpret=backend == "splash" and platform_of(platform) != "tpu")


def options_from_config(m, platform: str | None = None) -> KernelOptions:
    return options(m.attention_backend, m.attention_block_q, m.attention_block_kv, platform)


# -- masks of a crossbatch step, as kernel segment ids ------------------------------------------

def _parts(q, k_own, k_other, v, *, range_max, k_packing, doc, visible, segment_ids):
    """The key sets a row attends to, each `(keys, values, q_seg [B,T], kv_seg [B,S], causal)`.
    Own row: causal (and same document). Earlier rows `b-1..b-r` (keys concatenated along the
    sequence): visible rows only; with the document mask, rows of the same stream show only the
    query's document (its own part), rows of other streams show everything (another part)."""
    b, t = q.shape[:2]
    if doc:
        seg = segment_ids.astype(jnp.int32) + _DOC_OFFSET
    else:
        seg = jnp.full((b, t), _ALL, jnp.int32)
    parts = [(k_own, v, seg, seg, True)]
    if range_max == 0:
        return parts
    cs = range(1, range_max + 1)
    k_ctx = jnp.concatenate([jnp.roll(k_other, c, axis=0) for c in cs], axis=1)   # [B, r*T, Hkv, D]
    v_ctx = jnp.concatenate([jnp.roll(v, c, axis=0) for c in cs], axis=1)
    rows = jnp.arange(b)
    shown = jnp.stack([visible > c for c in cs], 1)                              # [B, r]
    same_stream = jnp.stack([rows // k_packing == (rows - c) // k_packing for c in cs], 1)

    def per_key(x):                                                              # [B, r] -> [B, r*T]
        return jnp.repeat(x, t, axis=1)

    everything = jnp.full((b, t), _ALL, jnp.int32)
    if doc and k_packing > 1:
        seg_ctx = jnp.concatenate([jnp.roll(seg, c, axis=0) for c in cs], axis=1)
        parts.append((k_ctx, v_ctx, seg, jnp.where(per_key(shown & same_stream), seg_ctx, _KV_HIDDEN), False))
        other = shown & ~same_stream
    else:   # no document mask, or k = 1 (an earlier row is always another stream)
        other = shown
    parts.append((k_ctx, v_ctx, everything, jnp.where(per_key(other), _ALL, _KV_HIDDEN), False))
    return parts


# -- jax.nn.dot_product_attention (xla, cudnn) --------------------------------------------------

def _dot_product(q, parts, backend):
    implementation = "cudnn" if backend == "cudnn" else "xla"
    b, t = q.shape[:2]
    keys = jnp.concatenate([p[0] for p in parts], axis=1).astype(q.dtype)
    vals = jnp.concatenate([p[1] for p in parts], axis=1).astype(q.dtype)
    masks = []
    for _, _, qs, ks, causal in parts:
        m = qs[:, :, None] == ks[:, None, :]
        if causal:
            m = m & jnp.tril(jnp.ones((t, ks.shape[1]), bool))[None]
        masks.append(m)
    mask = jnp.concatenate(masks, axis=2)[:, None]                               # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, keys, vals, mask=mask, scale=1.0, implementation=implementation)


def _dot_product_causal(q, k, v, backend):
    implementation = "cudnn" if backend == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=1.0, is_causal=True,
                                        implementation=implementation)


# -- splash ------------------------------------------------------------------------------------

def _splash_module():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    return sk, sm


@functools.lru_cache(maxsize=64)
def _splash_kernel(causal: bool, tq: int, tk: int, heads: int, block_q: int, block_kv: int, interpret: bool):
    """An MQA splash kernel (`heads` query heads share one key/value head) that returns its
    log-sum-exp; its mask infos also serve the backward kernels."""
    sk, sm = _splash_module()
    shape = (tq, tk)
    mask = sm.MultiHeadMask([sm.CausalMask(shape) if causal else sm.FullMask(shape) for _ in range(heads)])
    bs = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                       block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                       block_q_dq=block_q, block_kv_dq=block_kv)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa(mask, block_sizes=bs, head_shards=1, q_seq_shards=1,
                                  save_residuals=True, interpret=interpret)


def _collapse(mask_info):
    if mask_info is None or mask_info.partial_mask_blocks is None:
        return mask_info
    blocks = mask_info.partial_mask_blocks
    return mask_info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _over_batch_and_heads(fn, seg_args: int):
    """vmap a per-(row, kv head) function over kv heads (axis 0 of the arrays, segments shared)
    and rows (axis 0 of everything)."""
    def heads(*args):
        arrays, segs = args[:len(args) - seg_args], args[len(args) - seg_args:]
        in_axes = (0,) * len(arrays) + (None,) * seg_args
        return jax.vmap(fn, in_axes=in_axes)(*arrays, *segs)
    return jax.vmap(heads)


def _part_forward(kernel, q, k, v, qs, ks):
    """q [B,Hkv,G,T,D], k/v [B,Hkv,S,D], qs [B,T], ks [B,S] -> out [B,Hkv,G,T,D], lse [B,Hkv,G,T]."""
    sk, _ = _splash_module()

    def one(q1, k1, v1, qs1, ks1):
        out, (lse,) = kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=qs1, kv=ks1))
        return out, lse
    return _over_batch_and_heads(one, 2)(q, k, v, qs, ks)


def _part_backward(kernel, q, k, v, qs, ks, out, lse, dout):
    """Splash's backward kernels with the merged out / lse: the exact gradient of this part's keys
    inside the one softmax over every part."""
    sk, _ = _splash_module()
    kw = kernel.kwargs

    def one(q1, k1, v1, o1, l1, do1, qs1, ks1):
        res = (q1, k1, v1, sk.SegmentIds(q=qs1, kv=ks1), None, o1, l1,
               _collapse(kernel.dq_mask_info), _collapse(kernel.dkv_mask_info))
        grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                         kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"],
                                         res, do1)
        return grads[3], grads[4], grads[5]
    return _over_batch_and_heads(one, 2)(q, k, v, out, lse, dout, qs, ks)


def _merge(outs, lses):
    lse = functools.reduce(jnp.logaddexp, lses)
    out = sum(jnp.exp(l - lse)[..., None] * o.astype(jnp.float32) for o, l in zip(outs, lses))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _splash_merged(static, q, keys, vals, qsegs, kvsegs):
    return _splash_merged_fwd(static, q, keys, vals, qsegs, kvsegs)[0]


def _splash_merged_fwd(static, q, keys, vals, qsegs, kvsegs):
    kernels = _static_kernels(static, q, keys)
    outs, lses = zip(*[_part_forward(kn, q, k, v, qs, ks)
                       for kn, k, v, qs, ks in zip(kernels, keys, vals, qsegs, kvsegs)])
    out, lse = _merge(outs, lses)
    out = out.astype(q.dtype)
    return out, (q, keys, vals, qsegs, kvsegs, out, lse)


def _splash_merged_bwd(static, res, dout):
    q, keys, vals, qsegs, kvsegs, out, lse = res
    kernels = _static_kernels(static, q, keys)
    dq = jnp.zeros(q.shape, jnp.float32)
    dks, dvs = [], []
    for kn, k, v, qs, ks in zip(kernels, keys, vals, qsegs, kvsegs):
        dq_i, dk_i, dv_i = _part_backward(kn, q, k, v, qs, ks, out, lse, dout.astype(q.dtype))
        dq = dq + dq_i.astype(jnp.float32)
        dks.append(dk_i.astype(k.dtype))
        dvs.append(dv_i.astype(v.dtype))
    return dq.astype(q.dtype), tuple(dks), tuple(dvs), None, None


_splash_merged.defvjp(_splash_merged_fwd, _splash_merged_bwd)


def _static_kernels(static, q, keys):
    causal_flags, block_q, block_kv, interpret = static
    tq, heads = q.shape[3], q.shape[2]
    return [_splash_kernel(c, tq, k.shape[2], heads, block_q, block_kv, interpret)
            for c, k in zip(causal_flags, keys)]


def splash_blocks(t: int, opts: KernelOptions) -> tuple[int, int, int]:
    """(block_q, block_kv, padded T) for T tokens: splash needs blocks that are multiples of 128
    lanes and divide the (padded) sequence; a block never exceeds T rounded up to 128."""
    t_lanes = -(-t // TPU_LANES) * TPU_LANES
    bq, bkv = min(opts.block_q, t_lanes), min(opts.block_kv, t_lanes)
    step = bq * bkv // math.gcd(bq, bkv)
    return bq, bkv, -(-t // step) * step


def _splash(q, parts, opts: KernelOptions):
    """q [B,T,H,D] and parts (see `_parts`) -> [B,T,H,D]; sharded over the active mesh's batch and
    kv-head axes by shard_map (each device runs the kernels on its own rows and heads)."""
    b, t, h, d = q.shape
    hkv = parts[0][0].shape[2]
    g = h // hkv
    block_q, block_kv, t_pad = splash_blocks(t, opts)
    d_pad = d if (opts.interpret or d % TPU_LANES == 0) else -(-d // TPU_LANES) * TPU_LANES
    n_ctx = [p[0].shape[1] // t for p in parts]     # contexts of T keys in each part

    def pad_keys(x, n):                              # [B, n*T, Hkv, D] -> [B, Hkv, n*t_pad, d_pad]
        x = x.reshape(b, n, t, hkv, d)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d)))
        return jnp.transpose(x.reshape(b, n * t_pad, hkv, d_pad), (0, 2, 1, 3))

    def pad_kv_seg(s, n):
        s = s.reshape(b, n, t)
        return jnp.pad(s, ((0, 0), (0, 0), (0, t_pad - t)), constant_values=_KV_PAD).reshape(b, n * t_pad)

    q5 = jnp.transpose(q.reshape(b, t, hkv, g, d), (0, 2, 3, 1, 4))
    q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, 0), (0, t_pad - t), (0, d_pad - d)))
    keys = tuple(pad_keys(p[0].astype(q.dtype), n) for p, n in zip(parts, n_ctx))
    vals = tuple(pad_keys(p[1].astype(q.dtype), n) for p, n in zip(parts, n_ctx))
    qsegs = tuple(jnp.pad(p[2], ((0, 0), (0, t_pad - t)), constant_values=_Q_PAD) for p in parts)
    kvsegs = tuple(pad_kv_seg(p[3], n) for p, n in zip(parts, n_ctx))
    static = (tuple(p[4] for p in parts), block_q, block_kv, opts.interpret)

    def run(q5, keys, vals, qsegs, kvsegs):
        return _splash_merged(static, q5, keys, vals, qsegs, kvsegs)

    mesh = mesh_lib.current_mesh()
    if mesh is not None and mesh.size > 1:
        bspec = mesh_lib.logical_to_spec(("batch",), mesh, shape=(b,))[0]
        hspec = mesh_lib.logical_to_spec(("kv_heads",), mesh, shape=(hkv,))[0]
        P = jax.sharding.PartitionSpec
        x5, x4, x2 = P(bspec, hspec), P(bspec, hspec), P(bspec)
        run = jax.shard_map(run, mesh=mesh, in_specs=(x5, (x4,) * len(parts), (x4,) * len(parts),
                                                      (x2,) * len(parts), (x2,) * len(parts)),
                            out_specs=x5, check_vma=False)
    out = run(q5, keys, vals, qsegs, kvsegs)[:, :, :, :t, :d]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def crossbatch(q, k_own, k_other, v, *, range_max, k_packing, doc, visible, segment_ids, opts: KernelOptions):
    """Crossbatch attention (semantics of `fot_jax.model.attention.crossbatch_attention`) on a
    kernel backend. q [B,T,H,D], k_own/k_other/v [B,T,Hkv,D] -> [B,T,H,D] (q.dtype)."""
    if opts.backend in ("xla", "cudnn") and range_max == 0 and not doc:
        return _dot_product_causal(q, k_own, v, opts.backend)
    parts = _parts(q, k_own, k_other, v, range_max=range_max, k_packing=k_packing, doc=doc,
                   visible=visible, segment_ids=segment_ids)
    if opts.backend == "splash":
        return _splash(q, parts, opts).astype(q.dtype)
    if opts.backend in ("xla", "cudnn"):
        return _dot_product(q, parts, opts.backend).astype(q.dtype)
    raise ValueError(f"attention backend '{opts.backend}' has no kernel path")


def check(m, seq_len: int, platform: str | None = None) -> list[tuple[str, str]]:
    """Problems with the attention settings of model config `m` for sequences of `seq_len` tokens,
    as `(field, message)` pairs; empty when it can run. With `platform` (tpu, gpu, cpu) also whether
    the backend runs there; without, only what holds everywhere (this never starts JAX's backend,
    so configs are checked before `jax.distributed.initialize`)."""
    name = m.attention_backend
    if name not in BACKENDS:
        return [("model.attention_backend", f"'{name}' is not one of {BACKENDS}")]
    plat = platform_of(platform) if platform else None
    backend = resolve(name, plat) if plat else name
    if plat:
        allowed = PLATFORM_BACKENDS.get(plat, ("reference", "xla"))
        if backend not in allowed:
            return [
                (
                    "model.attention_backend",
                    f"'{backend}' does not run on {plat}; backends that do: {', '.join(('auto',) + allowed)}",
                )
            ]
    problems = []
    for field in ("attention_block_q", "attention_block_kv"):
        size = m[field]
        if size <= 0:
            problems.append((f"model.{field}", f"must be positive, got {size}"))
        elif backend == "splash" and size % TPU_LANES:
            problems.append((f"model.{field}", f"splash blocks must be multiples of {TPU_LANES}, got {size}"))
        elif backend == "splash" and seq_len > size and seq_len % size:
            problems.append((f"model.{field}", f"{size} does not divide the sequence length {seq_len} "
                             f"(data.seq_len); use a divisor of it, or a block >= {seq_len}"))
    d = config_lib.head_dim(m)
    if backend == "cudnn" and (d % 8 or d > CUDNN_MAX_HEAD_DIM):
        problems.append(("model.head_dim", f"cuDNN flash attention needs a head dim that is a multiple of 8 "
                         f"and at most {CUDNN_MAX_HEAD_DIM}, got {d}; backends that take it: reference, xla"))
    return problems
