"""What a decoder layer carries between inference calls, and what a call returns: the local
cache (`LayerCache` per run of stacked layers, `Cache` for the model) and the model's `Output`.

A layer's cache holds keys and values `[B, S, Hkv, D]`, slot j holding the token at position j of
the current local context (keys un-rotated in memory layers, whose cache moves to memory where
the positional mode wants them so; rotated at their positions in the others). A token at
position p is written to slot p (a position >= S drops it: padding) and reads slots 0..p, so the
positions of a call are the cache's valid mask. `LayerCache.view` (static) is how many slots a
call reads: a call costs in proportion to the tokens in the cache, not to its capacity.

The model stores its layers in runs of one structure, stacked (`fot_jax.model.llama.LayerStack`),
and its cache the same way: one `LayerCache` per run, `[n, B, S, Hkv, D]`. A layer reads and
writes its slice `index` of the run's cache in place (a scan over the run carries the whole
buffer and updates one layer's slots per trip; nothing copies a layer's cache).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Keys and values of one layer [B, S, Hkv, D], or of a run of layers [n, B, S, Hkv, D] of which
    a call uses layer `index` (an int or a traced scalar; None: not stacked)."""
    k: jax.Array
    v: jax.Array
    view: int = dataclasses.field(default=0, metadata=dict(static=True))   # slots a call reads (0: all)
    index: jax.Array | int | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[-3]

    def write(self, k, v, positions) -> LayerCache:
        """k/v [B,T,Hkv,D] of new tokens at positions [B,T] (>= capacity: dropped)."""
        rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
        at = (rows, positions) if self.index is None else (self.index, rows, positions)
        return dataclasses.replace(self, k=self.k.at[at].set(k.astype(self.k.dtype), mode="drop"),
                                   v=self.v.at[at].set(v.astype(self.v.dtype), mode="drop"))

    @property
    def view_slots(self) -> int:
        return self.view or self.capacity

    def read(self, view: int):
        """The first `view` slots of the layer: (k, v) [B, view, Hkv, D]."""
        if self.index is None:
            return self.k[:, :view], self.v[:, :view]
        return tuple(jax.lax.dynamic_index_in_dim(x, self.index, 0, keepdims=False)[:, :view]
                     for x in (self.k, self.v))

    def layer(self, j: int) -> LayerCache:
        """Layer j of a stacked cache, as an unstacked LayerCache (a copy of its slots)."""
        return LayerCache(self.k[j], self.v[j], self.view)


def _stacked(counts, make):
    return tuple(LayerCache(make(n), make(n)) for n in counts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """The model's local cache: one stacked LayerCache per run of layers (`counts`: the runs'
    sizes, in layer order) and each row's token count (None in a call's output without a cache:
    then the layers hold the new tokens' keys and values)."""
    layers: tuple          # LayerCache [n, B, S, Hkv, D] per run
    length: jax.Array | None   # [B] int32: tokens each row holds (slots 0..length-1)

    @property
    def counts(self) -> tuple:
        return tuple(c.k.shape[0] for c in self.layers)

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @property
    def num_layers(self) -> int:
        return sum(self.counts)

    def layer(self, i: int) -> LayerCache:
        """Layer i's keys and values (unstacked)."""
        for run in self.layers:
            if i < run.k.shape[0]:
                return run.layer(i)
            i -= run.k.shape[0]
        raise IndexError(f"layer index out of range for a cache of {self.num_layers} layers")

    def __iter__(self):
        return (self.layer(i) for i in range(self.num_layers))

    @classmethod
    def empty(cls, counts, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype,
              sharding=None) -> Cache:
        """Zeros for runs of `counts` layers (`Llama.run_counts`; distinct buffers, so the cache can
        be donated), placed by `sharding` if given."""
        def fresh(n):
            shape = (n, batch, capacity, kv_heads, head_dim)
            return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        length = jax.jit(lambda: jnp.zeros((batch,), jnp.int32), out_shardings=sharding)()
        return cls(_stacked(counts, fresh), length)

    def reading(self, view: int = 0) -> Cache:
        """The same cache, its layers read through their first `view` slots (0: all; a state kept
        between calls holds 0, so that its structure never depends on the last call's view)."""
        return dataclasses.replace(
            self, layers=tuple(dataclasses.replace(c, view=int(view)) for c in self.layers))

    def positions(self, valid):
        """[B,T] positions of T new tokens of which valid [B,T] are real: after each row's tokens,
        padding at `capacity` (dropped when written)."""
        offsets = jnp.arange(valid.shape[1], dtype=jnp.int32)
        return jnp.where(valid, self.length[:, None] + offsets[None, :], self.capacity)

    def advance(self, n) -> Cache:
        """`n` [B] tokens more in each row (after a call wrote them)."""
        return dataclasses.replace(self, length=self.length + n)

    def emptied(self, rows) -> Cache:
        """Rows [B] bool start over (their slots are overwritten from 0)."""
        return dataclasses.replace(self, length=jnp.where(rows, 0, self.length))

    def move_to(self, memory, rows, doc_pos, doc_id):
        """Moves the tokens of rows [B] bool to `memory` (a `fot_jax.memory.view.Memory`: its layers'
        keys and values, at their document positions, doc_pos [B] being each row's position after
        its last cached token) and empties those rows. Returns (cache, memory)."""
        slots = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
        mask = rows[:, None] & (slots < self.length[:, None])
        positions = doc_pos[:, None] - self.length[:, None] + slots
        doc_ids = jnp.broadcast_to(doc_id[:, None], mask.shape)
        kv = [(c.k, c.v) for c in map(self.layer, memory.layers)]
        return self.emptied(rows), memory.write(kv, positions, doc_ids, mask)

    def rewound(self, drop) -> Cache:
        """Each row forgets its last drop [B] tokens."""
        return dataclasses.replace(self, length=self.length - drop)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """A model call's result: logits [B,T,V_padded] (float32; None when the call stopped below the
    head) and the cache: the updated one, or without a cache passed in, a Cache (length None)
    holding the new tokens' keys and values as a cache stores them (None in training)."""
    logits: jax.Array | None
    cache: Cache | None
