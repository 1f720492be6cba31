"""Memory store and kNN lookup against independent references: NumPy dense softmax, faiss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from fot_jax.memory import knn
from fot_jax.memory import store as store_lib


def _mesh(n=8):
    return jax.make_mesh((n,), ("memory",), axis_types=(AxisType.Auto,))


def _np_partials(q, keys, values, valid, top_k):
    """Dense NumPy reference: per query, the top_k valid keys by score -> (m, l, acc)."""
    b, h, nq, d = q.shape
    m = np.full((b, h, nq), -np.inf)
    l = np.zeros((b, h, nq))
    acc = np.zeros((b, h, nq, d))
    for bi in range(b):
        idx = np.flatnonzero(valid[bi])
        for hi in range(h):
            s = q[bi, hi].astype(np.float64) @ keys[bi, hi, idx].astype(np.float64).T  # [Q, n_valid]
            if idx.size == 0:
                continue
            k = min(top_k, idx.size)
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            st = np.take_along_axis(s, top, 1)
            m[bi, hi] = st.max(1)
            p = np.exp(st - m[bi, hi][:, None])
            l[bi, hi] = p.sum(1)
            acc[bi, hi] = np.einsum("qk,qkd->qd", p, values[bi, hi, idx][top])
    return m, l, acc


def _random(seed, b=2, h=2, nq=12, n=256, d=16, valid_frac=0.7):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, nq, d)).astype(np.float32)
    keys = rng.standard_normal((b, h, n, d)).astype(np.float32)
    values = rng.standard_normal((b, h, n, d)).astype(np.float32)
    valid = rng.random((b, n)) < valid_frac
    return q, keys, values, valid


@pytest.mark.parametrize("top_k,chunk", [(8, 64), (8, 256), (5, 48), (300, 64), (4, 1024)])
def test_lookup_equals_numpy_topk_softmax(top_k, chunk):
    """Chunked (with an overlapping last chunk when chunk does not divide N) and grouped top-k."""
    q, keys, values, valid = _random(0)
    m, l, acc = knn.lookup(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(valid),
                           top_k, chunk=chunk)
    rm, rl, racc = _np_partials(q, keys, values, valid, top_k)
    np.testing.assert_allclose(np.asarray(m), rm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(acc) / np.asarray(l)[..., None], racc / rl[..., None], rtol=1e-5, atol=1e-5
    )


def test_topk_indices_equal_faiss():
    import faiss
    rng = np.random.default_rng(1)
    n, d, nq, k = 4096, 32, 64, 32
    keys = rng.standard_normal((n, d)).astype(np.float32)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(keys)
    ref_scores, ref_idx = index.search(q, k)
    for search_chunk in (512, 1000, 4096):
        s, i = knn.topk(jnp.asarray(q)[None, None], jnp.asarray(keys)[None, None],
                        jnp.ones((1, n), bool), k, chunk=search_chunk)
        np.testing.assert_allclose(np.asarray(s)[0, 0], ref_scores, rtol=1e-4, atol=1e-4)
        # equal index sets up to ties (none expected with random floats)
        assert (np.sort(np.asarray(i)[0, 0], 1) == np.sort(ref_idx, 1)).mean() == 1.0


def test_sharded_lookup_equals_unsharded_and_faiss():
    import faiss
    q, keys, values, valid = _random(2, b=2, h=2, nq=16, n=1024, d=16, valid_frac=0.8)
    mesh = _mesh(8)
    args = [jnp.asarray(x) for x in (q, keys, values, valid)]
    m0, l0, a0, i0 = knn.lookup(*args, 16, chunk=64, return_indices=True)
    m1, l1, a1, i1 = jax.jit(lambda *a: knn.lookup(*a, 16, chunk=64, mesh=mesh, return_indices=True))(*args)
    np.testing.assert_allclose(np.asarray(m1), np.asarray(m0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a1) / np.asarray(l1)[..., None],
                               np.asarray(a0) / np.asarray(l0)[..., None], rtol=1e-5, atol=1e-5)
    i1 = np.asarray(i1)
    assert ((i1 >= 0).sum(-1) == 16).all()  # exactly k kept across the shards
    for b in range(2):
        ids = np.flatnonzero(valid[b])
        for h in range(2):
            index = faiss.IndexFlatIP(16)
            index.add(keys[b, h, ids])
            _, ref = index.search(q[b, h], 16)
            got = np.sort(i1[b, h], 1)[:, -16:]
            np.testing.assert_array_equal(got, np.sort(ids[ref], 1))
            np.testing.assert_array_equal(np.sort(np.asarray(i0)[b, h], 1), np.sort(ids[ref], 1))


def test_sharded_lookup_breaks_ties_like_unsharded():
    """Many equal scores straddling shard boundaries: the shards keep exactly k, lowest index first."""
    b, h, nq, n, d, k = 1, 1, 3, 64, 4, 10
    keys = np.zeros((b, h, n, d), np.float32)
    keys[..., 0] = 1.0
    keys[0, 0, 5, 0] = 2.0            # one clear winner; the other 63 tie
    values = np.random.default_rng(0).standard_normal((b, h, n, d)).astype(np.float32)
    q = np.ones((b, h, nq, d), np.float32)
    valid = np.ones((b, n), bool)
    args = [jnp.asarray(x) for x in (q, keys, values, valid)]
    m0, l0, a0, i0 = knn.lookup(*args, k, chunk=16, return_indices=True)
    m1, l1, a1, i1 = knn.lookup(*args, k, chunk=16, mesh=_mesh(8), return_indices=True)
    expect = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(np.sort(np.asarray(i0)[0, 0], 1), np.broadcast_to(expect, (nq, k)))
    kept = np.sort(np.asarray(i1)[0, 0], 1)[:, -k:]
    np.testing.assert_array_equal(kept, np.broadcast_to(expect, (nq, k)))
    np.testing.assert_allclose(np.asarray(a1) / np.asarray(l1)[..., None],
                               np.asarray(a0) / np.asarray(l0)[..., None], rtol=1e-6)


def _np_topk_lexi(scores, valid, k):
    """Reference top-k: score descending, then index ascending (NumPy stable sort)."""
    s = np.where(valid, scores, -np.inf)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, order, -1), order


@pytest.mark.parametrize("chunk", [256, 1024, 4096])
def test_exact_topk_ties_across_groups_and_query_blocks(chunk, monkeypatch):
    """Scores quantised to a few levels, so most are tied across groups, supergroups and chunks;
    more query rows than one block (with a padded last block) and masked slots."""
    monkeypatch.setattr(knn, "ROW_BLOCK", 64)
    rng = np.random.default_rng(11)
    b, h, nq, n, d, k = 2, 2, 40, 4096, 4, 24
    keys = np.round(rng.standard_normal((b, h, n, d)) * 2).astype(np.float32)
    q = np.zeros((b, h, nq, d), np.float32)
    q[..., 0] = rng.integers(1, 3, (b, h, nq))
    valid = rng.random((b, n)) < 0.9
    s, i = knn.topk(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(valid), k, chunk=chunk)
    scores = np.einsum("bhqd,bhnd->bhqn", q, keys)
    ref_s, ref_i = _np_topk_lexi(scores, valid[:, None, None, :], k)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


def test_selection_operands_do_not_change_the_result(monkeypatch):
    """bfloat16 store: the selection matmul gets bfloat16 operands (matrix units) or float32 ones
    (CPUs without them); bfloat16 values and their products are exact in float32, so the selected
    entries and their scores are the same."""
    rng = np.random.default_rng(19)
    b, h, nq, n, d, k = 1, 3, 64, 8192, 64, 32
    keys = jnp.asarray(rng.standard_normal((b, h, n, d)), jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(keys, jnp.uint16)
    q = jnp.asarray(rng.standard_normal((b, h, nq, d)), jnp.float32)
    valid = jnp.asarray(rng.random((b, n)) < 0.8)
    # a decode step's few queries keep the store's dtype whatever the platform; a float32 store stays float32
    assert knn._score_operand(jnp.bfloat16, knn.MIN_POSITIONS - 1) == jnp.bfloat16
    assert knn._score_operand(jnp.float32, 4 * knn.MIN_POSITIONS) == jnp.float32
    out = {}
    for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        monkeypatch.setattr(knn, "_score_operand", lambda key_dtype, queries, dtype=dtype: dtype)
        out[name] = knn.topk(q, bits, valid, k, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(out["bfloat16"][1]), np.asarray(out["float32"][1]))
    np.testing.assert_array_equal(np.asarray(out["bfloat16"][0]), np.asarray(out["float32"][0]))


@pytest.mark.parametrize("row_block", [8, 4096])
def test_batched_topk_equals_each_sequence_alone(row_block, monkeypatch):
    """A batch too wide for a row block is scanned one sequence at a time (row_block 8); a narrow
    one in one block (4096). Either way each sequence's result is its own top-k: per-sequence
    masks, a bfloat16 store, the float32 rescoring."""
    monkeypatch.setattr(knn, "ROW_BLOCK", row_block)
    rng = np.random.default_rng(13)
    b, h, nq, n, d, k = 5, 3, 24, 1024, 16, 12
    keys = jnp.asarray(rng.standard_normal((b, h, n, d)), jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(keys, jnp.uint16)
    q = jnp.asarray(rng.standard_normal((b, h, nq, d)), jnp.float32)
    valid = jnp.asarray(rng.random((b, n)) < 0.7)
    s, i = knn.topk(q, bits, valid, k, dtype="bfloat16")
    q_bf = np.asarray(q.astype(jnp.bfloat16), np.float64)
    sel = np.einsum("bhqd,bhnd->bhqn", q_bf, np.asarray(keys, np.float64))
    _, ref_i = _np_topk_lexi(sel, np.asarray(valid)[:, None, None, :], k)
    np.testing.assert_array_equal(np.sort(np.asarray(i), -1), np.sort(ref_i, -1))
    for j in range(b):
        sj, ij = knn.topk(q[j:j + 1], bits[j:j + 1], valid[j:j + 1], k, dtype="bfloat16")
        np.testing.assert_array_equal(np.asarray(i)[j:j + 1], np.asarray(ij))
        np.testing.assert_array_equal(np.asarray(s)[j:j + 1], np.asarray(sj))


def test_bfloat16_store_selects_by_store_precision_and_returns_float32_scores():
    """Selection scores: bfloat16 queries x bfloat16 keys (float32 accumulation); the scores
    returned are the float32 queries' products with the selected keys."""
    rng = np.random.default_rng(12)
    n, d, nq, k = 8192, 64, 48, 32
    keys = np.asarray(jnp.asarray(rng.standard_normal((1, 1, n, d)), jnp.bfloat16), np.float32)
    q = rng.standard_normal((1, 1, nq, d)).astype(np.float32)
    bits = jax.lax.bitcast_convert_type(jnp.asarray(keys, jnp.bfloat16), jnp.uint16)
    s, i = knn.topk(jnp.asarray(q), bits, jnp.ones((1, n), bool), k, dtype="bfloat16")
    q_bf = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float64)
    sel_scores = np.einsum("bhqd,bhnd->bhqn", q_bf, keys.astype(np.float64))
    _, ref_i = _np_topk_lexi(sel_scores, np.ones((1, 1, 1, n), bool), k)
    np.testing.assert_array_equal(np.sort(np.asarray(i), -1), np.sort(ref_i, -1))
    exact = np.einsum("bhqd,bhqkd->bhqk", q.astype(np.float64), keys[0, 0][np.asarray(i)[0, 0]][None, None])
    np.testing.assert_allclose(np.asarray(s), exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(np.asarray(s), axis=-1) <= 0).all()


