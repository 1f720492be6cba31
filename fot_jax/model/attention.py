"""Attention cores: causal local attention and crossbatch attention (docs/architecture.md,
"Crossbatch semantics").

Pure functions of arrays. Shapes: queries `[B, T, H, D]` (already scaled and rotated as the
positional mode says), keys/values `[B, T, Hkv, D]`, `H = Hkv * G` (grouped-query attention).

Crossbatch: row `b` attends to its own keys (causal) and to all keys of rows `b-1, ..., b-r`
(`k_other`, the positional mode already applied) in one softmax over `(r+1)*T` keys. Which of those
contexts a row sees is `visible_context_count` (k-packing, stepping, never a later row). Rows `b-c` are a
roll of the batch axis by `c`; under a batch sharded over devices XLA lowers that roll to a
collective permute between neighbours, never to a gather of the whole batch.

`crossbatch_attention` is the one entry point of training attention, local (r = 0) or crossbatch;
`kernel` (`fot_jax.model.kernels.KernelOptions`) picks how it is computed: the tiled paths here
(`reference`, the oracle) or a kernel backend (splash, cuDNN, XLA) that never holds the scores.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fot_jax.model import kernels

NEG_INF = -1e30
Q_BLOCK = 64  # query tile of the dense path (causal part scores only the visible key prefix)


@dataclasses.dataclass(frozen=True)
class CrossbatchSpec:
    """Static layout of a crossbatch step. `range_max` sizes the computation; the range actually
    used is a (possibly traced) scalar passed beside it, so sampling r per step never recompiles."""
    range_max: int
    k_packing: int = 1
    stepping: bool = False
    doc_mask: bool = False
    implementation: str = "dense"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Crossbatch:
    """A training call's attention context: the static layout, the range used (a scalar, possibly
    traced; None: spec.range_max) and the rows' document ids [B,T] (None: one document a row).
    Memory layers attend across rows by `spec`; the other layers within their row."""
    spec: CrossbatchSpec = dataclasses.field(metadata=dict(static=True))
    r: jax.Array | int | None = None
    segment_ids: jax.Array | None = None

    def for_layer(self, is_memory: bool) -> Crossbatch:
        if is_memory:
            return self
        return Crossbatch(CrossbatchSpec(range_max=0, doc_mask=self.spec.doc_mask), self.r, self.segment_ids)


def visible_context_count(batch: int, r, k_packing: int, stepping: bool):
    """[B] int32: contexts each row sees, itself included (docs/architecture.md, "Crossbatch
    semantics"; the one definition, used by the attention kernels and the tests' reference). Stepping needs
    k-packing: with k = 1 every row sees the full range (LongLLaMA's rule)."""
    rows = jnp.arange(batch, dtype=jnp.int32)
    r = jnp.asarray(r, jnp.int32)
    if stepping and k_packing > 1:
        div = max(k_packing - 1, 1)
        s = (r + 1 + div - 1) // div
        n = jnp.minimum((rows % k_packing) * s + 1, r + 1)
    else:
        n = jnp.broadcast_to(r + 1, rows.shape)
    return jnp.minimum(n, rows + 1)


def _group(q, num_kv_heads):
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def _other_mask(visible_c, segment_ids, segment_c, same_stream, doc):
    """[B, Tq, Tk] bool for an earlier row: all its keys if the row is visible; with the doc mask,
    only same-document keys when that row belongs to the same stream (other streams are the
    negatives and stay visible)."""
    t = segment_ids.shape[1]
    mask = jnp.broadcast_to(visible_c[:, None, None], (visible_c.shape[0], t, t))
    if doc:
        same_doc = segment_ids[:, :, None] == segment_c[:, None, :]
        mask = mask & (same_doc | ~same_stream[:, None, None])
    return mask


def crossbatch_attention(q, k_own, k_other, v, *, spec: CrossbatchSpec, r=None, segment_ids=None,
                         kernel: kernels.KernelOptions | None = None):
    """q [B,T,H,D], k_own/k_other/v [B,T,Hkv,D], segment_ids [B,T] (non-negative) -> [B,T,H,D]
    (q.dtype).

    `k_own` are the keys a row uses for itself (rotated at local positions), `k_other` the keys the
    same tokens show to later rows (the positional mode applied). r = None means spec.range_max.
    With range_max = 0 this is plain causal attention. `kernel` None means the reference path.
    """
    b = q.shape[0]
    r = spec.range_max if r is None else r
    visible = visible_context_count(b, r, spec.k_packing, spec.stepping)  # [B]
    if kernel is not None and kernel.is_kernel:
        return kernels.crossbatch(q, k_own, k_other, v, range_max=spec.range_max, k_packing=spec.k_packing,
                                  doc=spec.doc_mask and segment_ids is not None, visible=visible,
                                  segment_ids=segment_ids, opts=kernel)
    if spec.implementation == "blockwise" and spec.range_max > 0:
        return _blockwise(q, k_own, k_other, v, spec, visible, segment_ids)
    return _dense(q, k_own, k_other, v, spec, visible, segment_ids)


def _dense(q, k_own, k_other, v, spec, visible, segment_ids):
    """One softmax over [causal own keys; all keys of the visible earlier rows], tiled over
    query blocks so that the causal part only scores the key prefix each block can see."""
    b, t, h, d = q.shape
    hkv = k_own.shape[2]
    qg = _group(q, hkv)
    rmax = spec.range_max
    doc = spec.doc_mask and segment_ids is not None
    if rmax:
        k_ctx = jnp.stack([jnp.roll(k_other, c, axis=0) for c in range(1, rmax + 1)], axis=1)
        v_ctx = jnp.stack([jnp.roll(v, c, axis=0) for c in range(1, rmax + 1)], axis=1)
        ctx_mask = jnp.stack([jnp.broadcast_to((visible > c)[:, None, None], (b, 1, t))
                              for c in range(1, rmax + 1)], axis=2)          # [B, 1, R-1, T]
        if doc:
            rows = jnp.arange(b)
            seg_ctx = jnp.stack([jnp.roll(segment_ids, c, axis=0) for c in range(1, rmax + 1)], 1)
            same_stream = jnp.stack([(rows // spec.k_packing) == ((rows - c) // spec.k_packing)
                                     for c in range(1, rmax + 1)], 1)        # [B, R-1]
    outs = []
    for start in range(0, t, Q_BLOCK):
        end = min(start + Q_BLOCK, t)
        qi = qg[:, start:end]
        s_own = jnp.einsum("bqhgd,bkhd->bhgqk", qi, k_own[:, :end], preferred_element_type=jnp.float32)
        own_mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None]  # [1, nq, end]
        if doc:
            own_mask = own_mask & (segment_ids[:, start:end, None] == segment_ids[:, None, :end])
        s_own = jnp.where(own_mask[:, None, None], s_own, NEG_INF)
        m = s_own.max(-1)
        if rmax:
            s_ctx = jnp.einsum("bqhgd,bckhd->bhgqck", qi, k_ctx, preferred_element_type=jnp.float32)
            mask = ctx_mask
            if doc:
                same_doc = segment_ids[:, start:end, None, None] == seg_ctx[:, None]  # [B, nq, R-1, T]
                mask = mask & (same_doc | ~same_stream[:, None, :, None])
            s_ctx = jnp.where(mask[:, None, None], s_ctx, NEG_INF)
            m = jnp.maximum(m, s_ctx.max((-2, -1)))
        # One softmax over both parts: shared max, shared normaliser (no concatenation).
        m = jax.lax.stop_gradient(m)
        p_own = jnp.exp(s_own - m[..., None])
        denom = p_own.sum(-1)
        out = jnp.einsum("bhgqk,bkhd->bhgqd", p_own.astype(v.dtype), v[:, :end],
                         preferred_element_type=jnp.float32)
        if rmax:
            p_ctx = jnp.exp(s_ctx - m[..., None, None])
            denom = denom + p_ctx.sum((-2, -1))
            out = out + jnp.einsum("bhgqck,bckhd->bhgqd", p_ctx.astype(v.dtype), v_ctx,
                                   preferred_element_type=jnp.float32)
        out = jnp.transpose(out / denom[..., None], (0, 3, 1, 2, 4))
        outs.append(out)
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return out.reshape(b, t, h, d).astype(q.dtype)


def _blockwise(q, k_own, k_other, v, spec, visible, segment_ids):
    """Online softmax over contexts: holds one [B, H, T, T] score block at a time, and the backward
    pass recomputes each block (jax.checkpoint), so memory grows with r only through the rolled
    keys/values, never through `[B, H, T, r+1, T]` scores."""
    b, t, h, d = q.shape
    hkv = k_own.shape[2]
    qg = _group(q, hkv)
    seg = segment_ids if segment_ids is not None else jnp.zeros((b, t), jnp.int32)

    def block(carry, keys, vals, mask):
        m, l, acc = carry
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys, preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(vals.dtype), vals,
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

    g = h // hkv
    init = (jnp.full((b, hkv, g, t), NEG_INF, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    doc = spec.doc_mask and segment_ids is not None
    mask0 = jnp.tril(jnp.ones((t, t), bool))[None]
    if doc:
        mask0 = mask0 & (seg[:, :, None] == seg[:, None, :])
    carry = jax.checkpoint(block)(init, k_own, v, mask0)

    @jax.checkpoint
    def body(state, c):
        (m, l, acc), kc, vc, sc = state
        kc = jnp.roll(kc, 1, axis=0)
        vc = jnp.roll(vc, 1, axis=0)
        sc = jnp.roll(sc, 1, axis=0)
        rows = jnp.arange(b)
        same_stream = (rows // spec.k_packing) == ((rows - c) // spec.k_packing)
        mask = _other_mask(visible > c, seg, sc, same_stream, doc)
        return (block((m, l, acc), kc, vc, mask), kc, vc, sc), None

    (carry, _, _, _), _ = jax.lax.scan(body, (carry, k_other, v, seg),
                                       jnp.arange(1, spec.range_max + 1))
    m, l, acc = carry
    out = acc / l[..., None]                      # [B, Hkv, G, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)


def memory_attention(q, k, v, mask, memory=None, gate=None):
    """Inference attention of one layer (docs/architecture.md, "Long inputs with memory").

    q [B,T,H,D] (scaled, rotated); k/v [B,S,Hkv,D] local keys (rotated: a layer's cache with the
    new tokens already written into it) with mask [B,T,S] which of them each query sees. memory: the
    partial softmax sums of the query's top-k memory entries, `(m [B,Hkv,G*T], l, acc
    [B,Hkv,G*T,D])` from `fot_jax.memory.knn.lookup` (queries ordered kv-head, group, position), or
    None. Without a gate the memory entries join the local keys in one softmax (FoT); with `gate`
    [H] (logits) the memory-only and local-only attention outputs are mixed by sigmoid(gate)
    (Memorizing Transformer). Returns [B,T,H,D].
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = _group(q, hkv)
    scores = jnp.where(mask[:, None, None],
                       jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32), NEG_INF)
    m = scores.max(-1)                                                       # [B, Hkv, G, T]
    m_mem = l_mem = acc_mem = None
    if memory is not None:
        m_mem, l_mem, acc_mem = (x.reshape(b, hkv, g, t, *x.shape[3:]) for x in memory)
    joint = memory is not None and gate is None
    m_all = jnp.maximum(m, m_mem) if joint else m
    probs = jnp.exp(scores - m_all[..., None])
    denom = probs.sum(-1)
    out = jnp.einsum("bhgts,bshd->bhgtd", probs, v.astype(jnp.float32))
    if joint:
        scale = jnp.where(jnp.isfinite(m_mem), jnp.exp(m_mem - m_all), 0.0)
        denom = denom + l_mem * scale
        out = out + acc_mem * scale[..., None]
    out = out / denom[..., None]
    if memory is not None and not joint:
        mem_out = acc_mem / jnp.maximum(l_mem, 1e-30)[..., None]   # 0 when memory is empty
        w = jax.nn.sigmoid(gate.astype(jnp.float32)).reshape(hkv, g)[None, :, :, None, None]
        w = jnp.where((l_mem > 0)[..., None], w, 0.0)
        out = w * mem_out + (1 - w) * out
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    return out.astype(q.dtype)
