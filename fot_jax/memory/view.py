"""The memory a model call reads, as data: `Memory` holds one `MemoryStore` per memory layer and
the lookup settings; `Memory.views(positions)` gives each memory layer its `MemoryView`, which the
layer reads with `view.read(q)` (the top-k partial sums of `knn.lookup`). Writing the memory
layers' keys and values, and clearing rows, are methods here too, so a caller never reaches into
the stores."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fot_jax.memory import knn
from fot_jax.memory import store as store_lib


@dataclasses.dataclass(frozen=True)
class Lookup:
    """How a memory layer reads its store (static: part of the compiled program)."""
    top_k: int
    search: str = "exact"
    chunk: int = 0
    recall_target: float = 0.95
    logn_base: int = 0            # 0: off; else queries scale by max(1, ln n / ln logn_base)
    mesh: Any = None              # a mesh whose `memory_axis` shards the stores, or None
    memory_axis: str = "memory"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryView:
    """One memory layer's store for one call, with its queries' log-n multipliers [B,T] (or None)."""
    store: store_lib.MemoryStore
    scale: jax.Array | None
    lookup: Lookup = dataclasses.field(metadata=dict(static=True))

    def read(self, q):
        """q [B,Hkv,Q,D] -> partial softmax sums (m, l, acc) of each query's top-k entries."""
        s, lk = self.store, self.lookup
        return knn.lookup(q, keys=s.keys, values=s.values, valid=s.valid, top_k=lk.top_k, chunk=lk.chunk,
                          search=lk.search, recall_target=lk.recall_target, mesh=lk.mesh,
                          memory_axis=lk.memory_axis, dtype=s.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Memory:
    """The stores of a model's memory layers (`layers`, in order) and how they are read."""
    stores: tuple
    layers: tuple = dataclasses.field(metadata=dict(static=True))
    lookup: Lookup = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(cls, layers, lookup: Lookup, batch: int, kv_heads: int, capacity: int, head_dim: int,
               dtype: str, data_axis: str | None = None) -> Memory:
        stores = tuple(store_lib.create(batch, kv_heads, capacity, head_dim, dtype, mesh=lookup.mesh,
                                        memory_axis=lookup.memory_axis, data_axis=data_axis)
                       for _ in layers)
        return cls(stores, tuple(layers), lookup)

    def scale(self, local_keys):
        """[B,T] multipliers of the memory layers' queries: max(1, ln n / ln logn_base), n the keys
        each query sees (its row's memory entries and local_keys [B,T] causal local keys); None
        when log-n scaling is off or there is no memory layer."""
        base = self.lookup.logn_base
        if not base or not self.stores:
            return None
        first = self.stores[0]
        entries = jnp.minimum(first.written, first.capacity)
        n = (entries[:, None] + local_keys).astype(jnp.float32)
        return jnp.maximum(1.0, jnp.log(n) / jnp.log(float(base)))

    def views(self, positions, num_layers: int) -> list:
        """Per layer of a model of `num_layers`: its MemoryView (memory layers) or None, for a call
        whose tokens sit at positions [B,T] of the local context (position p sees p + 1 local keys)."""
        scale = self.scale(positions + 1)
        out = [None] * num_layers
        for layer, st in zip(self.layers, self.stores):
            out[layer] = MemoryView(st, scale, self.lookup)
        return out

    def write(self, kv, positions, doc_ids, mask) -> Memory:
        """Appends, per memory layer, its (k, v) [B,T,Hkv,D] at document positions and doc_ids
        [B,T] where mask [B,T] is true."""
        lk = self.lookup
        stores = tuple(
            store_lib.write(st, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), positions, doc_ids, mask,
                            mesh=lk.mesh, memory_axis=lk.memory_axis)
            for st, (k, v) in zip(self.stores, kv))
        return dataclasses.replace(self, stores=stores)

    def reset(self, rows) -> Memory:
        """Clears the rows where rows [B] is true."""
        return dataclasses.replace(self, stores=tuple(store_lib.reset(s, rows) for s in self.stores))
