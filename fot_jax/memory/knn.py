"""kNN lookup in a memory store: top-k by inner product, as partial softmax sums
(DESIGN "Memory attention").

Shapes: queries `[B, Hkv, Q, D]` (the queries of one kv-head group share one scan: Q = G * T),
keys/values `[B, Hkv, N, D]`, valid `[B, N]`.

Scoring is chunked over N (`chunk` keys at a time, float32 accumulation), so no `[Q, N]` score
matrix is ever held: a running top-k is merged with each chunk's. Exact top-k of a chunk uses
the group-maximum reduction: split the chunk into groups of `group` keys; the k groups with the
largest maxima contain all of the chunk's top-k entries (an entry outside them would be beaten by
k group maxima), so an exact top-k runs over k*group candidates instead of the whole chunk.
`search="approx"` uses `jax.lax.approx_max_k` (TPU-fast, recall target) per chunk instead.

The result of a lookup is the triple of partial softmax sums over the retrieved entries,
`(m [B,Hkv,Q] max score, l [B,Hkv,Q] sum of exp(s - m), acc [B,Hkv,Q,D] sum of exp(s - m) v)`,
which `fot_jax.model.attention` combines exactly with the local keys' softmax (one softmax over
[top-k memory; causal local]). Sharded along N over a mesh axis, each shard takes its local
top-k; the shards all-gather those k scores per query (not keys or values), agree on the global
k-th score (ties broken by global index, as the unsharded search does), and each returns partial
sums over the entries it keeps; the sums combine exactly with a pmax / psum of `[Q, D]` arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fot_jax.memory.store import as_float

SEARCH_MODES = ("exact", "approx", "dense")
GROUP = 16


def _chunk_topk(s, k, search, recall_target, group):
    """s [..., C] -> (values, indices) [..., k] of the chunk."""
    c = s.shape[-1]
    if search == "approx":
        return jax.lax.approx_max_k(s, k, recall_target=recall_target)
    if group > 1 and c % group == 0 and c // group >= 2 * k:
        lead = s.shape[:-1]
        grouped = s.reshape(*lead, c // group, group)
        _, best_groups = jax.lax.top_k(jnp.max(grouped, axis=-1), k)                # [..., k]
        best_groups = jnp.sort(best_groups, axis=-1)  # keep index order: ties go to the lower index
        cand = jnp.take_along_axis(grouped, best_groups[..., None], axis=-2).reshape(*lead, k * group)
        cand_idx = (best_groups[..., None] * group + jnp.arange(group)).reshape(*lead, k * group)
        v, j = jax.lax.top_k(cand, k)
        return v, jnp.take_along_axis(cand_idx, j, axis=-1)
    return jax.lax.top_k(s, k)


def _active_chunks(valid, chunk, n_chunks):
    """Chunks up to the last valid slot of any row: a ring buffer fills from slot 0, so a store
    that is not yet full is scored only over its filled part (a dynamic trip count, one program)."""
    n = valid.shape[1]
    last = jnp.max(jnp.where(jnp.any(valid, axis=0), jnp.arange(n, dtype=jnp.int32), -1))
    return jnp.minimum((last + chunk) // chunk, n_chunks)


def topk(q, keys, valid, top_k: int, *, chunk: int = 8192, search: str = "exact",
         recall_target: float = 0.95, group: int = GROUP, dtype: str = "bfloat16"):
    """Top-k memory entries per query: (scores [B,Hkv,Q,k] float32, descending, -inf where fewer
    than k entries are valid; indices [B,Hkv,Q,k] int32 into N). Keys stored as uint16 bits hold
    `dtype` (see `fot_jax.memory.store`)."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if search not in SEARCH_MODES:
        raise ValueError(f"search '{search}' is not one of {SEARCH_MODES}")
    b, hkv, nq, d = q.shape
    n = keys.shape[2]
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    k_chunk = min(top_k, chunk)
    ct = jnp.promote_types(q.dtype, as_float(keys[:0], dtype).dtype)
    qc = q.astype(ct)

    def body(carry, i):
        start = jnp.minimum(i * chunk, n - chunk)  # the last chunk may overlap the one before
        kc = as_float(jax.lax.dynamic_slice_in_dim(keys, start, chunk, axis=2), dtype).astype(ct)
        vc = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1)
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        ok = vc[:, None, None, :] & (ids >= i * chunk)  # not seen in an earlier chunk
        s = jnp.einsum("bhqd,bhcd->bhqc", qc, kc, preferred_element_type=jnp.float32)
        s = jnp.where(ok, s, -jnp.inf)
        v, j = _chunk_topk(s, k_chunk, search, recall_target, group)
        best_v, best_i = carry
        all_v = jnp.concatenate([best_v, v], axis=-1)
        all_i = jnp.concatenate([best_i, (j + start).astype(jnp.int32)], axis=-1)
        v2, sel = jax.lax.top_k(all_v, top_k)
        return (v2, jnp.take_along_axis(all_i, sel, axis=-1)), None

    init = (jnp.full((b, hkv, nq, top_k), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, nq, top_k), jnp.int32))
    if n_chunks == 1:
        (v, i), _ = body(init, 0)
        return v, i
    active = _active_chunks(valid, chunk, n_chunks)
    return jax.lax.fori_loop(0, active, lambda i, c: body(c, i)[0], init)


def partial_sums(scores, indices, values, keep=None, dtype: str = "bfloat16"):
    """Softmax partial sums over retrieved entries: (m, l, acc) as in the module docstring."""
    b, hkv, nq, k = scores.shape
    d = values.shape[-1]
    gathered = jnp.take_along_axis(values, indices.reshape(b, hkv, nq * k, 1), axis=2)
    gathered = as_float(gathered, dtype).reshape(b, hkv, nq, k, d).astype(jnp.float32)
    ok = scores > -jnp.inf
    if keep is not None:
        ok = ok & keep
    m = jnp.max(jnp.where(ok, scores, -jnp.inf), axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(scores - m_safe[..., None]), 0.0)
    return m, jnp.sum(p, axis=-1), jnp.einsum("bhqk,bhqkd->bhqd", p, gathered)


