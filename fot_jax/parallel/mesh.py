"""The device mesh from config, ordered logical axis rules, and shardings.

The model names array axes logically (`batch`, `embed`, `heads`, ...); this file alone maps those
names to mesh axes. `constrain(x, names)` is a no-op unless a mesh context is active
(`use_mesh(mesh, rules)`), so the model runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from fot_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered: for each logical name, the mesh axes it may take, first match wins, and a mesh axis is
# used at most once per array (MaxText-style).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("vocab", ("tensor",)),
    ("head_dim", ()),
    ("length", ()),
    ("layers", ()),
    ("norm", ()),
)


def dcn_shape(cfg_mesh) -> tuple[int, ...]:
    """Slices along each mesh axis (`mesh.dcn_data`, ...): the axis spans that many slices over the
    data-centre network; within a slice its size is `mesh.<axis>` (ICI)."""
    return tuple(int(cfg_mesh.get(f"dcn_{a}", 1)) for a in MESH_AXES)


def mesh_shape(cfg_mesh, num_devices: int) -> tuple[int, ...]:
    """Per-slice (ICI) axis sizes for `num_devices` devices in all, the one -1 filled."""
    slices = math.prod(dcn_shape(cfg_mesh))
    if num_devices % slices:
        raise ConfigError(f"config field 'mesh': {num_devices} devices do not split into {slices} slices "
                          f"(mesh.dcn_* sizes {dict(zip(MESH_AXES, dcn_shape(cfg_mesh)))})")
    num_devices //= slices
    sizes = [cfg_mesh[a] for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"config field 'mesh': {dict(zip(MESH_AXES, sizes))} cannot fill "
                              f"{num_devices} devices ({num_devices} is not a multiple of {known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"config field 'mesh': {dict(zip(MESH_AXES, sizes))} needs "
                          f"{math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


def device_array(cfg_mesh, devices: Sequence) -> np.ndarray:
    """The devices laid out as the mesh `[data, fsdp, tensor]` of more than one slice: each axis is
    its DCN size (slices, outer) times its ICI size (within a slice), so collectives of an axis
    that spans slices cross the data-centre network once, and the others stay inside a slice."""
    from jax.experimental import mesh_utils
    dcn = dcn_shape(cfg_mesh)
    ici = mesh_shape(cfg_mesh, len(devices))
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) != math.prod(dcn):
        raise ConfigError(
            f"config field 'mesh': the devices belong to {len(slices)} slice(s), the mesh.dcn_* "
            f"sizes {dict(zip(MESH_AXES, dcn))} make {math.prod(dcn)}"
        )
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def make_mesh(cfg_mesh, devices: Sequence | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn_shape(cfg_mesh)) > 1:
        return jax.sharding.Mesh(device_array(cfg_mesh, devices), MESH_AXES, axis_types=axis_types)
    shape = mesh_shape(cfg_mesh, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def memory_mesh(shards: int) -> jax.sharding.Mesh:
    """A one-axis `memory` mesh over the first `shards` devices: memory stores sharded along N."""
    if shards > len(jax.devices()):
        raise ConfigError(f"memory over {shards} shards needs {shards} devices; "
                          f"{len(jax.devices())} available")
    return jax.make_mesh((shards,), ("memory",), axis_types=(AxisType.Auto,), devices=jax.devices()[:shards])


def logical_to_spec(names: Sequence[str | None], mesh: jax.sharding.Mesh,
                    rules=DEFAULT_RULES, shape: Sequence[int] | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec. Mesh axes of size 1 are dropped; an axis whose
    dimension the mesh axes do not divide stays replicated (never an uneven shard)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = []
        for axis in table.get(name, ()) if name else ():
            if axis in used or mesh.shape.get(axis, 1) == 1:
                continue
            axes.append(axis)
        while shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def named_sharding(mesh, names, rules=DEFAULT_RULES, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("fot_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh, rules=DEFAULT_RULES):
    """Activates `mesh` for jax (`jax.set_mesh`) and for logical constraints inside the model."""
    token = _CONTEXT.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _CONTEXT.reset(token)


def current_mesh():
    ctx = _CONTEXT.get()
    return ctx[0] if ctx else None


def constrain(x, names: Sequence[str | None]):
    """`with_sharding_constraint` by logical names; identity without an active mesh."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules, x.shape))


def batch_sharding(mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
