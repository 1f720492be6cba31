"""Long-input ingest and generation with memory against a direct NumPy implementation of the
docs/architecture.md windowing rules (float64), on tiny random models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from fot_jax import config as config_lib
from fot_jax.infer.runtime import MemoryRuntime, MemoryRuntimeError, MemorySettings
from fot_jax.model import layout, llama


def _cfg(**model):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 50, 32, 48
    m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
    m.max_position_embeddings = 16
    m.mem_layers = [1]
    m.init_std = 0.2
    for k, v in model.items():
        m[k] = v
    return c


# --- NumPy reference ----------------------------------------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    """x [T, H, D] at positions pos [T] (HF rotate_half layout)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


class Reference:
    """One document, processed exactly as docs/architecture.md ("Long inputs with memory") states."""

    def __init__(self, model, m, top_k, capacity, last_context, logn_base=0):
        # per-layer names (`layers.{i}`), as the NumPy walk reads them
        pure = layout.per_layer(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        self.p = jax.tree.map(lambda x: np.asarray(x, np.float64), pure)
        self.m, self.top_k, self.capacity, self.c = m, top_k, capacity, last_context
        self.logn_base = logn_base
        self.w = m.max_position_embeddings
        self.memory = {l: [] for l in m.mem_layers}       # list of (k [Hkv, D], v) oldest first
        self.cache = [[] for _ in range(m.num_layers)]    # list of (k_raw, v)

    def forward(self, tokens, cache):
        """tokens [T] at positions len(cache[0]) + arange(T); attends to cache + itself causally."""
        m, p = self.m, self.p
        h, hkv = m.num_heads, m.num_kv_heads
        d = m.hidden_size // h
        g = h // hkv
        s0 = len(cache[0]) if cache is not None else 0
        pos = s0 + np.arange(len(tokens))
        x = p["embed_tokens"][tokens]
        new_kv = []
        for i in range(m.num_layers):
            lp = p["layers"][i]
            a = lp["self_attn"]
            hx = _rms(x, lp["input_layernorm"]["weight"], m.rms_norm_eps)
            q = np.einsum("te,ehd->thd", hx, a["q_proj"])
            k = np.einsum("te,ehd->thd", hx, a["k_proj"])
            v = np.einsum("te,ehd->thd", hx, a["v_proj"])
            is_mem = i in m.mem_layers
            if m.qk_norm == "all" or (m.qk_norm == "memory" and is_mem):
                q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * a["qk_temperature"][:, None]
                k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
            else:
                q = q * d ** -0.5
            new_kv.append((k, v))
            rope = not (is_mem and m.mem_positionals == "none")
            ck = (
                np.array([c[0] for c in cache[i]]).reshape(-1, hkv, d)
                if cache is not None
                else np.zeros((0, hkv, d))
            )
            cv = (
                np.array([c[1] for c in cache[i]]).reshape(-1, hkv, d)
                if cache is not None
                else np.zeros((0, hkv, d))
            )
            keys = np.concatenate([ck, k]) if cache is not None else k
            vals = np.concatenate([cv, v]) if cache is not None else v
            key_pos = np.arange(len(keys))
            if rope:
                q = _rope(q, pos, m.rope_theta)
                keys = _rope(keys, key_pos, m.rope_theta)
            out = np.zeros((len(tokens), h, d))
            for head in range(h):
                kvh = head // g
                for t in range(len(tokens)):
                    n_local = s0 + t + 1
                    qt = q[t, head]
                    if is_mem and self.logn_base:   # log-n: n = memory entries + local keys in view
                        qt = qt * max(1.0, np.log(len(self.memory[i]) + n_local) / np.log(self.logn_base))
                    s_loc = keys[:n_local, kvh] @ qt
                    v_loc = vals[:n_local, kvh]
                    if is_mem and self.memory[i]:
                        mk = np.array([e[0][kvh] for e in self.memory[i]])
                        mv = np.array([e[1][kvh] for e in self.memory[i]])
                        sm = mk @ qt
                        top = np.argsort(-sm, kind="stable")[: self.top_k]
                        s_loc = np.concatenate([sm[top], s_loc])
                        v_loc = np.concatenate([mv[top], v_loc])
                    w = np.exp(s_loc - s_loc.max())
                    out[t, head] = (w / w.sum()) @ v_loc
            x = x + np.einsum("thd,hde->te", out, a["o_proj"])
            hm = _rms(x, lp["post_attention_layernorm"]["weight"], m.rms_norm_eps)
            mp = lp["mlp"]
            gate = hm @ mp["gate_proj"]
            x = x + ((gate / (1 + np.exp(-gate))) * (hm @ mp["up_proj"])) @ mp["down_proj"]
        x = _rms(x, p["norm"]["weight"], m.rms_norm_eps)
        head = p["embed_tokens"].T if m.tie_embeddings else p["lm_head"]
        return (x @ head)[:, : m.vocab_size], new_kv

    def _to_memory(self, layer, kv_list):
        self.memory[layer].extend(kv_list)
        del self.memory[layer][: max(len(self.memory[layer]) - self.capacity, 0)]

    def ingest(self, tokens):
        tokens = np.asarray(tokens)
        n_prefix = max(len(tokens) - self.c, 0)
        logits = []
        for s in range(0, n_prefix, self.w):
            seg = tokens[s: min(s + self.w, n_prefix)]
            lg, kv = self.forward(seg, None)
            logits.append(lg)
            for l in self.m.mem_layers:
                self._to_memory(l, list(zip(kv[l][0], kv[l][1])))
        for tok in tokens[n_prefix:]:
            logits.append(self.step(tok))
        return np.concatenate(logits)

    def step(self, tok):
        if len(self.cache[0]) + 1 > self.w:   # the whole cache moves to memory
            for l in self.m.mem_layers:
                self._to_memory(l, self.cache[l])
            self.cache = [[] for _ in range(self.m.num_layers)]
        lg, kv = self.forward(np.array([tok]), self.cache)
        for i in range(self.m.num_layers):
            self.cache[i].append((kv[i][0][0], kv[i][1][0]))
        return lg


# --- tests ----------------------------------------------------------------------------------

CASES = {
    "as_first_dense_gqa": dict(model={}, top_k=1000, capacity=48),
    "as_first_topk": dict(model={}, top_k=5, capacity=48),
    "none_qknorm_topk_tied": dict(model=dict(mem_positionals="none", qk_norm="memory", tie_embeddings=True,
                                             num_kv_heads=4), top_k=7, capacity=32),
    "no_memory_layers": dict(model=dict(mem_layers=[]), top_k=4, capacity=32),  # local cache only
    # log-n scaling: memory layers' logits x ln(n) / ln(8) once a query sees more than 8 keys
    "as_first_topk_logn_qknorm": dict(model=dict(qk_norm="memory"), top_k=5, capacity=48, logn_base=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_matches_numpy_windowing(case):
    spec = CASES[case]
    c = _cfg(**spec["model"])
    model = llama.create(c.model, seed=3)
    settings = MemorySettings(top_k=spec["top_k"], capacity=spec["capacity"], dtype="float32",
                              last_context_length=6, chunk=16, logn_base=spec.get("logn_base", 0))
    rt = MemoryRuntime(model, batch=2, settings=settings)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, 75), rng.integers(3, 50, 53)]    # 4+ windows of 16, tails of 6
    last, logits = rt.ingest(docs, return_logits=True)
    # without logits the windows stop at the last memory layer (exact): same final logits
    np.testing.assert_allclose(MemoryRuntime(model, batch=2, settings=settings).ingest(docs), last, atol=1e-5)
    for b, doc in enumerate(docs):
        ref = Reference(model, c.model, spec["top_k"], spec["capacity"], 6,
                        spec.get("logn_base", 0)).ingest(doc)
        assert logits[b].shape == ref.shape
        np.testing.assert_allclose(logits[b], ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(last[b], ref[-1], atol=1e-4, rtol=1e-4)


def test_generation_moves_cache_to_memory_and_matches_reference():
    """Greedy generation past the window: the cache moves to memory when it would exceed W."""
    c = _cfg()
    model = llama.create(c.model, seed=4)
    settings = MemorySettings(top_k=6, capacity=64, dtype="float32", last_context_length=10, chunk=32)
    rt = MemoryRuntime(model, batch=1, settings=settings)
    doc = np.random.default_rng(1).integers(3, 50, 40)
    out = rt.generate([doc], max_new_tokens=20, stop_token=-1)[0]
    ref = Reference(model, c.model, 6, 64, 10)
    lg = ref.ingest(doc)[-1]
    expect = []
    for _ in range(20):
        tok = int(np.argmax(lg))
        expect.append(tok)
        lg = ref.step(tok)[-1]
    np.testing.assert_array_equal(out, expect)
    assert int(rt.cache_len[0]) == (10 + 20) - 16   # 10 tail + 20 generated tokens fed back; one flush at 16


def test_cache_views_read_only_the_filled_prefix_and_change_no_token(monkeypatch):
    """Steps read the smallest power-of-two prefix of the cache that holds every row (views 4, 8,
    ..., the window): greedy generation through growing views, a flush to memory at the window
    and a fresh cache after it equals the NumPy reference token for token, streamed or not, with
    one compiled decode program per view size."""
    from fot_jax.infer import runtime as runtime_lib
    monkeypatch.setattr(runtime_lib, "CACHE_VIEW_MIN", 4)
    c = _cfg(max_position_embeddings=64)
    model = llama.create(c.model, seed=9)
    settings = MemorySettings(top_k=6, capacity=256, dtype="float32", last_context_length=3, chunk=32)
    doc = np.random.default_rng(10).integers(3, 50, 150)
    ref = Reference(model, c.model, 6, 256, 3)
    lg = ref.ingest(doc)[-1]
    expect = []
    for _ in range(90):
        expect.append(int(np.argmax(lg)))
        lg = ref.step(expect[-1])[-1]
    for on_token in (None, lambda b, t: None):
        rt = MemoryRuntime(model, batch=1, settings=settings)
        assert [rt._cache_view(n) for n in (1, 4, 5, 33, 64, 65, 1000)] == [4, 4, 8, 64, 64, 64, 64]
        out = rt.generate([doc], max_new_tokens=90, stop_token=-1, on_token=on_token)[0]
        np.testing.assert_array_equal(out, expect)
        assert int(rt.cache_len[0]) == 3 + 90 - 64       # one flush at the window
        assert rt._decode_fn._cache_size() <= 5          # views 4 .. 64
    # decode calls that share a view share one program, the first call included (its inputs are
    # placed as the program's outputs are)
    monkeypatch.setattr(runtime_lib, "CACHE_VIEW_MIN", 16)
    monkeypatch.setattr(runtime_lib, "DECODE_BLOCK", 4)
    rt = MemoryRuntime(model, batch=1, settings=settings)
    np.testing.assert_array_equal(rt.generate([doc], max_new_tokens=12, stop_token=-1)[0], expect[:12])
    assert rt._decode_fn._cache_size() == 1                # 3 blocks of 4 tokens, all in view 16


def test_device_decode_loop_equals_host_loop_with_stops_streaming_and_sampling():
    """The on-device decode loop against a host loop of `sample` + `extend` with the same keys:
    two rows stopping at different steps, past the window (cache moved to memory), streamed."""
    from fot_jax.infer.runtime import sample
    c = _cfg()
    model = llama.create(c.model, seed=6)
    settings = MemorySettings(top_k=6, capacity=64, dtype="float32", last_context_length=10, chunk=32)
    rng = np.random.default_rng(5)
    docs = [rng.integers(3, 50, 40), rng.integers(3, 50, 23)]

    def host_loop(stop, n, temperature):
        rt = MemoryRuntime(model, batch=2, settings=settings)
        logits, key = rt.ingest(docs), jax.random.key(3)
        out, finished = [[], []], np.zeros(2, bool)
        for _ in range(n):
            key, sub = jax.random.split(key)
            tok = np.asarray(sample(jnp.asarray(logits), sub, temperature, 0.9))
            live = ~finished
            for b in np.flatnonzero(live):
                out[b].append(int(tok[b]))
                finished[b] = tok[b] == stop
            # a row's document is its prompt and what it generated, its stop token included
            last = rt.extend([[int(tok[b])] if live[b] else [] for b in range(2)])
            logits = np.where(live[:, None], last, logits)
            if finished.all():
                break
        return out, rt.doc_pos.copy(), rt.cache_len.copy()

    free, _, _ = host_loop(-1, 30, 0.8)
    stop = free[0][4]                       # row 0 stops at its 5th token; row 1 wherever it meets it
    want, want_pos, want_len = host_loop(stop, 30, 0.8)
    assert len(want[0]) == 5 and len(want[1]) > 5
    np.testing.assert_array_equal(want_pos, [40 + 5, 23 + len(want[1])])
    rt = MemoryRuntime(model, batch=2, settings=settings)
    streamed = []
    got = rt.generate(docs, 30, temperature=0.8, top_p=0.9, seed=3, stop_token=stop,
                      on_token=lambda b, t: streamed.append((b, t)))
    assert [g.tolist() for g in got] == want
    assert sorted(streamed) == sorted((b, t) for b in range(2) for t in want[b])
    assert [t for b, t in streamed if b == 1] == want[1]
    np.testing.assert_array_equal(rt.cache_len, want_len)
    np.testing.assert_array_equal(rt.doc_pos, want_pos)
    # and without streaming (one device call for all tokens): the same tokens
    rt = MemoryRuntime(model, batch=2, settings=settings)
    got = rt.generate(docs, 30, temperature=0.8, top_p=0.9, seed=3, stop_token=stop)
    assert [g.tolist() for g in got] == want


def test_sharded_runtime_equals_unsharded():
    c = _cfg()
    model = llama.create(c.model, seed=5)
    mesh = jax.make_mesh((8,), ("memory",), axis_types=(AxisType.Auto,))
    docs = [np.random.default_rng(2).integers(3, 50, 90), np.random.default_rng(3).integers(3, 50, 70)]
    outs = []
    for mesh_ in (None, mesh):
        rt = MemoryRuntime(model, 2, MemorySettings(top_k=9, capacity=64, dtype="float32",
                                                    last_context_length=8, chunk=8), mesh=mesh_)
        outs.append(rt.ingest(docs, return_logits=True)[1])
        if mesh_ is not None:
            assert rt.state.memory.stores[0].keys.sharding.spec[2] == "memory"
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_no_recompilation_as_memory_fills():
    c = _cfg()
    model = llama.create(c.model, seed=6)
    rt = MemoryRuntime(
        model, 1, MemorySettings(top_k=4, capacity=128, dtype="float32", last_context_length=8)
    )
    rt.ingest([np.arange(3, 3 + 100) % 50])
    sizes = (rt._window_fn._cache_size(), rt._extend_fn._cache_size())
    rt.ingest([np.arange(5, 5 + 180) % 50])        # more windows, fuller memory, same shapes
    assert (rt._window_fn._cache_size(), rt._extend_fn._cache_size()) == sizes == (1, 1)


def test_reset_of_one_row_and_empty_memory():
    """A reset row behaves as a fresh one; the other row is unchanged. Empty memory: pure local attention."""
    c = _cfg()
    model = llama.create(c.model, seed=7)
    settings = MemorySettings(top_k=4, capacity=64, dtype="float32", last_context_length=8, mode="multi_doc")
    rng = np.random.default_rng(4)
    first = [rng.integers(3, 50, 60), rng.integers(3, 50, 60)]
    second = [rng.integers(3, 50, 30), rng.integers(3, 50, 30)]
    rt = MemoryRuntime(model, 2, settings)
    rt.ingest(first)
    rt.reset(np.array([True, False]))
    _, got = rt.ingest(second, return_logits=True)
    fresh = MemoryRuntime(model, 2, settings)
    _, want0 = fresh.ingest(second, return_logits=True)
    np.testing.assert_allclose(got[0], want0[0], atol=1e-5)          # row 0: as if new
    keep = MemoryRuntime(model, 2, settings)
    keep.ingest(first)
    _, want1 = keep.ingest(second, return_logits=True)
    np.testing.assert_allclose(got[1], want1[1], atol=1e-5)          # row 1: untouched by the reset
    assert not np.allclose(got[1], want0[1], atol=1e-3)               # (and memory did matter)
    # empty memory = the plain model on a short document (one window, no memory): same logits, no NaN
    short = [rng.integers(3, 50, 8), rng.integers(3, 50, 8)]
    _, logits = MemoryRuntime(
        model, 2, MemorySettings(top_k=4, capacity=64, dtype="float32", last_context_length=8)
    ).ingest(short, return_logits=True)
    plain = np.asarray(model(jnp.asarray(np.stack(short))).logits)[:, :, :50]
    assert np.isfinite(np.stack(logits)).all()
    np.testing.assert_allclose(np.stack(logits), plain, atol=1e-4)


def test_bad_input_is_a_clear_error_and_leaves_state():
    c = _cfg()
    model = llama.create(c.model, seed=8)
    with pytest.raises(MemoryRuntimeError, match="top_k must be positive"):
        MemoryRuntime(model, 1, MemorySettings(top_k=0))
    with pytest.raises(MemoryRuntimeError, match="smaller than one window"):
        MemoryRuntime(model, 1, MemorySettings(capacity=8))
    with pytest.raises(MemoryRuntimeError, match="dtype 'int4'"):
        MemoryRuntime(model, 1, MemorySettings(dtype="int4"))
    with pytest.raises(MemoryRuntimeError, match="logn_base must be 0 .off. or at least 2, got 1"):
        MemoryRuntime(model, 1, MemorySettings(logn_base=1))
    rt = MemoryRuntime(model, 2, MemorySettings(top_k=4, capacity=32, dtype="float32", overflow="strict",
                                                last_context_length=8))
    rt.ingest([np.arange(3, 30), np.arange(3, 20)])
    before = jax.tree.map(np.asarray, rt.state)
    with pytest.raises(MemoryRuntimeError, match="got 3 documents for a runtime of batch 2"):
        rt.ingest([np.arange(3, 10)] * 3)
    with pytest.raises(MemoryRuntimeError, match="more than the memory capacity 32"):
        rt.ingest([np.arange(40) % 50 + 3, np.arange(3, 10)])
    with pytest.raises(MemoryRuntimeError, match="outside"):
        rt.ingest([np.array([3, 99]), np.arange(3, 10)])
    after = jax.tree.map(np.asarray, rt.state)
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("sharded", [False, True])
def test_grouped_windows_equal_window_by_window(monkeypatch, sharded):
    """With one memory layer, windows without logits run INGEST_GROUP at a time: the stores (ring
    buffer wrapped several times) and the logits after them equal window-by-window ingestion."""
    from fot_jax.infer import runtime as runtime_lib
    model = llama.create(_cfg().model, seed=7)
    mesh = jax.make_mesh((8,), ("memory",), axis_types=(AxisType.Auto,)) if sharded else None
    settings = MemorySettings(top_k=5, capacity=128, dtype="float32", last_context_length=6, chunk=16)
    docs = [np.random.default_rng(8).integers(3, 50, 300), np.random.default_rng(9).integers(3, 50, 201)]
    out = []
    for group in (runtime_lib.INGEST_GROUP, 1):
        monkeypatch.setattr(runtime_lib, "INGEST_GROUP", group)
        rt = MemoryRuntime(model, 2, settings, mesh=mesh)
        last = rt.ingest(docs)
        out.append((last, jax.device_get(rt.state.memory.stores[0]), rt._group_fn._cache_size()))
    (la, sa, ga), (lb, sb, _) = out
    assert ga >= 1                                   # the grouped path ran
    np.testing.assert_array_equal(np.asarray(sa.positions), np.asarray(sb.positions))
    # the same keys and values up to float32 rounding (a [G*B, W] batch sums in another order)
    np.testing.assert_allclose(np.asarray(sa.keys), np.asarray(sb.keys), atol=2e-5)
    np.testing.assert_allclose(np.asarray(sa.values), np.asarray(sb.values), atol=2e-5)
    np.testing.assert_allclose(la, lb, atol=1e-5)


def test_rewind_answers_several_questions_on_one_memory():
    """mark / rewind: each question is read and answered on top of the same memory and cache, as
    a fresh runtime that read the document and then only that question."""
    model = llama.create(_cfg().model, seed=8)
    settings = MemorySettings(top_k=6, capacity=64, dtype="float32", last_context_length=5, chunk=16)
    doc = np.random.default_rng(10).integers(3, 50, 45)
    questions = [[7, 8, 9], [11, 12], [13, 14, 15, 16]]
    rt = MemoryRuntime(model, 1, settings)
    rt.ingest([doc])
    mark = rt.mark()
    got = []
    for q in questions:
        got.append(rt.generate([q], max_new_tokens=4, stop_token=-1, continue_documents=True)[0])
        rt.rewind(mark)
    for q, answer in zip(questions, got):
        fresh = MemoryRuntime(model, 1, settings)
        fresh.ingest([doc])
        again = fresh.generate([q], 4, stop_token=-1, continue_documents=True)[0]
        np.testing.assert_array_equal(again, answer)
    # taking back tokens that have moved to memory is refused, and the state is unchanged
    rt.generate([list(range(3, 20))], max_new_tokens=1, stop_token=-1, continue_documents=True)
    before = (rt.cache_len.copy(), rt.doc_pos.copy())
    with pytest.raises(MemoryRuntimeError, match="cannot rewind to position"):
        rt.rewind(mark)
    assert (rt.cache_len, rt.doc_pos) == before
    with pytest.raises(MemoryRuntimeError, match="at least one prompt token"):
        rt.generate([[]], max_new_tokens=1, continue_documents=True)


def test_stores_that_cannot_fit_are_refused_with_the_shards_they_need():
    gib = 2 ** 30
    from fot_jax.infer.runtime import check_store_fits, store_bytes
    check_store_fits(8 * gib, 1, "cpu", None, 24 * gib)                 # fits the host
    with pytest.raises(MemoryRuntimeError, match=r"do not fit this host's 24.0 GiB.*at least 2 hosts"):
        check_store_fits(30 * gib, 8, "cpu", None, 24 * gib)          # CPU shards share one host
    check_store_fits(100 * gib, 8, "tpu", 16 * gib, 24 * gib)
    with pytest.raises(MemoryRuntimeError,
                       match=r"1 tpu device\(s\) of 16.0 GiB: they need at least 7 memory shards "
                             r"\(--memory-shards 8\)"):
        check_store_fits(100 * gib, 1, "tpu", 16 * gib, 24 * gib)
    c = _cfg()   # 1 memory layer, 2 kv heads x 8 dims: 2 * 2 * 8 * 2 bytes + 8 = 72 bytes a token (bf16)
    assert store_bytes(c.model, 3, 1000, "bfloat16") == 3 * 1000 * 72
    # the runtime refuses before allocating anything
    model = llama.create(c.model, seed=1)
    with pytest.raises(MemoryRuntimeError, match="1 row\\(s\\) x 4,398,046,511,104 tokens of memory"):
        MemoryRuntime(model, 1, MemorySettings(capacity=2 ** 42))