def _combine(m, l, acc, axis):
    """Exact combination of per-shard partial sums: a pmax and two psums of [Q]-sized arrays."""
    m_all = jax.lax.pmax(m, axis)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
    return m_all, jax.lax.psum(l * scale, axis), jax.lax.psum(acc * scale[..., None], axis)


def dense_sums(q, keys, values, valid, *, chunk: int = 8192, dtype: str = "bfloat16"):
    """Partial sums over every valid entry (no top-k): an online softmax over chunks of N."""
    b, hkv, nq, d = q.shape
    n = keys.shape[2]
    chunk = min(chunk, n)
    ct = jnp.promote_types(q.dtype, as_float(keys[:0], dtype).dtype)

    def body(carry, i):
        m, l, acc = carry
        start = jnp.minimum(i * chunk, n - chunk)
        kc = as_float(jax.lax.dynamic_slice_in_dim(keys, start, chunk, axis=2), dtype).astype(ct)
        vc = as_float(jax.lax.dynamic_slice_in_dim(values, start, chunk, axis=2), dtype).astype(jnp.float32)
        ok = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1)[:, None, None, :]
        ok = ok & (start + jnp.arange(chunk) >= i * chunk)
        s = jnp.einsum("bhqd,bhcd->bhqc", q.astype(ct), kc, preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqc,bhcd->bhqd", p, vc)
        return (m_new, l, acc), None

    init = (jnp.full((b, hkv, nq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, nq), jnp.float32),
            jnp.zeros((b, hkv, nq, d), jnp.float32))
    active = _active_chunks(valid, chunk, -(-n // chunk))
    return jax.lax.fori_loop(0, active, lambda i, c: body(c, i)[0], init)


def lookup(q, keys, values, valid, top_k: int, *, chunk: int = 8192, search: str = "exact",
           recall_target: float = 0.95, mesh=None, memory_axis: str = "memory",
           return_indices: bool = False, dtype: str = "bfloat16"):
    """Partial sums (m, l, acc) of the top-k memory entries of each query; with a mesh whose
    `memory_axis` shards N, a sharded lookup that equals the unsharded one. With
    return_indices, also the retrieved indices [B,Hkv,Q,k] (sharded: [B,Hkv,Q,S*k], -1 = not kept)."""
    if search == "dense":
        if return_indices:
            raise ValueError("search='dense' retrieves every valid entry; it has no indices to return")
        if mesh is None or memory_axis not in mesh.shape or mesh.shape[memory_axis] == 1:
            return dense_sums(q, keys, values, valid, chunk=chunk, dtype=dtype)

        def dense_shard(q, keys, values, valid):
            m, l, acc = dense_sums(q, keys, values, valid, chunk=chunk, dtype=dtype)
            return _combine(m, l, acc, memory_axis)
        kv_spec = P(None, None, memory_axis, None)
        return jax.shard_map(dense_shard, mesh=mesh, in_specs=(P(), kv_spec, kv_spec, P(None, memory_axis)),
                             out_specs=(P(),) * 3, check_vma=False)(q, keys, values, valid)
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    opts = dict(chunk=chunk, search=search, recall_target=recall_target, dtype=dtype)
    if mesh is None or memory_axis not in mesh.shape or mesh.shape[memory_axis] == 1:
        s, i = topk(q, keys, valid, top_k, **opts)
        out = partial_sums(s, i, values, dtype=dtype)
        return (*out, i) if return_indices else out
    shards = mesh.shape[memory_axis]
    n = keys.shape[2]
    if n % shards:
        raise ValueError(f"memory of {n} slots does not divide over {shards} '{memory_axis}' shards")
    local_n = n // shards

    def per_shard(q, keys, values, valid):
        me = jax.lax.axis_index(memory_axis)
        s, i = topk(q, keys, valid, top_k, **opts)                     # local top-k
        every = jax.lax.all_gather(s, memory_axis)                     # [S, B, Hkv, Q, k] scores only
        flat = jnp.moveaxis(every, 0, -2).reshape(*s.shape[:-1], shards * top_k)
        kth = jax.lax.top_k(flat, top_k)[0][..., -1]                   # the global k-th score
        n_above = jnp.sum(flat > kth[..., None], axis=-1)
        ties = jnp.sum(every == kth[..., None], axis=-1)               # [S, B, Hkv, Q]
        ties_before = jnp.cumsum(ties, axis=0) - ties
        quota = jnp.clip(top_k - n_above - ties_before[me], 0, ties[me])
        is_tie = s == kth[..., None]
        tie_rank = jnp.cumsum(is_tie, axis=-1) - 1
        keep = ((s > kth[..., None]) | (is_tie & (tie_rank < quota[..., None]))) & (s > -jnp.inf)
        m_all, l, acc = _combine(*partial_sums(s, i, values, keep, dtype=dtype), memory_axis)
        if not return_indices:
            return m_all, l, acc
        idx = jnp.where(keep, i + me * local_n, -1)
        idx = jnp.moveaxis(jax.lax.all_gather(idx, memory_axis), 0, -2).reshape(flat.shape)
        return m_all, l, acc, idx

    kv_spec = P(None, None, memory_axis, None)
    n_out = 4 if return_indices else 3
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), kv_spec, kv_spec, P(None, memory_axis)),
                         out_specs=(P(),) * n_out, check_vma=False)(q, keys, values, valid)
