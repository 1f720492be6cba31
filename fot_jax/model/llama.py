"""LLaMA decoder with FoT memory layers (Flax NNX).

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `norm`); `fot_jax.parallel.mesh` turns those into shardings. Parameter names follow
the HF LLaMA layout so that conversion is a rename plus reshape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.config import MemAttention, PositionalMode, QkNorm, Remat
from fot_jax.model import kernels
from fot_jax.model.attention import CrossbatchSpec, crossbatch_attention, memory_attention
from fot_jax.model.rope import apply_rope, rope_cos_sin
from fot_jax.parallel.mesh import constrain

# the jax policy of each `config.Remat` but NONE
REMAT_POLICIES = {
    Remat.FULL: None,  # save nothing
    Remat.DOTS: jax.checkpoint_policies.dots_saveable,
    Remat.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(REMAT_POLICIES) | {Remat.NONE} == set(Remat)

# the logit of the vocabulary's padding rows: no probability, and finite (a softmax or a loss over
# it never sees inf - inf); masked attention scores use attention.NEG_INF
PADDED_VOCAB_LOGIT = -1e9


def _param(rngs, shape, axes, std, dtype):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, m, rngs):
        pd = jnp.dtype(m.param_dtype)
        self.gate_proj = _param(rngs, (m.hidden_size, m.intermediate_size), ("embed", "mlp"), m.init_std, pd)
        self.up_proj = _param(rngs, (m.hidden_size, m.intermediate_size), ("embed", "mlp"), m.init_std, pd)
        self.down_proj = _param(rngs, (m.intermediate_size, m.hidden_size), ("mlp", "embed"), m.init_std, pd)
        self.dtype = jnp.dtype(m.dtype)

    def __call__(self, x):
        dt = self.dtype
        gate = _dense(x, self.gate_proj[...].astype(dt))
        up = _dense(x, self.up_proj[...].astype(dt))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(h, self.down_proj[...].astype(dt))


def _dense(x, w, out_dtype=None):
    """x [B, T, *in] . w [*in, *out] -> [B, T, *out] as one 2-D matmul over B*T rows (XLA:CPU lays
    out 2-D gradient matmuls far better than batched 3-D ones: 2x faster backward)."""
    b, t = x.shape[:2]
    in_size = 1
    for s in x.shape[2:]:
        in_size *= s
    out_shape = w.shape[x.ndim - 2:]
    y = jnp.matmul(x.reshape(b * t, in_size), w.reshape(in_size, -1), preferred_element_type=out_dtype)
    return y.reshape(b, t, *out_shape)


def _l2_normalize(x, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention; in a memory layer also crossbatch attention (training)."""

    def __init__(self, m, layer_index: int, rngs):
        pd = jnp.dtype(m.param_dtype)
        d = config_lib.head_dim(m)
        e, h, hkv = m.hidden_size, m.num_heads, m.num_kv_heads
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), m.init_std, pd)
        self.k_proj = _param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), m.init_std, pd)
        self.v_proj = _param(rngs, (e, hkv, d), ("embed", "kv_heads", "head_dim"), m.init_std, pd)
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), m.init_std, pd)
        self.is_memory = layer_index in list(m.mem_layers)
        self.qk_norm = m.qk_norm == QkNorm.ALL or (m.qk_norm == QkNorm.MEMORY and self.is_memory)
        if self.qk_norm:
            self.qk_temperature = nnx.Param(jnp.full((h,), m.qk_temperature_init, pd),
                                            logical_axes=("heads",))
        if self.is_memory and m.mem_attention == MemAttention.GATED:
            # Memorizing-Transformer gate logits, one per head (inference; sigmoid(0) = an even mix).
            self.mem_gate = nnx.Param(jnp.zeros((h,), pd), logical_axes=("heads",))
        self.use_rope = not (self.is_memory and m.mem_positionals == PositionalMode.NONE)
        # the backend as configured (`auto` is resolved when the layer is traced, not here: building a
        # model never starts JAX's backend)
        self.attention = (str(m.attention_backend), int(m.attention_block_q), int(m.attention_block_kv))
        self.head_dim = d
        self.dtype = jnp.dtype(m.dtype)

    def project(self, x, cos, sin):
        """x [B,T,E] -> q [B,T,H,D] (scaled, rotated), k_own, k_other, v [B,T,Hkv,D]."""
        dt = self.dtype
        q = _dense(x, self.q_proj[...].astype(dt))
        k = _dense(x, self.k_proj[...].astype(dt))
        v = _dense(x, self.v_proj[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.qk_norm:
            q = _l2_normalize(q) * self.qk_temperature[...].astype(dt)[:, None]
            k = _l2_normalize(k)
        else:
            q = q * jnp.asarray(self.head_dim ** -0.5, dt)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
            k_own = apply_rope(k, cos, sin)
        else:
            k_own = k
        # as_first: other contexts see keys rotated at position 0 (the identity); none: no rotation.
        k_other = k
        return q, k_own, k_other, v

    def __call__(self, x, cos, sin, segment_ids, crossbatch: CrossbatchSpec | None, r):
        q, k_own, k_other, v = self.project(x, cos, sin)
        if crossbatch is not None and self.is_memory:
            spec = crossbatch
        else:
            doc = crossbatch.doc_mask if crossbatch is not None else False
            spec = CrossbatchSpec(range_max=0, doc_mask=doc)
        out = crossbatch_attention(q, k_own, k_other, v, spec=spec, r=r, segment_ids=segment_ids,
                                   kernel=kernels.options(*self.attention))
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return _dense(out, self.o_proj[...].astype(self.dtype))


    def infer(self, x, cos, sin, cache, cache_cos, cache_sin, mask, memory_fn, q_scale=None, write=None):
        """Inference: x [B,T,E] new tokens; memory_fn(q [B,Hkv,G*T,D]) -> partial sums or None;
        q_scale [B,T]: memory layers' queries (so the logits of memory and local keys alike) are
        multiplied by it (`memory.logn_base`). Keys are kept as the cache stores them: un-rotated in
        memory layers (what memory stores; rotated here with cache_cos/sin at use), rotated at their
        positions in the others.

        Without a cache: mask causal [B,T,T]; returns (out [B,T,E], (k, v)) of the new tokens.
        With a cache (k, v) [B,S,Hkv,D] (slot j holds position j) and `write` (rows, slots [B,T];
        a slot >= S drops its token): the new keys and values are written first, then the queries
        read the cache's first V slots (V = cache_cos's length) under mask [B,T,V];
        returns (out, (k, v)) the updated cache. Reading after writing keeps a decode loop from
        copying the cache it carries (a buffer read and then updated in one step is copied)."""
        q, k_own, k_raw, v = self.project(x, cos, sin)
        if self.is_memory and q_scale is not None:
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        # A memory layer caches un-rotated keys (its cache moves to memory, where `as_first` wants
        # them un-rotated) and rotates them at use; other layers cache rotated keys (slot j holds
        # position j either way), which saves rotating the whole cache every generated token.
        k_cache = k_raw if self.is_memory else k_own
        if cache is not None:
            rows, slots = write
            ck = cache[0].at[rows, slots].set(k_cache.astype(cache[0].dtype), mode="drop")
            cv = cache[1].at[rows, slots].set(v.astype(cache[1].dtype), mode="drop")
            view = cache_cos.shape[0]
            rk = ck[:, :view]
            rk = apply_rope(rk, cache_cos, cache_sin) if (self.use_rope and self.is_memory) else rk
            keys, vals = rk.astype(k_own.dtype), cv[:, :view]
            kept = (ck, cv)
        else:
            keys, vals = k_own, v
            kept = (k_cache, v)
        memory = gate = None
        if self.is_memory and memory_fn is not None:
            b, t, h, d = q.shape
            hkv = k_raw.shape[2]
            qm = jnp.transpose(q.reshape(b, t, hkv, h // hkv, d), (0, 2, 3, 1, 4)).reshape(b, hkv, -1, d)
            memory = memory_fn(qm)
            if hasattr(self, "mem_gate"):
                gate = self.mem_gate[...]
        out = memory_attention(q, keys, vals, mask, memory, gate)
        return _dense(out, self.o_proj[...].astype(self.dtype)), kept


class DecoderLayer(nnx.Module):
    def __init__(self, m, layer_index: int, rngs):
        pd = jnp.dtype(m.param_dtype)
        self.input_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, pd)
        self.self_attn = Attention(m, layer_index, rngs)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, pd)
        self.mlp = MLP(m, rngs)

    def __call__(self, x, cos, sin, segment_ids, crossbatch, r):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, crossbatch, r)
        h = constrain(h, ("batch", "length", "embed"))
        out = h + self.mlp(self.post_attention_layernorm(h))
        return constrain(out, ("batch", "length", "embed"))


class Llama(nnx.Module):
    """Decoder-only LM. `__call__(tokens [B,T]) -> logits [B,T,V_padded]` (float32); logits of the
    padding rows of the vocabulary are PADDED_VOCAB_LOGIT so that they take no probability."""

    def __init__(self, m, rngs: nnx.Rngs):
        pd = jnp.dtype(m.param_dtype)
        self.config = m
        vp = config_lib.padded_vocab(m)
        self.embed_tokens = _param(rngs, (vp, m.hidden_size), ("vocab", "embed"), m.init_std, pd)
        self.layers = nnx.List([DecoderLayer(m, i, rngs) for i in range(m.num_layers)])
        self.norm = RMSNorm(m.hidden_size, m.rms_norm_eps, pd)
        if not m.tie_embeddings:
            self.lm_head = _param(rngs, (m.hidden_size, vp), ("embed", "vocab"), m.init_std, pd)
        # Padding rows (ids >= vocab_size) are never read nor predicted: zero them, so that they carry
        # no random numbers and an HF export (unpadded) followed by an import is exact.
        real = (jnp.arange(vp) < m.vocab_size).astype(pd)
        self.embed_tokens[...] = self.embed_tokens[...] * real[:, None]
        if not m.tie_embeddings:
            self.lm_head[...] = self.lm_head[...] * real[None, :]
        self.vocab_size = m.vocab_size
        self.dtype = jnp.dtype(m.dtype)
        self.remat = m.remat

    def __call__(self, tokens, *, positions=None, segment_ids=None,
                 crossbatch: CrossbatchSpec | None = None, crossbatch_range=None):
        """Training forward: logits [B,T,V_padded] (float32)."""
        return self.forward(tokens, positions, segment_ids=segment_ids, crossbatch=crossbatch,
                            crossbatch_range=crossbatch_range)[1]

    def forward(self, tokens, positions=None, *, segment_ids=None, crossbatch: CrossbatchSpec | None = None,
                crossbatch_range=None, inference: bool = False, cache=None, cache_slots=None,
                cache_view: int | None = None, memory_fns=None, keys_through_layer: int | None = None,
                memory_scale=None):
        """The decoder, for training and for inference: `(kv, logits)`.

        tokens, positions [B,T] (RoPE positions; default 0..T-1). Training (`inference=False`): each
        layer attends within its row (document mask: segment_ids [B,T]) and memory layers across the
        batch (`crossbatch`, range `crossbatch_range`); layer runs are scanned; kv is None.
        Inference: cache per layer (k, v) [B,S,Hkv,D] or None, slot j holding position j (keys
        un-rotated in memory layers, rotated in the others); cache_slots [B,T]: where each new token
        is written (>= S: dropped), which is its position; a new token at position p then sees the
        cache slots up to p (cache_view: only the first cache_view slots are read, none beyond them
        may be needed); memory_fns per layer q [B,Hkv,G*T,D] -> memory partial sums (memory layers)
        or None. kv holds per layer the updated cache (k, v), or, without a cache, the (k, v)
        [B,T,Hkv,D] of the new tokens as a cache stores them. With `keys_through_layer` L, the pass
        stops once layer L's keys and values are known (what memory stores depends on nothing
        above) and logits is None. memory_scale [B,T]: multiplies the memory layers' queries
        (`memory.logn_base`). Logits [B,T,V_padded] (float32) otherwise, PADDED_VOCAB_LOGIT on the
        vocabulary's padding rows.
        """
        m = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(positions, config_lib.head_dim(m), m.rope_theta)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if inference:
            x, kv = self._inference_layers(x, positions, cos, sin, cache, cache_slots, cache_view, memory_fns,
                                           keys_through_layer, memory_scale)
            if x is None:
                return kv, None
        else:
            x, kv = self._training_layers(x, cos, sin, segment_ids, crossbatch, crossbatch_range), None
        x = self.norm(x)
        head = (
            self.embed_tokens[...].astype(self.dtype).T
            if m.tie_embeddings
            else self.lm_head[...].astype(self.dtype)
        )
        logits = constrain(_dense(x, head, jnp.float32), ("batch", "length", "vocab"))
        vocab_ids = jnp.arange(logits.shape[-1])
        return kv, jnp.where(vocab_ids < self.vocab_size, logits, PADDED_VOCAB_LOGIT)

    def _training_layers(self, x, cos, sin, segment_ids, crossbatch, r):
        def run_layer(layer, x, cos, sin, segment_ids, r):
            return layer(x, cos, sin, segment_ids, crossbatch, r)

        if self.remat != Remat.NONE:
            run_layer = nnx.remat(run_layer, policy=REMAT_POLICIES[self.remat])
        for start, end in layer_runs(self.config):
            if self.config.scan_layers and end - start > 1:
                x = self._scan(self.layers[start:end], x, cos, sin, segment_ids, crossbatch, r)
            else:
                for layer in self.layers[start:end]:
                    x = run_layer(layer, x, cos, sin, segment_ids, r)
        return x

    def _inference_layers(self, x, positions, cos, sin, cache, cache_slots, cache_view, memory_fns,
                          keys_through_layer, memory_scale=None):
        m = self.config
        b, t = x.shape[:2]
        write = None
        if cache is not None and cache[0] is not None:
            view = cache_view or cache[0][0].shape[1]
            cache_cos, cache_sin = rope_cos_sin(jnp.arange(view), config_lib.head_dim(m), m.rope_theta)
            mask = jnp.arange(view)[None, None, :] <= positions[:, :, None]
            write = (jnp.broadcast_to(jnp.arange(b)[:, None], (b, t)), cache_slots)
        else:
            cache_cos = cache_sin = None
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        new_kv = []
        for i, layer in enumerate(self.layers):
            h_in = layer.input_layernorm(x)
            if keys_through_layer is not None and i == keys_through_layer:
                _, _, k_raw, v = layer.self_attn.project(h_in, cos, sin)
                new_kv.append((k_raw, v))
                return None, new_kv
            layer_cache = None if cache is None else cache[i]
            fn = None if memory_fns is None else memory_fns[i]
            attn, kept = layer.self_attn.infer(
                h_in, cos, sin, layer_cache, cache_cos, cache_sin, mask, fn, memory_scale, write
            )
            h = x + attn
            x = h + layer.mlp(layer.post_attention_layernorm(h))
            new_kv.append(kept)
        return x, new_kv

    def _scan(self, layers, x, cos, sin, segment_ids, crossbatch, r):
        """Layers of one structure as one `lax.scan` over their parameters stacked along a leading
        `layers` axis (the body is traced once, whatever the depth; remat applies inside it)."""
        graphdef, _ = nnx.split(layers[0])
        states = [nnx.split(layer)[1] for layer in layers]

        def stack(*vs):
            value = jnp.stack([v[...] for v in vs])
            return vs[0].replace(constrain(value, ("layers",) + tuple(vs[0].logical_axes)))
        stacked = jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable))

        def body(x, state):
            return nnx.merge(graphdef, state)(x, cos, sin, segment_ids, crossbatch, r), None

        if self.remat != Remat.NONE:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        # Layers a scan runs per loop trip (`model.scan_unroll`; 0: 1 on accelerators, where the
        # program stays one layer deep, and every layer on CPU, where XLA runs a rolled loop ~10%
        # slower), decided when traced
        unroll = self.config.scan_unroll or (1 if kernels.platform_of() != "cpu" else len(layers))
        x, _ = jax.lax.scan(body, x, stacked, unroll=min(unroll, len(layers)))
        return x


def layer_runs(m) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive layers with one structure (memory layers and the others
    differ); with `model.scan_layers` a run of two or more is one scan."""
    runs = []
    for i in range(m.num_layers):
        memory = i in list(m.mem_layers)
        if runs and runs[-1][2] == memory:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, memory])
    return [(a, b) for a, b, _ in runs]


def create(m, seed: int = 0) -> Llama:
    return Llama(m, nnx.Rngs(params=seed))


def abstract_model(cfg):
    """(graphdef, abstract params) of `cfg.model` without allocating anything."""
    model = nnx.eval_shape(lambda: create(cfg.model, cfg.train.seed))
    return nnx.split(model, nnx.Param)
