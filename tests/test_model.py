"""The LLaMA decoder against stock transformers.LlamaForCausalLM holding the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.convert import hf
from fot_jax.model import llama
from fot_jax.model.rope import apply_rope, rope_cos_sin

try:                      # the torch-dependent tests skip one by one (with the reason) without them
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_torch = pytest.mark.skipif(
    transformers is None, reason="needs torch and transformers: pip install 'fot_jax[torch]'"
)


def _model_config(num_heads, num_kv_heads, tie, vocab=200, rope_theta=10000.0):
    m = config_lib.base_config().model
    m.vocab_size = vocab
    m.hidden_size = 64
    m.intermediate_size = 96
    m.num_layers = 3
    m.num_heads = num_heads
    m.num_kv_heads = num_kv_heads
    m.tie_embeddings = tie
    m.mem_layers = []
    m.rope_theta = rope_theta
    m.max_position_embeddings = 64
    return m


@pytest.mark.parametrize("num_heads,num_kv_heads,tie,theta", [
    (4, 4, False, 10000.0),   # MHA, untied
    (4, 2, False, 500000.0),  # GQA (LLaMA 3 style theta)
    (8, 2, True, 10000.0),    # GQA, tied embeddings (SmolLM style)
    (4, 4, True, 1e6),        # MHA tied, Code Llama theta
])
@needs_torch
def test_logits_match_transformers(num_heads, num_kv_heads, tie, theta):
    m = _model_config(num_heads, num_kv_heads, tie, rope_theta=theta)
    model = llama.create(m, seed=3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sd = hf.to_hf_state_dict(params, m)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf.hf_llama_config(m))).eval()
    missing, unexpected = ref.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if tie else [])  # tied: HF shares the embedding
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 64))
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model(jnp.asarray(tokens)).logits)
    assert got.shape[-1] == config_lib.padded_vocab(m) == 256
    np.testing.assert_allclose(got[..., : m.vocab_size], expected, atol=1e-4, rtol=0)
    assert np.all(got[..., m.vocab_size:] <= -1e8)  # padded vocabulary rows take no probability


def test_rope_is_hf_rotate_half():
    """Against the closed form: pair (i, i + D/2) rotated by angle pos * theta^(-2i/D)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    pos = np.arange(5)
    cos, sin = rope_cos_sin(jnp.asarray(pos), 8, 100.0)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    half = 4
    for t in range(5):
        for i in range(half):
            ang = pos[t] * 100.0 ** (-2 * i / 8)
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            np.testing.assert_allclose(got[0, t, :, i], a * np.cos(ang) - b * np.sin(ang), atol=1e-5)
            np.testing.assert_allclose(got[0, t, :, i + half], b * np.cos(ang) + a * np.sin(ang), atol=1e-5)