def test_approx_search_recall():
    q, keys, values, valid = _random(3, b=1, h=1, nq=32, n=2048, d=16, valid_frac=1.0)
    _, exact = knn.topk(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(valid), 16, chunk=512)
    _, approx = knn.topk(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(valid), 16, chunk=512,
                         search="approx", recall_target=0.95)
    recall = np.mean(
        [len(set(a) & set(e)) / 16 for a, e in zip(np.asarray(approx)[0, 0], np.asarray(exact)[0, 0])]
    )
    assert recall >= 0.9


def test_empty_memory_gives_no_entries():
    q, keys, values, _ = _random(4, n=64)
    m, l, acc = knn.lookup(
        jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.zeros((2, 64), bool), 8
    )
    assert np.isneginf(np.asarray(m)).all() and (np.asarray(l) == 0).all() and (np.asarray(acc) == 0).all()


def test_bad_lookup_arguments():
    q, keys, values, valid = (jnp.asarray(x) for x in _random(5, n=64))
    with pytest.raises(ValueError, match="top_k must be positive"):
        knn.lookup(q, keys, values, valid, 0)
    with pytest.raises(ValueError, match="search 'fuzzy'"):
        knn.lookup(q, keys, values, valid, 4, search="fuzzy")


# --- the store -------------------------------------------------------------------------------

