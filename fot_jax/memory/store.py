"""The memory of one memory layer: a ring-buffer key/value store per batch row and kv-head
(docs/architecture.md, "Long inputs with memory").

    keys, values  [B, Hkv, N, D]   (bfloat16 by default)
    positions     [B, N] int32     token position in its document, -1 for an empty slot
    doc_ids       [B, N] int32     which document of the row wrote the slot
    cursor        [B] int32        next slot to write (FIFO once full)
    written       [B] int32        tokens written since the last reset

Keys and values of a 16-bit dtype are *stored* as their uint16 bit patterns (`dtype` names what
they hold; `as_float` views them): XLA:CPU upcasts a bfloat16 scatter to float32 over the whole
buffer, a full copy of the store per write (2.4 s per window at 256K tokens), while a uint16
scatter updates in place. Readers bitcast chunk by chunk.

Writes are compacted (only the tokens whose mask is set take slots, in order) and wrap around, so
after more than `N` writes a row holds exactly its last `N` tokens. A reset clears metadata only.
The functions here are pure and jit-friendly; pass a store into `jax.jit(..., donate_argnums=...)`
to update it in place. The store is shardable along `N` (`memory` mesh axis): `write` then runs per
shard under `jax.shard_map`, so keys and values never leave their device. It knows nothing of
the model.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fot_jax import config as config_lib
from fot_jax.errors import FotError

STORE_DTYPES = {name: jnp.dtype(name) for name in config_lib.DTYPES}


class MemoryStoreError(FotError, ValueError):
    """Bad input to the memory store (a wrong shape, dtype or capacity)."""


@dataclasses.dataclass
class MemoryStore:
    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    doc_ids: jax.Array
    cursor: jax.Array
    written: jax.Array
    dtype: str = "float32"        # what keys/values hold (static)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def valid(self):
        """[B, N] bool: slots holding a token."""
        return self.positions >= 0


jax.tree_util.register_dataclass(
    MemoryStore,
    data_fields=["keys", "values", "positions", "doc_ids", "cursor", "written"],
    meta_fields=["dtype"],
)


def storage_dtype(dtype: str):
    """The array dtype that holds values of `dtype` (uint16 bits for 16-bit floats)."""
    return jnp.uint16 if jnp.dtype(STORE_DTYPES[dtype]).itemsize == 2 else STORE_DTYPES[dtype]


def as_float(x, dtype: str):
    """View stored keys/values (or a slice of them) as the float dtype they hold."""
    if x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x, STORE_DTYPES[dtype])
    return x


def _to_storage(x, dtype: str):
    x = x.astype(STORE_DTYPES[dtype])
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if storage_dtype(dtype) == jnp.uint16 else x


def store_specs(memory_axis: str | None = "memory", data_axis: str | None = None) -> MemoryStore:
    """PartitionSpecs of a store: N over `memory_axis`, rows over `data_axis`."""
    return MemoryStore(
        keys=P(data_axis, None, memory_axis, None),
        values=P(data_axis, None, memory_axis, None),
        positions=P(data_axis, memory_axis),
        doc_ids=P(data_axis, memory_axis),
        cursor=P(data_axis),
        written=P(data_axis),
        dtype=None,
    )


def create(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype="bfloat16",
           mesh=None, memory_axis: str = "memory", data_axis: str | None = None) -> MemoryStore:
    """An empty store; with a mesh, created directly in its shards (N over `memory_axis`)."""
    if dtype not in STORE_DTYPES:
        raise MemoryStoreError(f"memory dtype '{dtype}' is not supported; use one of {sorted(STORE_DTYPES)}")
    for name, value in (
        ("batch", batch),
        ("kv_heads", kv_heads),
        ("capacity", capacity),
        ("head_dim", head_dim),
    ):
        if int(value) <= 0:
            raise MemoryStoreError(f"memory store {name} must be positive, got {value}")
    if mesh is not None and memory_axis in mesh.shape and capacity % mesh.shape[memory_axis]:
        raise MemoryStoreError(f"capacity {capacity} does not divide over the '{memory_axis}' mesh axis "
                               f"of size {mesh.shape[memory_axis]}")
    dt = storage_dtype(dtype)

    def make():
        return MemoryStore(
            keys=jnp.zeros((batch, kv_heads, capacity, head_dim), dt),
            values=jnp.zeros((batch, kv_heads, capacity, head_dim), dt),
            positions=jnp.full((batch, capacity), -1, jnp.int32),
            doc_ids=jnp.full((batch, capacity), -1, jnp.int32),
            cursor=jnp.zeros((batch,), jnp.int32), written=jnp.zeros((batch,), jnp.int32), dtype=dtype)
    if mesh is None:
        return jax.jit(make)()
    specs = store_specs(memory_axis if memory_axis in mesh.shape else None, data_axis)
    specs = dataclasses.replace(specs, dtype=dtype)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    return jax.jit(make, out_shardings=shardings)()


def check_write(store: MemoryStore, keys, values, positions, doc_ids, mask) -> None:
    """Shape checks before a write (Python-side, so a bad call fails before any buffer is donated)."""
    b, hkv, n, d = store.keys.shape
    if keys.ndim != 4 or keys.shape[0] != b or keys.shape[1] != hkv or keys.shape[3] != d:
        raise MemoryStoreError(f"keys of shape {tuple(keys.shape)} do not fit a store of [B={b}, Hkv={hkv}, "
                               f"N={n}, D={d}] (expected [{b}, {hkv}, T, {d}])")
    t = keys.shape[2]
    if values.shape != keys.shape:
        raise MemoryStoreError(f"values {tuple(values.shape)} and keys {tuple(keys.shape)} differ in shape")
    for name, x in (("positions", positions), ("doc_ids", doc_ids), ("mask", mask)):
        if tuple(x.shape) != (b, t):
            raise MemoryStoreError(f"{name} of shape {tuple(x.shape)}, expected [B, T] = [{b}, {t}]")
    if t > n:
        raise MemoryStoreError(
            f"a write of {t} tokens exceeds the capacity N={n} (capacity must hold a window)"
        )


def _write_local(keys, values, positions, doc_ids, slots, new_k, new_v, new_pos, new_doc):
    """Scatter into (a shard of) the store; slots [B, T] local indices, out of range = dropped."""
    b, t = slots.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    nk = jnp.swapaxes(new_k, 1, 2)  # [B, T, Hkv, D], already in storage dtype
    nv = jnp.swapaxes(new_v, 1, 2)
    # keys[b, :, slot] <- nk[b, t]: index dims (0, 2), the Hkv and D dims are window dims.
    keys = keys.at[rows, :, slots].set(nk, mode="drop")
    values = values.at[rows, :, slots].set(nv, mode="drop")
    positions = positions.at[rows, slots].set(new_pos, mode="drop")
    doc_ids = doc_ids.at[rows, slots].set(new_doc, mode="drop")
    return keys, values, positions, doc_ids


def write(store: MemoryStore, keys, values, positions, doc_ids, mask, mesh=None,
          memory_axis: str = "memory") -> MemoryStore:
    """Appends the masked tokens of keys/values [B, Hkv, T, D] (positions, doc_ids, mask [B, T])
    to each row's ring buffer, in order. T <= N (see `check_write`)."""
    n = store.capacity
    mask = mask.astype(bool)
    order = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1               # rank among written tokens
    slots = jnp.where(mask, (store.cursor[:, None] + order) % n, n)     # n: dropped
    count = jnp.sum(mask, axis=1, dtype=jnp.int32)
    positions = positions.astype(jnp.int32)
    doc_ids = doc_ids.astype(jnp.int32)
    keys, values = _to_storage(keys, store.dtype), _to_storage(values, store.dtype)
    arrays = (store.keys, store.values, store.positions, store.doc_ids)
    if mesh is None or memory_axis not in mesh.shape or mesh.shape[memory_axis] == 1:
        arrays = _write_local(*arrays, slots, keys, values, positions, doc_ids)
    else:
        shards = mesh.shape[memory_axis]
        local_n = n // shards
        spec = store_specs(memory_axis)

        def per_shard(k, v, p, d, slots, nk, nv, npos, ndoc):
            offset = jax.lax.axis_index(memory_axis) * local_n
            local = slots - offset
            local = jnp.where((local >= 0) & (local < local_n), local, local_n)
            return _write_local(k, v, p, d, local, nk, nv, npos, ndoc)
        arrays = jax.shard_map(
            per_shard, mesh=mesh,
            in_specs=(spec.keys, spec.values, spec.positions, spec.doc_ids, P(), P(), P(), P(), P()),
            out_specs=(spec.keys, spec.values, spec.positions, spec.doc_ids), check_vma=False,
        )(*arrays, slots, keys, values, positions, doc_ids)
    return MemoryStore(
        *arrays, cursor=(store.cursor + count) % n, written=store.written + count, dtype=store.dtype
    )


def reset(store: MemoryStore, rows) -> MemoryStore:
    """Clears the rows where `rows` [B] is true (metadata only; keys/values stay as garbage)."""
    rows = jnp.asarray(rows, bool)
    return dataclasses.replace(
        store,
        positions=jnp.where(rows[:, None], -1, store.positions),
        doc_ids=jnp.where(rows[:, None], -1, store.doc_ids),
        cursor=jnp.where(rows, 0, store.cursor), written=jnp.where(rows, 0, store.written))
