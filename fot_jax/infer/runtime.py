"""Long input with memory, and generation: LongLLaMA windowing (docs/architecture.md, "Long inputs
with memory").

A `MemoryRuntime` holds, for a batch of B rows, one `MemoryStore` per memory layer, a local cache
per layer (`[B, W, Hkv, D]`, slot j at position j) and per-row counters. Given row b's `L` tokens,
window `W` and `last_context_length` `C`:
  - the first `P = max(L - C, 0)` tokens go through windows `[0, W), [W, 2W), ...` up to `P`; each
    window attends causally to itself only (positions restart at 0), memory layers also read memory,
    and then the window's memory-layer keys/values are written to memory;
  - the last `L - P` tokens extend the local cache (positions continue in it). Before an extension
    that would take the cache beyond `W`, the whole cache moves to memory and the cache restarts
    at position 0. Generation extends the cache one token at a time by the same rule.
Rows advance together; shorter rows are padded, and padding is never written anywhere.

Every step is one jitted program per input shape (`[B, W]` windows, `[B, Tc]` tail pieces,
`[B, 1]` generation), reused as memory fills; the runtime state is donated into each call. With a
single memory layer, windows whose logits nobody reads are independent of each other (nothing
below that layer reads memory), so they run in groups of up to INGEST_GROUP windows a call.
`mark()` / `rewind(mark)` take rows back to an earlier point of their documents while the tokens
after it are still in the local cache (several questions about one long document, each read
and answered on top of the same memory).
In `single_doc` mode memory and cache are cleared for each new document; in `multi_doc` mode the
previous document's cache moves to memory and memory is kept.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.errors import FotError
from fot_jax.memory import store as store_lib
from fot_jax.memory.view import Lookup, Memory
from fot_jax.model.cache import Cache


class MemoryRuntimeError(FotError, ValueError):
    pass


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RuntimeState:
    memory: Memory         # one store per memory layer
    cache: Cache           # the local cache, [B, W, Hkv, D] per layer, and each row's length
    doc_pos: jax.Array     # [B] int32 tokens of the current document seen so far
    doc_id: jax.Array      # [B] int32


_DEFAULTS = config_lib.base_config()      # the schema's defaults are the only ones


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """The `memory` section (and the model's inference fields) as the runtime reads them; built
    from a config by `from_config`, its defaults are the schema's."""
    top_k: int = _DEFAULTS.memory.top_k
    capacity: int = _DEFAULTS.memory.capacity
    mode: str = _DEFAULTS.memory.mode
    overflow: str = _DEFAULTS.memory.overflow
    search: str = _DEFAULTS.memory.search
    recall_target: float = _DEFAULTS.memory.recall_target
    chunk: int = _DEFAULTS.memory.chunk
    dtype: str = _DEFAULTS.model.mem_dtype
    last_context_length: int = _DEFAULTS.model.last_context_length
    logn_base: int = _DEFAULTS.memory.logn_base

    @classmethod
    def from_config(cls, cfg):
        mem = cfg.memory
        return cls(top_k=mem.top_k, capacity=mem.capacity, mode=mem.mode, overflow=mem.overflow,
                   search=mem.search, recall_target=mem.recall_target, chunk=mem.chunk,
                   dtype=cfg.model.mem_dtype, last_context_length=cfg.model.last_context_length,
                   logn_base=mem.logn_base)

    def check(self, window: int):
        if self.logn_base != 0 and self.logn_base < 2:
            raise MemoryRuntimeError(f"memory.logn_base must be 0 (off) or at least 2, got {self.logn_base}")
        if self.search != "dense" and self.top_k <= 0:
            raise MemoryRuntimeError(f"memory.top_k must be positive, got {self.top_k}")
        if self.capacity < window:
            raise MemoryRuntimeError(f"memory.capacity {self.capacity} is smaller than one window ({window} "
                                     "tokens, model.max_position_embeddings)")
        if self.dtype not in store_lib.STORE_DTYPES:
            raise MemoryRuntimeError(f"memory dtype '{self.dtype}' is not supported; use one of "
                                     f"{sorted(store_lib.STORE_DTYPES)}")
        for field, value, allowed in (("mode", self.mode, config_lib.MEMORY_MODES),
                                      ("overflow", self.overflow, config_lib.OVERFLOW_POLICIES),
                                      ("search", self.search, config_lib.SEARCH_MODES)):
            if value not in allowed:
                raise MemoryRuntimeError(f"memory.{field} '{value}' is not one of {allowed}")
        if self.last_context_length <= 0:
            raise MemoryRuntimeError("last_context_length must be positive")


def store_bytes(model_config, batch: int, capacity: int, dtype: str) -> int:
    """Bytes of a runtime's memory stores: keys and values [B, Hkv, N, D] per memory layer, and
    positions and document ids [B, N] (int32)."""
    m = model_config
    per_token = 2 * m.num_kv_heads * config_lib.head_dim(m) * jnp.dtype(dtype).itemsize + 8
    return batch * capacity * per_token * len(m.mem_layers)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_store_fits(total: int, shards: int, platform: str, device_bytes: int | None, host_bytes: int,
                     what: str = "") -> None:
    """Refuses stores of `total` bytes that `shards` devices cannot hold (90% of a device's memory
    for them; CPU devices share the host's memory however many shards), saying how many shards or
    hosts they would need."""
    gib = 2 ** 30
    if platform != "cpu" and device_bytes:
        need = -(-total // int(0.9 * device_bytes))
        if need > shards:
            raise MemoryRuntimeError(
                f"{what}memory stores of {total / gib:.1f} GiB do not fit {shards} {platform} device(s) of "
                f"{device_bytes / gib:.1f} GiB: they need at least {need} memory shards "
                f"(--memory-shards {1 << (need - 1).bit_length()})")
    elif total > 0.9 * host_bytes:
        hosts = -(-total // int(0.9 * host_bytes))
        raise MemoryRuntimeError(
            f"{what}memory stores of {total / gib:.1f} GiB do not fit this host's {host_bytes / gib:.1f} GiB "
            f"(its CPU devices share it however many shards): they need the memory of at least {hosts} "
            "hosts, e.g. memory shards over the devices of that many hosts or accelerators")


DECODE_BLOCK = 64   # tokens decoded on the device per call
INGEST_GROUP = 16   # windows per call when windows are independent (one memory layer, no logits)
CACHE_VIEW_MIN = 256  # smallest cache prefix a step reads (views are powers of two up to the window)


class MemoryRuntime:
    """Ingest, extend and generate for a batch of `batch` rows with a model's memory layers."""

    def __init__(self, model, batch: int, settings: MemorySettings, mesh=None, memory_axis: str = "memory"):
        m = model.config
        self.window = m.max_position_embeddings
        settings.check(self.window)
        # A model without memory layers runs the same windowing: only the local cache (the last
        # `last_context_length` tokens, and what generation adds within a window) is seen.
        if batch <= 0:
            raise MemoryRuntimeError(f"batch must be positive, got {batch}")
        self.model_config, self.settings, self.batch = m, settings, batch
        self.mesh, self.memory_axis = mesh, memory_axis
        self.mem_layers = list(m.mem_layers)
        shards = mesh.shape.get(memory_axis, 1) if mesh is not None else 1
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
        check_store_fits(store_bytes(m, batch, settings.capacity, settings.dtype), shards, device.platform,
                         limit, host_memory_bytes(),
                         what=f"{batch} row(s) x {settings.capacity:,} tokens of memory: ")
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        # Everything the steps take is committed to one placement (parameters replicated over the
        # mesh that holds the stores, or the first device): a program's inputs then always match its
        # outputs, and no call compiles a second program for differently placed inputs.
        self._home = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
                      else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        self.params = jax.device_put(self.params, self._home)
        # Steps with a cache (extend, decode) run layer by layer on every layer's parameters sliced
        # from their stacks once, here, with a cache of one run a layer: a slice of a stack inside
        # the decode loop is copied on every token (a SmolLM2 decode step costs 2.4x on CPU
        # with the stacks). Windows without a cache scan the stacks.
        split = [nnx.split(layer, nnx.Param) for layer in model.layers]
        self.layer_graphdefs = [g for g, _ in split]
        self.layer_params = jax.device_put([p for _, p in split], self._home)
        self.kv_heads, self.head_dim = m.num_kv_heads, config_lib.head_dim(m)
        self.tail = min(settings.last_context_length, self.window)
        self.state = self._empty_state()
        self._window_fn = jax.jit(self._window_step, donate_argnums=1, static_argnums=4)
        self._extend_fn = jax.jit(self._extend_step, donate_argnums=1, static_argnums=4)
        self._flush_fn = jax.jit(self._flush_step, donate_argnums=0)
        self._reset_fn = jax.jit(self._reset_step, donate_argnums=0)
        self._group_fn = jax.jit(self._group_step, donate_argnums=1)
        self._rewind_fn = jax.jit(self._rewind_step, donate_argnums=0)
        self._decode_fn = jax.jit(self._decode_step, donate_argnums=1, static_argnums=(7, 8, 9))

    # -- state --------------------------------------------------------------------------------
    def _empty_state(self) -> RuntimeState:
        s, b, m = self.settings, self.batch, self.model_config
        lookup = Lookup(top_k=s.top_k, search=s.search, chunk=s.chunk, recall_target=s.recall_target,
                        logn_base=s.logn_base, mesh=self.mesh, memory_axis=self.memory_axis)
        memory = Memory.create(self.mem_layers, lookup, b, self.kv_heads, s.capacity, self.head_dim, s.dtype)
        if self.mesh is None:
            memory = jax.device_put(memory, self._home)
        # distinct buffers (the state is donated), committed like the parameters
        cache = Cache.empty((1,) * m.num_layers, b, self.window, self.kv_heads, self.head_dim,
                            jnp.dtype(m.dtype), sharding=self._home)
        counters = jax.device_put({k: np.zeros(b, np.int32) for k in ("doc_pos", "doc_id")}, self._home)
        return RuntimeState(memory=memory, cache=cache, **counters)

    @property
    def cache_len(self) -> np.ndarray:
        """[B] tokens in each row's local cache (read from the device)."""
        return np.asarray(self.state.cache.length).astype(np.int64)

    @property
    def doc_pos(self) -> np.ndarray:
        """[B] tokens of each row's current document read so far (read from the device)."""
        return np.asarray(self.state.doc_pos).astype(np.int64)

    # -- jitted steps -------------------------------------------------------------------------
    def _window_step(self, params, state: RuntimeState, tokens, n_valid, return_logits: bool):
        model = nnx.merge(self.graphdef, params)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Without logits, only the layers up to the last memory layer matter (what is written to
        # memory does not depend on anything above it): an exact shortcut for long ingests.
        if not return_logits and not self.mem_layers:  # nothing of this window is ever seen again
            return dataclasses.replace(state, doc_pos=state.doc_pos + n_valid), None
        last = None if return_logits else max(self.mem_layers)
        out = model(tokens, positions, memory=state.memory, keys_through_layer=last)
        mask = positions < n_valid[:, None]
        doc_positions = state.doc_pos[:, None] + positions
        doc_ids = jnp.broadcast_to(state.doc_id[:, None], (b, t))
        memory = state.memory.write([(c.k, c.v) for c in map(out.cache.layer, self.mem_layers)],
                                    doc_positions, doc_ids, mask)
        state = dataclasses.replace(state, memory=memory, doc_pos=state.doc_pos + n_valid)
        return state, (out.logits if return_logits else None)

    def _group_step(self, params, state: RuntimeState, tokens, n_valid):
        """Windows [B, G*W] -> memory, G windows at once (one memory layer: each window's keys and
        values depend on that window alone). n_valid [B]: tokens of the group that are real."""
        model = nnx.merge(self.graphdef, params)
        b, gt = tokens.shape
        w, layer = self.window, self.mem_layers[0]
        positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b * (gt // w), w))
        windows = tokens.reshape(-1, w)
        shards = self.mesh.shape.get(self.memory_axis, 1) if self.mesh is not None else 1
        if shards > 1 and windows.shape[0] % shards == 0:   # the forward split over the shards' devices
            split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.memory_axis))
            windows = jax.lax.with_sharding_constraint(windows, split)
            positions = jax.lax.with_sharding_constraint(positions, split)
        kv = model(windows, positions, keys_through_layer=layer).cache.layer(layer)
        k, v = (x.reshape(b, gt, *x.shape[2:]) for x in (kv.k, kv.v))
        offsets = jnp.arange(gt, dtype=jnp.int32)[None, :]
        memory = state.memory.write([(k, v)], state.doc_pos[:, None] + offsets,
                                    jnp.broadcast_to(state.doc_id[:, None], (b, gt)),
                                    offsets < n_valid[:, None])
        return dataclasses.replace(state, memory=memory, doc_pos=state.doc_pos + n_valid)

    def _rewind_step(self, state: RuntimeState, drop):
        return dataclasses.replace(state, cache=state.cache.rewound(drop), doc_pos=state.doc_pos - drop)

    def _cache_view(self, needed: int) -> int:
        """The cache prefix a step reads when its rows hold at most `needed` tokens after it: the
        next power of two (at least CACHE_VIEW_MIN, at most the window). A step then costs in
        proportion to the tokens in the cache, not to the window, with one compiled program per
        view size."""
        view = max(CACHE_VIEW_MIN, 1 << max(int(needed) - 1, 0).bit_length())
        return min(view, self.window)

    def _extend_step(self, params, state: RuntimeState, tokens, n_valid, view: int):
        """Appends tokens [B,T] (n_valid [B] of them real) to the caches; every row holds at most
        `view` tokens after it (the step reads only that prefix of the caches). params: (stacked
        parameters, per-layer parameters)."""
        params, layer_params = params
        model = nnx.merge(self.graphdef, params)
        layers = [nnx.merge(g, p) for g, p in zip(self.layer_graphdefs, layer_params)]
        valid = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] < n_valid[:, None]
        out = model(tokens, state.cache.positions(valid), cache=state.cache.reading(view),
                    memory=state.memory, layers=layers)
        state = dataclasses.replace(state, cache=out.cache.reading(0), doc_pos=state.doc_pos + n_valid)
        return state, out.logits

    def _flush_step(self, state: RuntimeState, rows):
        """Moves the cache of the chosen rows [B] to memory and empties it."""
        cache, memory = state.cache.move_to(state.memory, rows, state.doc_pos, state.doc_id)
        return dataclasses.replace(state, cache=cache, memory=memory)

    def _reset_step(self, state: RuntimeState, rows, new_doc):
        return dataclasses.replace(
            state, memory=state.memory.reset(rows), cache=state.cache.emptied(new_doc),
            doc_pos=jnp.where(new_doc, 0, state.doc_pos), doc_id=state.doc_id + new_doc.astype(jnp.int32))

    # -- host API -----------------------------------------------------------------------------
    def reset(self, rows=None):
        """Clears memory and cache of the chosen rows (all by default)."""
        rows = np.ones(self.batch, bool) if rows is None else np.asarray(rows, bool)
        self.state = self._reset_fn(self.state, jnp.asarray(rows), jnp.asarray(rows))

    def _flush(self, rows):
        rows = np.asarray(rows, bool)
        if rows.any():
            self.state = self._flush_fn(self.state, jnp.asarray(rows))

    def _check_tokens(self, docs):
        if len(docs) != self.batch:
            raise MemoryRuntimeError(f"got {len(docs)} documents for a runtime of batch {self.batch} "
                                     "(one document per row)")
        out = []
        vocab = self.model_config.vocab_size
        for i, d in enumerate(docs):
            d = np.asarray(d, np.int32).reshape(-1)
            if d.size and (d.min() < 0 or d.max() >= vocab):
                raise MemoryRuntimeError(f"document {i} has token ids outside [0, {vocab})")
            out.append(d)
        return out

    def ingest(self, docs, return_logits=False, progress=None):
        """Reads one document per row (a new document: single_doc clears memory first). Returns the
        last token's logits per row [B, V] and, with return_logits=True, each row's logits [L_b, V];
        with return_logits="tail", the logits of the last L_b - P_b tokens (the windows before them
        then skip the layers above the last memory layer). `progress(done, total)` is called with
        the windows read so far (computed, not only dispatched) after each call."""
        docs = self._check_tokens(docs)
        s, w, c = self.settings, self.window, self.settings.last_context_length
        lengths = np.array([d.size for d in docs])
        if s.mode == "single_doc" and s.overflow == "strict" and (lengths > s.capacity).any():
            i = int(np.argmax(lengths > s.capacity))
            raise MemoryRuntimeError(
                f"document {i} has {lengths[i]} tokens, more than the memory capacity "
                f"{s.capacity} (memory.overflow='strict'; use 'fifo' to drop the oldest)"
            )
        if (lengths == 0).any():
            raise MemoryRuntimeError(f"document {int(np.argmax(lengths == 0))} is empty")
        if s.mode == "single_doc":
            self.reset()
        else:  # multi_doc: the previous document's cache joins memory; positions restart
            self._flush(self.cache_len > 0)
            rows = jnp.ones(self.batch, bool)
            self.state = self._reset_fn(self.state, jnp.zeros(self.batch, bool), rows)
        prefix = np.maximum(lengths - c, 0)
        tail_only = return_logits == "tail"
        window_logits = bool(return_logits) and not tail_only
        vocab_logits = []
        n_windows = int(math.ceil(prefix.max() / w)) if prefix.max() > 0 else 0
        first = 0
        if not window_logits and len(self.mem_layers) == 1 and n_windows > 1:
            first = self._ingest_groups(docs, prefix, n_windows, progress)
        for j in range(first, n_windows):
            tokens, n_valid = _slice_rows(docs, j * w, np.clip(prefix - j * w, 0, w), w)
            self.state, logits = self._window_fn(self.params, self.state, jnp.asarray(tokens),
                                                 jnp.asarray(n_valid, jnp.int32), window_logits)
            if window_logits:
                vocab_logits.append((np.asarray(logits)[:, :, :self.model_config.vocab_size], n_valid))
            if progress is not None:
                jax.block_until_ready(self.state)
                progress(j + 1, n_windows)
        tails = [d[p:] for d, p in zip(docs, prefix)]
        last, tail_logits = self._extend_all(tails, bool(return_logits))
        if not return_logits:
            return last
        if tail_only:
            return last, tail_logits
        rows = []
        for b in range(self.batch):
            parts = [lg[b, :n[b]] for lg, n in vocab_logits] + [tail_logits[b]]
            rows.append(np.concatenate(parts, axis=0))
        return last, rows

    def _ingest_groups(self, docs, prefix, n_windows, progress=None) -> int:
        """The windows of `prefix` tokens per row in groups (see INGEST_GROUP); returns the number of
        windows read (whole groups; the rest go one by one)."""
        w = self.window
        g = min(INGEST_GROUP, self.settings.capacity // w, 1 << (n_windows.bit_length() - 1))
        groups = n_windows // g
        for j in range(groups):
            tokens, n_valid = _slice_rows(docs, j * g * w, np.clip(prefix - j * g * w, 0, g * w), g * w)
            self.state = self._group_fn(self.params, self.state, jnp.asarray(tokens),
                                        jnp.asarray(n_valid, jnp.int32))
            if progress is not None:
                jax.block_until_ready(self.state)
                progress((j + 1) * g, n_windows)
        return groups * g

    def commit(self) -> None:
        """Moves every row's local cache to memory (as a window would be): what was read so far is
        then only in memory, and what comes next starts a fresh local context. For a document
        that is to be consulted through memory, e.g. before several questions about it."""
        self._flush(self.cache_len > 0)

    def mark(self) -> np.ndarray:
        """Each row's position in its document now, for `rewind`."""
        return self.doc_pos.copy()

    def rewind(self, mark) -> None:
        """Takes each row back to `mark` (from `mark()`): the tokens read or generated since are
        forgotten. Only tokens still in the local cache can be taken back; memory is unchanged."""
        mark = np.asarray(mark, np.int64).reshape(-1)
        if mark.shape != (self.batch,):
            raise MemoryRuntimeError(f"a mark has one position per row ({self.batch}), got {mark.shape}")
        doc_pos = self.doc_pos
        cache_start = doc_pos - self.cache_len
        bad = (mark < cache_start) | (mark > doc_pos)
        if bad.any():
            b = int(np.argmax(bad))
            raise MemoryRuntimeError(
                f"row {b} cannot rewind to position {mark[b]}: its local cache holds positions "
                f"{cache_start[b]}..{doc_pos[b]} (tokens moved to memory, or a new document, "
                "cannot be taken back)")
        self.state = self._rewind_fn(self.state, jnp.asarray(doc_pos - mark, jnp.int32))

    def _extend_all(self, pieces, keep_logits):
        """Extends each row's cache with its tokens, in pieces of at most `tail` tokens, moving a
        row's cache to memory before a piece that would overflow it. Returns the last logits [B, V]."""
        pieces = [np.asarray(p, np.int32) for p in pieces]
        done = np.zeros(self.batch, np.int64)
        lengths = np.array([p.size for p in pieces])
        last = np.zeros((self.batch, self.model_config.vocab_size), np.float32)
        collected = [[] for _ in range(self.batch)]
        while (done < lengths).any():
            # pieces of at most `tail` tokens, padded to a power of two: a short prompt runs a short
            # program (one compiled shape per power of two), not a whole `tail`-token forward
            t = min(self.tail, 1 << int(max(lengths - done) - 1).bit_length())
            n_valid = np.minimum(lengths - done, t)
            self._flush((n_valid > 0) & (self.cache_len + n_valid > self.window))
            tokens, _ = _slice_rows(pieces, done, n_valid, t)
            self.state, logits = self._extend_fn((self.params, self.layer_params), self.state,
                                                 jnp.asarray(tokens), jnp.asarray(n_valid, jnp.int32),
                                                 self._cache_view((self.cache_len + n_valid).max()))
            if keep_logits:
                logits = np.asarray(logits)[:, :, :self.model_config.vocab_size]
            else:   # only each row's last logits leave the device
                logits = np.asarray(jnp.take_along_axis(
                    logits, jnp.asarray(np.maximum(n_valid - 1, 0))[:, None, None], axis=1))
                logits = logits[:, :, :self.model_config.vocab_size]
            for b in range(self.batch):
                if n_valid[b]:
                    last[b] = logits[b, n_valid[b] - 1 if keep_logits else 0]
                    if keep_logits:
                        collected[b].append(logits[b, :n_valid[b]])
            done += n_valid
        return last, [
            np.concatenate(c, 0) if c else np.zeros((0, last.shape[1]), np.float32) for c in collected
        ]

    def extend(self, tokens, return_logits: bool = False):
        """Appends tokens (one list per row) to the current documents; returns the last logits
        [B, V] and, with return_logits, each row's logits of its tokens [L_b, V]."""
        last, rows = self._extend_all(self._check_tokens(tokens), return_logits)
        return (last, rows) if return_logits else last

    def _decode_step(self, params, state: RuntimeState, logits, key, finished, n, stop, temperature, top_p,
                     view: int):
        """Up to `n` tokens per row on the device: sample, record, and extend each row that had
        not stopped with its token (its stop token included), so that a row's document is its
        prompt and what it generated. Returns the state, the next logits, key and finished flags,
        tokens [B, DECODE_BLOCK] (-1 after a row's stop) and the number of steps taken.

        Two nested loops and no conditional around the state: the outer one moves the full caches
        of rows still generating to memory (a masked write), the inner one decodes until some
        such row's cache is full. A `lax.cond` whose branches carry the memory stores makes XLA
        copy every store on every token. Steps read the first `view` cache slots: the caller picks a
        view that holds every row's cache after `n` more tokens (or the window, where caches fill
        up and move to memory)."""
        b = logits.shape[0]
        vocab = self.model_config.vocab_size

        def must_flush(state, finished):
            return (state.cache.length >= self.window) & ~finished

        def step(c):
            i, state, logits, key, finished, out = c
            key, sub = jax.random.split(key)
            tok = sample(logits, sub, temperature, top_p)
            out = out.at[:, i].set(jnp.where(finished, -1, tok))
            live = ~finished
            state, logits = self._extend_step(params, state, tok[:, None], live.astype(jnp.int32), view)
            finished = finished | (tok == stop)
            return i + 1, state, logits[:, 0, :vocab].astype(jnp.float32), key, finished, out

        def going(c):
            i, _, _, _, finished, _ = c
            return (i < n) & ~jnp.all(finished)

        def segment(c):
            i, state, logits, key, finished, out = c
            state = self._flush_step(state, must_flush(state, finished))
            return jax.lax.while_loop(
                lambda c: going(c) & ~jnp.any(must_flush(c[1], c[4])), step,
                (i, state, logits, key, finished, out))

        out = jnp.full((b, DECODE_BLOCK), -1, jnp.int32)
        i, state, logits, key, finished, out = jax.lax.while_loop(
            going, segment, (jnp.int32(0), state, logits, key, finished, out))
        return state, logits, key, finished, out, i

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_token: int | None = None, on_token=None, continue_documents=False,
                 progress=None):
        """Ingests the prompts (with continue_documents: appends them to the current documents,
        memory kept), then samples (greedy at temperature 0) up to max_new_tokens per row;
        a row stops after `stop_token` (default: the model's eos; -1: never). `on_token(row, token)`
        is called for each token as it is sampled (streaming); `progress` as in `ingest`. Returns a
        list of token arrays.

        Decoding runs on the device, DECODE_BLOCK tokens per call (sampling, stop tokens, the
        cache update and its move to memory included); when streaming, the first calls are
        shorter (1, 2, 4, ... tokens), so the first token shows as soon as it exists."""
        if max_new_tokens < 0:
            raise MemoryRuntimeError("max_new_tokens must be >= 0")
        if temperature < 0 or not 0 < top_p <= 1:
            raise MemoryRuntimeError(
                f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}"
            )
        stop = self.model_config.eos_token_id if stop_token is None else stop_token
        if continue_documents and any(len(p) == 0 for p in prompts):
            raise MemoryRuntimeError("continue_documents needs at least one prompt token per row")
        logits = self.extend(prompts) if continue_documents else self.ingest(prompts, progress=progress)
        # placed as the decode program's own outputs are (committed beside the state): arrays made
        # on the host would make the first call a program of its own, compiled a second time
        logits, key, finished = jax.device_put((logits, jax.random.key(seed), np.zeros(self.batch, bool)),
                                               self._home)
        out = [[] for _ in range(self.batch)]
        produced, block = 0, (1 if on_token is not None else DECODE_BLOCK)
        stop = jnp.int32(-1 if stop is None else stop)
        cache_len = self.cache_len
        while produced < max_new_tokens:
            n = min(block, max_new_tokens - produced)
            self.state, logits, key, finished, toks, steps = self._decode_fn(
                (self.params, self.layer_params), self.state, logits, key, finished, jnp.int32(n), stop,
                float(temperature), float(top_p), self._cache_view(cache_len.max() + n))
            toks, steps = np.asarray(toks), int(steps)
            for j in range(steps):
                for b in range(self.batch):
                    if toks[b, j] >= 0:
                        out[b].append(int(toks[b, j]))
                        if on_token is not None:
                            on_token(b, int(toks[b, j]))
            produced += steps
            if steps < n or bool(np.asarray(finished).all()):
                break
            cache_len = self.cache_len
            block = min(2 * block, DECODE_BLOCK)
        return [np.array(o, np.int32) for o in out]


def _slice_rows(docs, start, n_valid, width: int):
    """Row b: n_valid[b] tokens of docs[b] from start (a position, or one per row), zero-padded
    to `width`. Returns (tokens [B, width] int32, n_valid)."""
    starts = np.broadcast_to(np.asarray(start), (len(docs),))
    tokens = np.zeros((len(docs), width), np.int32)
    for b, d in enumerate(docs):
        tokens[b, :n_valid[b]] = d[starts[b]: starts[b] + n_valid[b]]
    return tokens, n_valid


@functools.partial(jax.jit, static_argnums=(2, 3))
def sample(logits, key, temperature: float, top_p: float):
    """logits [B, V] -> tokens [B]: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the best one always stays
        logits = (
            jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
        )
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