def test_every_parameter_has_logical_axes():
    m = _model_config(4, 2, False)
    m.mem_layers = [1]
    m.qk_norm = "memory"
    state = nnx.state(nnx.eval_shape(lambda: llama.create(m)), nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for v in leaves:
        axes = v.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(v.shape), v


def _np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("mode", ["as_first", "none"])
def test_memory_layer_positional_modes_and_qk_norm(mode):
    """A memory layer's crossbatch attention from the layer's own weights, in NumPy: q/k/v
    projections, query/key L2 normalisation with the per-head temperature, RoPE on the own
    context only (as_first) or nowhere (none), one softmax over own (causal) + previous row."""
    m = _model_config(4, 2, False)
    m.num_layers = 1
    m.mem_layers = [0]
    m.mem_positionals = mode
    m.qk_norm = "memory"
    model = llama.create(m, seed=1)
    attn = model.layers[0].self_attn
    B, T, E = 4, 6, m.hidden_size
    x = np.random.default_rng(2).normal(size=(B, T, E)).astype(np.float32)
    from fot_jax.model.attention import Crossbatch, CrossbatchSpec
    spec = CrossbatchSpec(range_max=1, k_packing=2, stepping=True)
    cos, sin = rope_cos_sin(jnp.arange(T), 16, m.rope_theta)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    got = np.asarray(attn(jnp.asarray(x), positions, crossbatch=Crossbatch(spec))[0])

    wq, wk, wv, wo = (np.asarray(getattr(attn, n)[...]) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    temp = np.asarray(attn.qk_temperature[...])
    q = np.einsum("bte,ehd->bthd", x, wq)
    k = np.einsum("bte,ehd->bthd", x, wk)
    v = np.einsum("bte,ehd->bthd", x, wv)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * temp[:, None]
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)

    def rot(a):
        c, s = np.asarray(cos)[None, :, None], np.asarray(sin)[None, :, None]
        return a * c + np.concatenate([-a[..., 8:], a[..., :8]], -1) * s

    q_loc, k_loc = (rot(q), rot(k)) if mode == "as_first" else (q, k)
    out = np.zeros((B, T, 4, 16))
    for b in range(B):
        for h in range(4):
            hk = h // 2
            for t in range(T):
                keys = [k_loc[b, t2, hk] for t2 in range(t + 1)]
                vals = [v[b, t2, hk] for t2 in range(t + 1)]
                if b % 2 == 1:  # the stream's second chunk sees the first (stepping, k=2, r=1)
                    keys += [k[b - 1, t2, hk] for t2 in range(T)]  # unrotated: position 0
                    vals += [v[b - 1, t2, hk] for t2 in range(T)]
                s = np.array([q_loc[b, t, h] @ kk for kk in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, t, h] = (p[:, None] * np.array(vals)).sum(0)
    expected = np.einsum("bthd,hde->bte", out, wo)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_building_a_model_never_asks_the_platform(monkeypatch):
    """Construction reads the config only (`auto` backends and scan unrolling are decided when the
    model is traced), so a model can be built before JAX's backend may start (multi-host) and
    for another platform's plan."""
    from fot_jax.model import kernels
    asked = []
    real = kernels.platform_of
    monkeypatch.setattr(kernels, "platform_of",
                        lambda platform=None: asked.append(platform) or real(platform))
    m = config_lib.base_config().model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 64, 32, 64, 3
    m.num_heads = m.num_kv_heads = 2
    m.mem_layers = [1]
    assert m.attention_backend == "auto" and m.scan_unroll == 0
    model = llama.create(m)
    nnx.eval_shape(lambda: llama.create(m))
    assert asked == []
    tokens = jnp.zeros((2, 8), jnp.int32)
    logits = model(tokens).logits
    assert logits.shape == (2, 8, config_lib.padded_vocab(m)) and asked        # decided when traced


@pytest.mark.parametrize("mem_positionals", ["as_first", "none"])
def test_one_layer_call_serves_training_cache_and_memory(mem_positionals):
    """The same tokens through the three uses of the layer call give the same logits: training
    (no cache, no memory), a fresh cache (written, then read through a view), and an empty memory
    (looked up, nothing found). Then a cache filled in two calls (10 tokens, then 6) gives the last
    6 tokens' logits of the whole pass, holds the keys the cache-less call returns, and counts 16."""
    from fot_jax.memory.view import Lookup, Memory

    m = _model_config(4, 2, False)
    m.mem_layers = [1]
    m.mem_positionals = mem_positionals
    model = llama.create(m, seed=4)
    b, t, hkv, d = 2, 16, 2, 16
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, m.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    train = model(tokens)
    assert train.cache is None
    empty = model.empty_cache(b, m.max_position_embeddings, jnp.float32)
    cached = model(tokens, empty.positions(jnp.ones((b, t), bool)), cache=empty.reading(32))
    memory = Memory.create([1], Lookup(top_k=4), b, hkv, 128, d, "float32")
    fresh = model(tokens, positions, memory=memory)
    np.testing.assert_allclose(cached.logits, train.logits, atol=2e-5)
    np.testing.assert_allclose(fresh.logits, train.logits, atol=2e-5)
    np.testing.assert_array_equal(cached.cache.length, [t, t])
    for layer, new in enumerate(fresh.cache):       # a cache stores what the cache-less call returns
        np.testing.assert_allclose(cached.cache.layer(layer).k[:, :t], new.k, atol=1e-6)
        np.testing.assert_allclose(cached.cache.layer(layer).v[:, :t], new.v, atol=1e-6)
    # two calls: 10 tokens, then 6 (row 1 pads its second call after 4 tokens: dropped, not counted)
    first = model(tokens[:, :10], empty.positions(jnp.ones((b, 10), bool)), cache=empty.reading(16))
    valid = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
    second = model(tokens[:, 10:], first.cache.positions(valid), cache=first.cache.reading(16))
    np.testing.assert_array_equal(second.cache.length, [16, 14])
    np.testing.assert_allclose(second.logits[0], train.logits[0, 10:], atol=2e-5)
    np.testing.assert_allclose(second.logits[1, :4], train.logits[1, 10:14], atol=2e-5)
    assert not np.any(np.asarray(second.cache.layer(0).k[1, 14:]))     # padding never written


def test_layer_by_layer_call_on_sliced_layers_equals_the_stacked_call():
    """`layers=model.layers` with a cache of one run a layer (what the runtime decodes with) gives
    the stacked call's logits and cache, with memory read; a cache of the stacked layout, too few
    layers, or keys_through_layer alongside are errors."""
    from fot_jax.memory.view import Lookup, Memory
    from fot_jax.model.cache import Cache

    m = _model_config(4, 2, False)
    m.num_layers = 4
    m.mem_layers = [2]
    model = llama.create(m, seed=6)
    assert model.run_counts == (2, 1, 1)
    b, t, hkv, d = 2, 12, 2, 16
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, m.vocab_size, (b, t)), jnp.int32)
    memory = Memory.create([2], Lookup(top_k=4), b, hkv, 64, d, "float32")
    keys = jnp.asarray(np.random.default_rng(8).normal(size=(b, 20, hkv, d)), jnp.float32)
    memory = memory.write([(keys, keys * 0.5)], jnp.broadcast_to(jnp.arange(20), (b, 20)),
                          jnp.zeros((b, 20), jnp.int32), jnp.ones((b, 20), bool))
    stacked = model.empty_cache(b, 32, jnp.float32)
    per_layer = Cache.empty((1,) * m.num_layers, b, 32, hkv, d, jnp.float32)
    valid = jnp.ones((b, t), bool)
    want = model(tokens, stacked.positions(valid), cache=stacked.reading(16), memory=memory)
    got = model(tokens, per_layer.positions(valid), cache=per_layer.reading(16), memory=memory,
                layers=model.layers)
    np.testing.assert_allclose(got.logits, want.logits, atol=2e-5)
    np.testing.assert_array_equal(got.cache.length, want.cache.length)
    assert got.cache.counts == (1, 1, 1, 1)
    for i in range(m.num_layers):
        np.testing.assert_allclose(got.cache.layer(i).k, want.cache.layer(i).k, atol=1e-6)
        np.testing.assert_allclose(got.cache.layer(i).v, want.cache.layer(i).v, atol=1e-6)
    with pytest.raises(ValueError, match="one run a layer"):
        model(tokens, stacked.positions(valid), cache=stacked, layers=model.layers)
    with pytest.raises(ValueError, match="3 modules for a model of 4 layers"):
        model(tokens, per_layer.positions(valid), cache=per_layer, layers=model.layers[:3])
    with pytest.raises(ValueError, match="keys_through_layer"):
        model(tokens, cache=per_layer, layers=model.layers, keys_through_layer=2)
