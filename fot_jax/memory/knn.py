"""kNN lookup in a memory store: top-k by inner product, as partial softmax sums
(docs/architecture.md, "Long inputs with memory").

Shapes: queries `[B, Hkv, Q, D]` (the queries of one kv-head group share one scan: Q = G * T),
keys/values `[B, Hkv, N, D]`, valid `[B, N]`.

Scoring is chunked over N and blocked over queries (a score tile of about TILE float32 values,
which stays in cache), so no `[Q, N]` score matrix is ever held. Selection scores are computed in
the keys' own precision (bfloat16 x bfloat16 with float32 accumulation for the default store; the
matmul's operands per `_score_operand`); the scores returned are the selected entries' float32
products.
Exact top-k reads each tile once, for its group maxima, and merges into a running top-k by
moving entries in best first while some group beats a row's k-th score (see `_merge_chunk`): the
cost is the score matmul plus that read, not a top-k over each chunk. `search="approx"` uses
`jax.lax.approx_max_k` (TPU-fast, recall target) per chunk instead.

The result of a lookup is the triple of partial softmax sums over the retrieved entries,
`(m [B,Hkv,Q] max score, l [B,Hkv,Q] sum of exp(s - m), acc [B,Hkv,Q,D] sum of exp(s - m) v)`,
which `fot_jax.model.attention` combines exactly with the local keys' softmax (one softmax over
[top-k memory; causal local]). Sharded along N over a mesh axis, each shard takes its local
top-k; the shards all-gather those k scores per query (not keys or values), agree on the global
k-th score (ties broken by global index, as the unsharded search does), and each returns partial
sums over the entries it keeps; the sums combine exactly with a pmax / psum of `[Q, D]` arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fot_jax.config import SEARCH_MODES
from fot_jax.memory.store import as_float

GROUP = 16


ROW_BLOCK = 256      # queries scanned together (kv-head rows x positions)
MIN_POSITIONS = 64   # a block scores at least this many queries per (batch, kv-head) row
TILE = 1 << 20       # float32 scores per chunk: a tile that stays in cache
KV_TILE = 1 << 18    # float32 key (and value) elements a dense chunk converts: cached, not a store copy


def auto_chunk(rows: int, n: int, group: int = GROUP, tile: int = TILE) -> int:
    """Keys scored at once for `rows` queries: a score tile of about `tile` float32 values stays in
    cache, which keeps the score matmul at full speed and its one read cheap; at least 256 keys.
    (With `rows` the float32 elements of one key, the same bound sizes a chunk of upcast keys.)"""
    c = max(256, group, tile // max(rows, 1))
    c = 1 << (c.bit_length() - 1)
    return min(c, n)


def _first(mask, size):
    """Index of the first True along the last axis (`size` where none): a min-reduction, which
    XLA's CPU backend vectorizes, unlike argmax's (value, index) reduction."""
    pos = jnp.arange(size, dtype=jnp.float32)
    return jnp.min(jnp.where(mask, pos, float(size)), axis=-1).astype(jnp.int32)


def _insert(vals, idx, x, xi, act):
    """Insert (x, xi) into each row's descending list (vals, idx) [R, k] where `act`; equal
    scores already listed stay first (they have lower indices)."""
    k = vals.shape[-1]
    pos = jnp.sum(vals >= x[:, None], axis=-1)
    ar = jnp.arange(k)
    at, after = ar == pos[:, None], ar > pos[:, None]
    shift_v = jnp.concatenate([vals[:, :1], vals[:, :-1]], axis=-1)
    shift_i = jnp.concatenate([idx[:, :1], idx[:, :-1]], axis=-1)
    new_v = jnp.where(at, x[:, None], jnp.where(after, shift_v, vals))
    new_i = jnp.where(at, xi[:, None], jnp.where(after, shift_i, idx))
    return jnp.where(act[:, None], new_v, vals), jnp.where(act[:, None], new_i, idx)


def _merge_chunk(vals, idx, s, ok, start, group):
    """Merge one chunk's scores into the running top-k (vals, idx) [R, k].

    s [B, Hkv, C, Q] are the raw scores, keys-major (R = B * Hkv * Q rows), ok [B, C] the
    candidates. The whole chunk is read once, for its group maxima (groups of `group` consecutive
    keys, masked: an elementwise max of `group` rows of Q scores, which vectorizes), and those
    once more for the maxima of `group` consecutive groups. Then entries move into the list one
    per row per iteration, best first, while some row has a maximum above its k-th score; an
    iteration touches one supergroup, one group and the list of each row: the next entry of a
    group is found by ranking its few scores, so the scores are never rewritten. Once the list
    has filled, a chunk takes a few iterations: the cost is the score matmul plus one read of its
    output, not a top-k over the chunk."""
    nb, hkv, c, nq = s.shape
    r, n_groups = nb * hkv * nq, c // group
    sup = group if n_groups % group == 0 else n_groups                   # groups per supergroup
    grouped = s.reshape(nb, hkv, n_groups, group, nq)
    ok_grouped = ok.reshape(nb, n_groups, group)
    rows, ar = jnp.arange(r), jnp.arange(group)
    row_b, row_h, row_q = rows // (hkv * nq), rows // nq % hkv, rows % nq
    masked = ok_grouped[:, None, :, :, None]
    gm = jax.lax.cond(jnp.all(ok), lambda: jnp.max(grouped, axis=3),
                      lambda: jnp.max(jnp.where(masked, grouped, -jnp.inf), axis=3))
    gm = jnp.moveaxis(gm, 2, 3).reshape(r, n_groups)                        # [R, groups]: 1/group of s
    gm2 = jnp.max(gm.reshape(r, n_groups // sup, sup), axis=-1)

    def cond(carry):
        vals, _, _, gm2, _ = carry
        return jnp.any(jnp.max(gm2, axis=-1) > vals[:, -1])

    def body(carry):
        vals, idx, gm, gm2, taken = carry
        x = jnp.max(gm2, axis=-1)
        si = _first(gm2 == x[:, None], gm2.shape[-1])
        sub = gm.reshape(r, -1, sup)[rows, si]                                      # [R, sup]
        gi = si * sup + _first(sub == x[:, None], sup)
        t = taken[rows, gi]
        grp = jnp.where(ok_grouped[row_b, gi], grouped[row_b, row_h, gi, :, row_q], -jnp.inf)  # [R, group]
        better = (grp[:, None, :] > grp[:, :, None]) | ((grp[:, None, :] == grp[:, :, None])
                                                        & (ar[None, None, :] < ar[None, :, None]))
        rank = jnp.sum(better, axis=-1)                                             # 0 = best
        ej = _first(rank == t[:, None], group)
        nxt = jnp.max(jnp.where(rank == t[:, None] + 1, grp, -jnp.inf), axis=-1)
        act = x > vals[:, -1]
        vals, idx = _insert(vals, idx, x, (start + gi * group + ej).astype(jnp.int32), act)
        new_g = jnp.where(act, nxt, x)
        sub = jnp.where(jnp.arange(sup) == (gi - si * sup)[:, None], new_g[:, None], sub)
        return (vals, idx, gm.at[rows, gi].set(new_g), gm2.at[rows, si].set(jnp.max(sub, axis=-1)),
                taken.at[rows, gi].set(t + act.astype(taken.dtype)))

    init = (vals, idx, gm, gm2, jnp.zeros((r, n_groups), jnp.int32))
    vals, idx, *_ = jax.lax.while_loop(cond, body, init)
    return vals, idx


def _topk_rows(s, k: int, group: int):
    """Exact top-k of each row of s [R, C] (values descending, ties to the lower index, as
    `lax.top_k`): the k groups of `group` consecutive scores with the highest maxima hold every
    top-k entry (each group ranked above an entry's own holds an entry ranked above it), so only
    their k * group scores are ranked. One read of s for the group maxima, then two small top-k:
    a decode step's few queries against a long store need no top-k over the whole store."""
    r, c = s.shape
    if c % group or c // group < 4 * k:
        return jax.lax.top_k(s, k)
    grouped = s.reshape(r, c // group, group)
    _, g = jax.lax.top_k(jnp.max(grouped, axis=-1), k)
    g = jnp.sort(g, axis=-1)                    # candidates in index order: ties keep the lower index
    cand = jnp.take_along_axis(grouped, g[:, :, None], axis=1).reshape(r, k * group)
    v, j = jax.lax.top_k(cand, k)
    return v, jnp.take_along_axis(g, j // group, axis=-1) * group + j % group


def _approx_merge(vals, idx, s, start, recall_target):
    k = vals.shape[-1]
    v, j = jax.lax.approx_max_k(s, min(k, s.shape[-1]), recall_target=recall_target)
    all_v = jnp.concatenate([vals, v], axis=-1)
    all_i = jnp.concatenate([idx, (j + start).astype(jnp.int32)], axis=-1)
    v2, sel = jax.lax.top_k(all_v, k)
    return v2, jnp.take_along_axis(all_i, sel, axis=-1)


def _as_bits(keys, dtype):
    """bfloat16 keys as their uint16 bits (what a store holds): slicing bits inside the scan keeps
    XLA from converting the whole array to float32 outside the loop."""
    if keys.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(keys, jnp.uint16), "bfloat16"
    return keys, dtype


def _active_chunks(valid, chunk, n_chunks):
    """Chunks up to the last valid slot of any row: a ring buffer fills from slot 0, so a store
    that is not yet full is scored only over its filled part (a dynamic trip count, one program)."""
    n = valid.shape[1]
    last = jnp.max(jnp.where(jnp.any(valid, axis=0), jnp.arange(n, dtype=jnp.int32), -1))
    return jnp.minimum((last + chunk) // chunk, n_chunks)


def _rescore(q, keys, indices, scores, dtype):
    """Exact float32 scores of the selected entries, best first (selection may have scored in the
    store's bfloat16); -inf stays -inf."""
    b, hkv, nq, k = indices.shape
    kg = jnp.take_along_axis(keys, indices.reshape(b, hkv, nq * k, 1), axis=2)
    kg = as_float(kg, dtype).astype(jnp.float32).reshape(b, hkv, nq, k, -1)
    exact = jnp.einsum("bhqd,bhqkd->bhqk", q.astype(jnp.float32), kg, precision=jax.lax.Precision.HIGHEST)
    exact = jnp.where(scores > -jnp.inf, exact, -jnp.inf)
    v, sel = jax.lax.top_k(exact, k)
    return v, jnp.take_along_axis(indices, sel, axis=-1)


def _score_operand(key_dtype, queries: int):
    """The dtype the selection matmul's operands are given in, for `queries` queries per key. The
    selection scores are products of the store-precision query and keys with float32
    accumulation whatever this is: bfloat16 values are exact in float32 and so are their
    products. bfloat16 operands run on the CPU's matrix units where it has them (AMX) and on
    accelerators; a CPU without them multiplies float32 faster (a [192, 64] x [64, 4096] tile:
    172 against 104 GFLOP/s on AVX-512 without AMX), so there the keys are upcast when enough
    queries share each one (MIN_POSITIONS). A decode step's few queries read each key about once:
    upcasting would double what it reads."""
    if (key_dtype == jnp.bfloat16 and queries >= MIN_POSITIONS and jax.default_backend() == "cpu"
            and not _cpu_has_amx()):
        return jnp.float32
    return key_dtype


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def _scan_block(qs, keys, valid, top_k, chunk, search, recall_target, group, dtype):
    """Top-k (selection scores, indices) [B*Hkv*Q, k] of one block of queries qs [B,Hkv,Q,D]."""
    b, hkv, nq, _ = qs.shape
    n = keys.shape[2]
    grp = group if chunk % group == 0 else 1
    n_chunks = -(-n // chunk)

    op = _score_operand(qs.dtype, nq)
    qs = qs.astype(op)

    def scores(i, spec):
        start = jnp.minimum(i * chunk, n - chunk)  # the last chunk may overlap the one before
        kc = as_float(jax.lax.dynamic_slice_in_dim(keys, start, chunk, axis=2), dtype).astype(op)
        ok = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1)
        ok = ok & (start + jnp.arange(chunk) >= i * chunk)  # not seen in an earlier chunk
        return start, jnp.einsum(spec, qs, kc, preferred_element_type=jnp.float32), ok

    def body(i, carry):
        if search == "approx":
            start, s, ok = scores(i, "bhqd,bhcd->bhqc")
            s = jnp.where(ok[:, None, None, :], s, -jnp.inf).reshape(-1, chunk)
            return _approx_merge(*carry, s, start, recall_target)
        # keys-major scores [B, Hkv, C, Q]: the matmul runs as fast, and the group maxima are
        # elementwise maxima of whole rows instead of short reductions along a row
        start, s, ok = scores(i, "bhqd,bhcd->bhcq")
        return _merge_chunk(*carry, s, ok, start, grp)

    # the first chunk fills the list with one top-k (cheaper than inserting k entries one by one)
    _, s, ok = scores(0, "bhqd,bhcd->bhqc")
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf).reshape(b * hkv * nq, chunk)
    k0 = min(top_k, chunk)
    v, i = _topk_rows(s, k0, grp)
    pad = ((0, 0), (0, top_k - k0))
    init = (jnp.pad(v, pad, constant_values=-jnp.inf), jnp.pad(i.astype(jnp.int32), pad))
    if n_chunks == 1:
        return init
    return jax.lax.fori_loop(1, _active_chunks(valid, chunk, n_chunks), body, init)


def topk(q, keys, valid, top_k: int, *, chunk: int = 0, search: str = "exact",
         recall_target: float = 0.95, group: int = GROUP, dtype: str = "bfloat16"):
    """Top-k memory entries per query: (scores [B,Hkv,Q,k] float32, descending, -inf where fewer
    than k entries are valid; indices [B,Hkv,Q,k] int32 into N, ties to the lower index). Keys
    stored as uint16 bits hold `dtype` (see `fot_jax.memory.store`).

    Entries are selected by scores in the keys' own precision (a bfloat16 store: bfloat16 queries
    against bfloat16 keys, float32 accumulation, the CPU's and TPU's fast matmul); the scores
    returned are the selected entries' float32 products. Queries are scanned in blocks of about
    ROW_BLOCK rows; `chunk` (0 = auto) keys are scored at once."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if search not in SEARCH_MODES:
        raise ValueError(f"search '{search}' is not one of {SEARCH_MODES}")
    b, hkv, nq, d = q.shape
    n = keys.shape[2]
    if b > 1 and ROW_BLOCK // (b * hkv) < min(nq, MIN_POSITIONS):
        # a block of b*hkv rows would score only a few queries per row against that row's keys:
        # matmuls too thin to run at speed and one pass over the whole store per few queries.
        # Scan the batch one sequence at a time instead.
        def one(x):
            return topk(x[0][None], x[1][None], x[2][None], top_k, chunk=chunk, search=search,
                        recall_target=recall_target, group=group, dtype=dtype)
        v, i = jax.lax.map(one, (q, keys, valid))
        return v[:, 0], i[:, 0]
    keys, dtype = _as_bits(keys, dtype)
    key_dtype = as_float(keys[:0], dtype).dtype
    per_block = max(1, ROW_BLOCK // (b * hkv))
    qb = min(nq, 1 << (per_block.bit_length() - 1))
    n_blocks = -(-nq // qb)
    # auto: a tile of scores and a tile of keys upcast for scoring each stay in cache (few queries,
    # e.g. a decode step, would otherwise score the whole store at once from a float32 copy of it)
    chunk = min(chunk or min(auto_chunk(b * hkv * qb, n, group), auto_chunk(b * hkv * d, n, group)), n)
    qs = q.astype(key_dtype)
    args = (keys, valid, top_k, chunk, search, recall_target, group, dtype)
    if n_blocks == 1:
        v, i = _scan_block(qs, *args)
    else:
        qs = jnp.pad(qs, ((0, 0), (0, 0), (0, n_blocks * qb - nq), (0, 0)))
        qs = jnp.moveaxis(qs.reshape(b, hkv, n_blocks, qb, d), 2, 0)
        v, i = jax.lax.map(lambda x: _scan_block(x, *args), qs)              # [blocks, rows, k]
        v = jnp.moveaxis(v.reshape(n_blocks, b, hkv, qb, top_k), 0, 2)
        i = jnp.moveaxis(i.reshape(n_blocks, b, hkv, qb, top_k), 0, 2)
    v = v.reshape(b, hkv, n_blocks * qb, top_k)[:, :, :nq]
    i = i.reshape(b, hkv, n_blocks * qb, top_k)[:, :, :nq]
    if key_dtype != jnp.float32 or q.dtype != jnp.float32:
        v, i = _rescore(q, keys, i, v, dtype)
    return v, i


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


def dense_sums(q, keys, values, valid, *, chunk: int = 0, dtype: str = "bfloat16"):
    """Partial sums over every valid entry (no top-k): an online softmax over chunks of N."""
    b, hkv, nq, d = q.shape
    n = keys.shape[2]
    # scores and the chunk's keys and values upcast to float32 all stay in cache
    chunk = min(chunk or min(auto_chunk(b * hkv * nq, n), auto_chunk(b * hkv * d, n, tile=KV_TILE)), n)
    keys, dtype = _as_bits(keys, dtype)
    values, _ = _as_bits(values, dtype)
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


def lookup(q, keys, values, valid, top_k: int, *, chunk: int = 0, search: str = "exact",
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
