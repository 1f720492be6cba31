"""LLaMA decoder with FoT memory layers (Flax NNX).

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `norm`); `fot_jax.parallel.mesh` turns those into shardings. Parameter names follow
the HF LLaMA layout so that conversion is a rename plus reshape.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.config import MemAttention, PositionalMode, QkNorm, Remat
from fot_jax.model import kernels, layout
from fot_jax.model.attention import Crossbatch, CrossbatchSpec, crossbatch_attention, memory_attention
from fot_jax.model.cache import Cache, LayerCache, Output
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
        self.rope_theta = m.rope_theta
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

    def __call__(self, x, positions, *, cache: LayerCache | None = None, memory=None,
                 crossbatch: Crossbatch | None = None, rope=None):
        """x [B,T,E] at positions [B,T] -> (out [B,T,E], cache).

        Without a cache the tokens attend causally within their row, through the configured
        attention backend; `crossbatch` (training) adds the document mask and, in a memory layer,
        the earlier rows of the batch. The returned cache is the new tokens' (k, v) as a cache
        stores them. With a cache (a LayerCache read through `view` slots), the new keys and values
        are written first at their positions (>= capacity: dropped), then the queries read the
        cache's first `view` slots, slot j visible to a query at position p when j <= p; the
        returned cache is the updated one. Reading after writing keeps a decode loop from copying
        the cache it carries (a buffer read and then updated in one step is copied).

        `memory` (a memory layer's MemoryView, or None): the queries, multiplied by its log-n scale,
        also read their top-k memory entries in the same softmax (or, with a gate, mixed by it).
        `rope` (cos, sin) of `positions` when the caller has them (one table for every layer)."""
        if crossbatch is not None and (cache is not None or memory is not None):
            raise ValueError("a call with crossbatch (training) takes no cache or memory")
        cos, sin = rope if rope is not None else rope_cos_sin(positions, self.head_dim, self.rope_theta)
        q, k_own, k_raw, v = self.project(x, cos, sin)
        # A memory layer caches un-rotated keys (its cache moves to memory, where `as_first` wants
        # them un-rotated) and rotates them at use; other layers cache rotated keys (slot j holds
        # position j either way), which saves rotating the whole cache every generated token.
        k_cache = k_raw if self.is_memory else k_own
        if memory is not None and not self.is_memory:
            memory = None
        if cache is None and memory is None:
            cb = crossbatch or Crossbatch(CrossbatchSpec(range_max=0))
            cb = cb.for_layer(self.is_memory)
            out = crossbatch_attention(q, k_own, k_raw, v, spec=cb.spec, r=cb.r, segment_ids=cb.segment_ids,
                                       kernel=kernels.options(*self.attention))
            out = constrain(out, ("batch", "length", "heads", "head_dim"))
            return _dense(out, self.o_proj[...].astype(self.dtype)), LayerCache(k_cache, v)
        if memory is not None and memory.scale is not None:
            q = q * memory.scale[:, :, None, None].astype(q.dtype)
        if cache is not None:
            cache = cache.write(k_cache, v, positions)
            keys, vals = cache.read(view := cache.view_slots)
            if self.use_rope and self.is_memory:
                ccos, csin = rope_cos_sin(jnp.arange(view), self.head_dim, self.rope_theta)
                keys = apply_rope(keys, ccos, csin)
            keys = keys.astype(k_own.dtype)
            mask = jnp.arange(view)[None, None, :] <= positions[:, :, None]
            new_cache = cache
        else:
            keys, vals = k_own, v
            t = x.shape[1]
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (x.shape[0], t, t))
            new_cache = LayerCache(k_cache, v)
        partial = gate = None
        if memory is not None:
            b, t, h, d = q.shape
            hkv = k_raw.shape[2]
            qm = jnp.transpose(q.reshape(b, t, hkv, h // hkv, d), (0, 2, 3, 1, 4)).reshape(b, hkv, -1, d)
            partial = memory.read(qm)
            if hasattr(self, "mem_gate"):
                gate = self.mem_gate[...]
        out = memory_attention(q, keys, vals, mask, partial, gate)
        return _dense(out, self.o_proj[...].astype(self.dtype)), new_cache


class DecoderLayer(nnx.Module):
    def __init__(self, m, layer_index: int, rngs):
        pd = jnp.dtype(m.param_dtype)
        self.input_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, pd)
        self.self_attn = Attention(m, layer_index, rngs)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, pd)
        self.mlp = MLP(m, rngs)

    def __call__(self, x, positions, *, cache: LayerCache | None = None, memory=None,
                 crossbatch: Crossbatch | None = None, rope=None):
        """x [B,T,E] -> (out [B,T,E], cache): see `Attention.__call__`."""
        attn, new_cache = self.self_attn(self.input_layernorm(x), positions, cache=cache, memory=memory,
                                         crossbatch=crossbatch, rope=rope)
        h = constrain(x + attn, ("batch", "length", "embed"))
        out = h + self.mlp(self.post_attention_layernorm(h))
        return constrain(out, ("batch", "length", "embed")), new_cache


def _restacked(variable, value, axes):
    return variable.replace(value, **{**variable.get_metadata(), "logical_axes": tuple(axes)})


class LayerStack(nnx.Module):
    """A run of `count` decoder layers of one structure, from layer `start`: one DecoderLayer whose
    parameters carry a leading `layers` axis. Training and inference scan it (the body is traced
    once, whatever the depth); `at(j)` is layer start + j as a module of its own."""

    def __init__(self, m, start: int, count: int, rngs):
        layers = [DecoderLayer(m, start + j, rngs) for j in range(count)]
        graphdef, _ = nnx.split(layers[0])
        states = [nnx.split(layer)[1] for layer in layers]

        def stack(*vs):
            return _restacked(vs[0], jnp.stack([v[...] for v in vs]), ("layers",) + tuple(vs[0].logical_axes))
        self.layer = nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))
        self.start, self.count = start, count

    def parts(self):
        """(graphdef, state) of the stacked layer: the state's arrays are [count, ...]."""
        return nnx.split(self.layer)

    def at(self, j: int) -> DecoderLayer:
        """Layer start + j (its parameters are slices of the stacked ones)."""
        graphdef, state = self.parts()
        return nnx.merge(graphdef, jax.tree.map(
            lambda v: _restacked(v, v[...][j], tuple(v.logical_axes)[1:]), state, is_leaf=_is_variable))


def _is_variable(v):
    return isinstance(v, nnx.Variable)


class Llama(nnx.Module):
    """Decoder-only LM: `model(tokens, ...) -> Output(logits [B,T,V_padded] float32, cache)`;
    logits of the padding rows of the vocabulary are PADDED_VOCAB_LOGIT so that they take no
    probability. Layers are stored in `stacks`, one LayerStack per run of one structure
    (`layer_runs`); `split_at` adds run boundaries (where `train.trainable` changes, so that a
    parameter is either trained or frozen as a whole)."""

    def __init__(self, m, rngs: nnx.Rngs, split_at=()):
        pd = jnp.dtype(m.param_dtype)
        self.config = m
        vp = config_lib.padded_vocab(m)
        self.embed_tokens = _param(rngs, (vp, m.hidden_size), ("vocab", "embed"), m.init_std, pd)
        self.stacks = nnx.List([LayerStack(m, a, b - a, rngs) for a, b in layer_runs(m, split_at)])
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

    @property
    def run_counts(self) -> tuple:
        """Layers per stored run, in order (the layout of `Cache.empty`)."""
        return tuple(s.count for s in self.stacks)

    @property
    def layers(self) -> list:
        """Every layer as a module of its own (slices of the stacked parameters: for reading, e.g.
        by evaluations that look inside a layer; writing to them changes nothing)."""
        return [s.at(j) for s in self.stacks for j in range(s.count)]

    def empty_cache(self, batch: int, capacity: int | None = None, dtype=None, sharding=None) -> Cache:
        """A zero local cache for `batch` rows of `capacity` slots (default: the window)."""
        m = self.config
        return Cache.empty(self.run_counts, batch, capacity or m.max_position_embeddings, m.num_kv_heads,
                           config_lib.head_dim(m), dtype or self.dtype, sharding)

    def __call__(self, tokens, positions=None, *, segment_ids=None, crossbatch: CrossbatchSpec | None = None,
                 crossbatch_range=None, cache: Cache | None = None, memory=None,
                 keys_through_layer: int | None = None, layers: list | None = None) -> Output:
        """The decoder, for training and for inference.

        tokens, positions [B,T] (RoPE positions; default 0..T-1). Training (no cache, no memory):
        each layer attends within its row (document mask: segment_ids [B,T]) and memory layers
        across the batch (`crossbatch`, range `crossbatch_range`); the output's cache is None.
        Inference: `cache` (a Cache laid out as `empty_cache` makes it, its layers read through
        their `view` slots) takes the new tokens at their positions (a position >= its capacity
        drops a token: padding) and comes back updated and advanced; without one, the output's
        cache holds the new tokens' keys and values. `memory` (a `fot_jax.memory.view.Memory`):
        memory layers also read their stores. With `keys_through_layer` L, the pass stops once
        layer L's keys and values are known (what memory stores depends on nothing above) and
        logits is None. Runs of two or more layers are scanned (`model.scan_layers`) in every
        use; a run whose layers read memory runs layer by layer (each reads its own store).
        `layers`: this model's `model.layers` (sliced once by a caller that decodes many tokens, the
        runtime), with a cache of one run a layer (`Cache.empty((1,) * num_layers, ...)`): the call
        runs layer by layer on them. A loop trip that slices a stacked parameter or writes one
        layer of a stacked cache copies it (XLA:CPU), which costs a one-token decode step more
        than its arithmetic.
        """
        m = self.config
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = rope_cos_sin(positions, config_lib.head_dim(m), m.rope_theta)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if cache is None and memory is None and keys_through_layer is None:
            spec = crossbatch if crossbatch is not None else CrossbatchSpec(range_max=0)
            x = self._training_layers(x, positions, rope, Crossbatch(spec, crossbatch_range, segment_ids))
            return Output(self._head(x), None)
        views = memory.views(positions, m.num_layers) if memory is not None else [None] * m.num_layers
        if layers is not None:
            if keys_through_layer is not None:
                raise ValueError("layers= and keys_through_layer are not used together")
            return self._by_layer(x, positions, rope, cache, views, layers)
        if cache is not None and cache.counts != self.run_counts:
            raise ValueError(f"a cache of runs {cache.counts} does not fit a model of runs {self.run_counts} "
                             "(make it with model.empty_cache)")
        views = memory.views(positions, m.num_layers) if memory is not None else [None] * m.num_layers
        new = []
        for s, stack in enumerate(self.stacks):
            run_cache = None if cache is None else cache.layers[s]
            here = range(stack.start, stack.start + stack.count)
            stop = keys_through_layer in here
            reads_memory = any(views[i] is not None for i in here)
            if m.scan_layers and stack.count > 1 and not stop and not reads_memory:
                x, run_cache = self._scan_inference(stack, x, positions, rope, run_cache)
                new.append(run_cache)
                continue
            outs = []
            for j in range(stack.count):
                layer = stack.at(j)
                if here[j] == keys_through_layer:
                    _, _, k_raw, v = layer.self_attn.project(layer.input_layernorm(x), *rope)
                    outs.append(LayerCache(k_raw, v))
                    new.append(_stack_caches(outs))
                    return Output(None, Cache(tuple(new), None))
                layer_cache = None if run_cache is None else dataclasses.replace(run_cache, index=j)
                x, layer_cache = layer(x, positions, cache=layer_cache, memory=views[here[j]], rope=rope)
                if run_cache is None:
                    outs.append(layer_cache)
                else:
                    run_cache = dataclasses.replace(layer_cache, index=None)
            new.append(_stack_caches(outs) if run_cache is None else run_cache)
        if cache is not None:
            return self._cached_output(x, positions, cache, new)
        return Output(self._head(x), Cache(tuple(new), None))

    def _by_layer(self, x, positions, rope, cache, views, layers):
        """Inference layer by layer on pre-sliced `layers`, with a cache of one run a layer."""
        m = self.config
        if len(layers) != m.num_layers:
            raise ValueError(f"layers: {len(layers)} modules for a model of {m.num_layers} layers "
                             "(model.layers)")
        if cache is None or cache.counts != (1,) * m.num_layers:
            raise ValueError("layers= runs with a cache of one run a layer "
                             f"(Cache.empty((1,) * num_layers, ...)), got {cache and cache.counts}")
        new = []
        for i, layer in enumerate(layers):
            lc = dataclasses.replace(cache.layers[i], index=0)
            x, lc = layer(x, positions, cache=lc, memory=views[i], rope=rope)
            new.append(dataclasses.replace(lc, index=None))
        return self._cached_output(x, positions, cache, new)

    def _cached_output(self, x, positions, cache, new) -> Output:
        """The logits and the cache of a call that wrote `new` (its LayerCaches) at `positions`."""
        written = jnp.sum(positions < cache.capacity, axis=1, dtype=jnp.int32)
        return Output(self._head(x), Cache(tuple(new), cache.length).advance(written))

    def _head(self, x):
        m = self.config
        x = self.norm(x)
        head = (
            self.embed_tokens[...].astype(self.dtype).T
            if m.tie_embeddings
            else self.lm_head[...].astype(self.dtype)
        )
        logits = constrain(_dense(x, head, jnp.float32), ("batch", "length", "vocab"))
        vocab_ids = jnp.arange(logits.shape[-1])
        return jnp.where(vocab_ids < self.vocab_size, logits, PADDED_VOCAB_LOGIT)

    def _training_layers(self, x, positions, rope, crossbatch):
        def run_layer(layer, x, positions, rope, crossbatch):
            return layer(x, positions, crossbatch=crossbatch, rope=rope)[0]

        if self.remat != Remat.NONE:
            run_layer = nnx.remat(run_layer, policy=REMAT_POLICIES[self.remat])
        for stack in self.stacks:
            if self.config.scan_layers and stack.count > 1:
                x = self._scan(stack, x, positions, rope, crossbatch)
            else:
                for j in range(stack.count):
                    x = run_layer(stack.at(j), x, positions, rope, crossbatch)
        return x

    def _unroll(self, count: int, training: bool) -> int:
        """Layers a scan runs per loop trip: `model.scan_unroll`, or when 0, decided when traced:
        1 on accelerators (the program stays one layer deep) and in CPU inference (compile time
        stays flat in depth); every layer in CPU training, where XLA runs a rolled loop ~10% slower."""
        unroll = self.config.scan_unroll or (count if training and kernels.platform_of() == "cpu" else 1)
        return min(unroll, count)

    def _scan(self, stack, x, positions, rope, crossbatch):
        """Training: one `lax.scan` over the run's stacked parameters (remat inside the body)."""
        graphdef, state = stack.parts()

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, positions, crossbatch=crossbatch, rope=rope)[0], None

        if self.remat != Remat.NONE:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, state, unroll=self._unroll(stack.count, True))
        return x

    def _scan_inference(self, stack, x, positions, rope, run_cache):
        """Inference: one `lax.scan` over the run's layers. With a cache, the run's stacked cache is
        carried and each trip writes and reads its layer's slots in place; without one, each trip
        emits its layer's new keys and values (stacked by the scan)."""
        graphdef, state = stack.parts()
        indices = jnp.arange(stack.count, dtype=jnp.int32)
        unroll = self._unroll(stack.count, False)
        if run_cache is None:
            def fresh(x, layer_state):
                return nnx.merge(graphdef, layer_state)(x, positions, rope=rope)
            return jax.lax.scan(fresh, x, state, unroll=unroll)

        def cached(carry, xs):
            x, k, v = carry
            layer_state, j = xs
            lc = LayerCache(k, v, run_cache.view, j)
            x, lc = nnx.merge(graphdef, layer_state)(x, positions, cache=lc, rope=rope)
            return (x, lc.k, lc.v), None
        (x, k, v), _ = jax.lax.scan(cached, (x, run_cache.k, run_cache.v), (state, indices), unroll=unroll)
        return x, LayerCache(k, v, run_cache.view)