def _write(store, rng, t, mask=None, start=0, mesh=None):
    b, h, _, d = store.keys.shape
    k = rng.standard_normal((b, h, t, d)).astype(np.float32)
    v = rng.standard_normal((b, h, t, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(start, start + t), (b, t))
    mask = np.ones((b, t), bool) if mask is None else mask
    store_lib.check_write(store, k, v, pos, np.zeros((b, t)), mask)
    new = jax.jit(lambda s, *a: store_lib.write(s, *a, mesh=mesh), donate_argnums=0)(
        store, k, v, pos, np.zeros((b, t), np.int32), mask)
    return new, k, v, pos, mask


@pytest.mark.parametrize("sharded", [False, True])
def test_store_fifo_keeps_exactly_the_last_n_tokens(sharded):
    mesh = _mesh(8) if sharded else None
    rng = np.random.default_rng(0)
    n = 64
    store = store_lib.create(2, 2, n, 8, "float32", mesh=mesh)
    history_k, history_pos = [[], []], [[], []]
    start = 0
    for t in (24, 24, 24, 24, 24):  # 120 writes > N, wrapping twice, with masked-out tokens
        mask = rng.random((2, t)) < 0.8
        store, k, v, pos, mask = _write(store, rng, t, mask, start, mesh)
        for b in range(2):
            history_k[b].extend(k[b, :, mask[b]].reshape(-1, 2, 8))
            history_pos[b].extend(pos[b, mask[b]])
        start += t
    for b in range(2):
        got_pos = np.asarray(store.positions[b])
        assert np.asarray(store.written[b]) == len(history_pos[b])
        expect = history_pos[b][-n:]
        assert sorted(got_pos.tolist()) == sorted(expect)     # exactly the last N tokens
        for slot, p in enumerate(got_pos):
            j = len(history_pos[b]) - 1 - history_pos[b][::-1].index(p)
            np.testing.assert_array_equal(np.asarray(store.keys[b, :, slot]), history_k[b][j])
    if sharded:
        assert store.keys.sharding.spec[2] == "memory"


def test_store_reset_and_bad_input():
    rng = np.random.default_rng(1)
    store = store_lib.create(2, 1, 32, 4, "float32")
    store, *_ = _write(store, rng, 10)
    store = store_lib.reset(store, np.array([True, False]))
    assert not np.asarray(store.valid[0]).any() and np.asarray(store.valid[1]).sum() == 10
    with pytest.raises(store_lib.MemoryStoreError, match="dtype 'int8'"):
        store_lib.create(1, 1, 8, 4, "int8")
    with pytest.raises(store_lib.MemoryStoreError, match="exceeds the capacity"):
        store_lib.check_write(store, *(np.zeros((2, 1, 40, 4)),) * 2, *(np.zeros((2, 40)),) * 3)
    with pytest.raises(store_lib.MemoryStoreError, match="do not fit"):
        store_lib.check_write(store, *(np.zeros((3, 1, 8, 4)),) * 2, *(np.zeros((3, 8)),) * 3)
    with pytest.raises(store_lib.MemoryStoreError, match="does not divide"):
        store_lib.create(1, 1, 12, 4, "float32", mesh=_mesh(8))


# --- memory attention: [top-k memory; causal local] in one softmax ---------------------------

def _np_attention(q, k, v, mask, mk, mv, mvalid, top_k, gate=None):
    """q [T,H,D], k/v [S,Hkv,D], mask [T,S], memory mk/mv [Hkv,N,D] with mvalid [N] (float64)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    out = np.zeros((t, h, d))
    idx = np.flatnonzero(mvalid)
    for head in range(h):
        kh = head // (h // hkv)
        for i in range(t):
            sl = k[mask[i], kh] @ q[i, head]
            vl = v[mask[i], kh]
            sm = mk[kh, idx] @ q[i, head]
            top = np.argsort(-sm, kind="stable")[:top_k]
            if gate is None:
                s = np.concatenate([sm[top], sl])
                w = np.exp(s - s.max())
                out[i, head] = (w / w.sum()) @ np.concatenate([mv[kh, idx][top], vl])
            else:
                wl = np.exp(sl - sl.max())
                local = (wl / wl.sum()) @ vl
                wm = np.exp(sm[top] - sm[top].max())
                mem = (wm / wm.sum()) @ mv[kh, idx][top]
                g = 1 / (1 + np.exp(-gate[head]))
                out[i, head] = g * mem + (1 - g) * local
    return out


@pytest.mark.parametrize("top_k,gated", [(1000, False), (6, False), (6, True)])
def test_memory_attention_equals_dense_reference_through_wraparound(top_k, gated):
    from fot_jax.model.attention import memory_attention
    rng = np.random.default_rng(7)
    b, t, h, hkv, d, n = 2, 10, 4, 2, 8, 32
    store = store_lib.create(b, hkv, n, d, "float32")
    for start in range(0, 80, 20):       # 80 writes into 32 slots: FIFO wraps twice
        store, *_ = _write(store, rng, 20, start=start)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    gate = rng.standard_normal(h).astype(np.float32) if gated else None
    qm = jnp.transpose(jnp.asarray(q).reshape(b, t, hkv, h // hkv, d), (0, 2, 3, 1, 4)).reshape(b, hkv, -1, d)
    partials = knn.lookup(qm, store.keys, store.values, store.valid, top_k, chunk=16)
    got = np.asarray(memory_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                      partials, None if gate is None else jnp.asarray(gate)))
    for bi in range(b):
        want = _np_attention(q[bi].astype(np.float64), k[bi], v[bi], mask[bi], np.asarray(store.keys[bi]),
                             np.asarray(store.values[bi]), np.asarray(store.valid[bi]), top_k, gate)
        np.testing.assert_allclose(got[bi], want, atol=1e-5, rtol=1e-5)
    # an empty memory is pure local attention, no NaN
    empty = store_lib.create(b, hkv, n, d, "float32")
    p0 = knn.lookup(qm, empty.keys, empty.values, empty.valid, top_k, chunk=16)
    out0 = np.asarray(memory_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), p0,
                                       None if gate is None else jnp.asarray(gate)))
    none = np.asarray(memory_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    assert np.isfinite(out0).all()
    np.testing.assert_allclose(out0, none, atol=1e-6)


@pytest.mark.parametrize("sharded", [False, True])
def test_dense_search_attends_to_every_valid_entry(sharded):
    q, keys, values, valid = _random(6, n=256)
    args = [jnp.asarray(x) for x in (q, keys, values, valid)]
    m, l, acc = knn.lookup(*args, 1, search="dense", chunk=48, mesh=_mesh(8) if sharded else None)
    rm, rl, racc = _np_partials(q, keys, values, valid, 10 ** 6)
    np.testing.assert_allclose(np.asarray(m), rm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(acc) / np.asarray(l)[..., None], racc / rl[..., None], rtol=1e-5, atol=1e-5
    )


def test_bfloat16_store_holds_bit_patterns_and_reads_back():
    """16-bit stores keep uint16 bits (in-place scatter on CPU); readers see the bfloat16 values."""
    rng = np.random.default_rng(9)
    store = store_lib.create(1, 2, 16, 4, "bfloat16")
    assert store.keys.dtype == jnp.uint16 and store.dtype == "bfloat16"
    store, k, v, pos, mask = _write(store, rng, 5)
    got = np.asarray(store_lib.as_float(store.keys, "bfloat16")[0, :, :5], np.float32)
    np.testing.assert_array_equal(got, np.asarray(jnp.asarray(k[0]).astype(jnp.bfloat16), np.float32))
    q = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    m, l, acc = knn.lookup(jnp.asarray(q), store.keys, store.values, store.valid, 2, dtype="bfloat16")
    kb = np.asarray(jnp.asarray(k).astype(jnp.bfloat16), np.float64)
    vb = np.asarray(jnp.asarray(v).astype(jnp.bfloat16), np.float64)
    full_k, full_v = np.zeros((1, 2, 16, 4)), np.zeros((1, 2, 16, 4))
    full_k[:, :, :5], full_v[:, :, :5] = kb, vb
    rm, rl, racc = _np_partials(q, full_k, full_v, np.asarray(store.valid), 2)
    np.testing.assert_allclose(
        np.asarray(acc) / np.asarray(l)[..., None], racc / rl[..., None], rtol=1e-5, atol=1e-5
    )