def _stack_caches(caches) -> LayerCache:
    """Per-layer caches of new tokens -> one stacked LayerCache."""
    return LayerCache(jnp.stack([c.k for c in caches]), jnp.stack([c.v for c in caches]))


def layer_runs(m, split_at=()) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive layers with one structure (memory layers and the others
    differ), also split before each layer in `split_at`; each run is stored stacked and, with
    `model.scan_layers`, a run of two or more is one scan."""
    runs = []
    for i in range(m.num_layers):
        memory = i in list(m.mem_layers)
        if runs and runs[-1][2] == memory and i not in split_at:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, memory])
    return [(a, b) for a, b, _ in runs]


def create(m, seed: int = 0, split_at=()) -> Llama:
    return Llama(m, nnx.Rngs(params=seed), split_at)


def from_config(cfg) -> Llama:
    """The model of a run's config: `cfg.model`, initialised from `cfg.train.seed`, its runs split
    where `cfg.train.trainable` changes."""
    return create(cfg.model, cfg.train.seed, layout.trainable_splits(cfg.model, list(cfg.train.trainable)))


def abstract_model(cfg):
    """(graphdef, abstract params) of `from_config(cfg)` without allocating anything."""
    model = nnx.eval_shape(lambda: from_config(cfg))
    return nnx.split(model, nnx.Param)
