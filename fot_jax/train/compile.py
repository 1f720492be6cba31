"""The compiled pieces of a training run, shared by the loop and by `fot-jax plan`: the jitted train
and eval steps with explicit shardings (state donated), the batch shardings, and the placement of
host rows as global arrays."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import config as config_lib
from fot_jax.model.attention import CrossbatchSpec
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train.optim import make_schedule
from fot_jax.train.step import eval_step, train_step


class TrainStep:
    """A jitted train step: `(state, batch, r, lr_scale=1, temperature_scale=1) -> (state,
    metrics)`. The two scales are runtime scalars (a stage that changes them compiles nothing)."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, state, batch, r, lr_scale=1.0, temperature_scale=1.0):
        return self.jitted(state, batch, r, jnp.float32(lr_scale), jnp.float32(temperature_scale))

    def lower(self, state, batch, r):
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return self.jitted.lower(state, batch, r, scalar, scalar)


def crossbatch_spec(cfg, range_max: int) -> CrossbatchSpec:
    x = cfg.crossbatch
    return CrossbatchSpec(range_max=int(range_max), k_packing=x.k_packing, stepping=x.stepping,
                          doc_mask=x.doc_mask, implementation=x.implementation)


BATCH_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")


def batch_shardings(mesh) -> dict:
    s = mesh_lib.batch_sharding(mesh, 2)
    return {name: s for name in BATCH_FIELDS}


def jit_train_step(cfg, graphdef, tx, mesh, state_shardings, range_max: int, schedule=None) -> TrainStep:
    """The jitted train step for crossbatch range `range_max` (and cfg's crossbatch layout and
    microbatches): explicit shardings, donated state."""
    rep = mesh_lib.replicated(mesh)
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, spec=crossbatch_spec(cfg, range_max),
                           microbatches=cfg.train.microbatches, schedule=schedule or make_schedule(cfg.train),
                           trainable=tuple(cfg.train.trainable))
    return TrainStep(jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh), rep, rep, rep),
                             out_shardings=(state_shardings, rep), donate_argnums=(0,)))


def check_batch_divides(cfg, mesh) -> None:
    dp = mesh_lib.data_parallel_size(mesh)
    if cfg.data.batch_size % dp:
        raise config_lib.ConfigError(
            f"config field 'data.batch_size': {cfg.data.batch_size} rows do not divide over the "
            f"mesh's data-parallel size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} "
            f"on {mesh.devices.size} devices). A run keeps its global batch on any number of hosts (a "
            "checkpoint resumes with more or fewer rows per device, the same computation); run it on "
            "devices whose data x fsdp divides the batch, or move devices to mesh.tensor, which does not "
            "split it")


def to_global(batch: dict, mesh) -> dict:
    """Host-local numpy rows -> global arrays sharded over the batch axes."""
    out = {}
    for name, value in batch.items():
        sharding = mesh_lib.batch_sharding(mesh, value.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def global_batcher_state(state: dict) -> dict:
    """A host's batcher position covers its own streams; a checkpoint holds every host's (gathered
    here), so that it restores on any number of hosts."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils
    local = np.array([[int(s), o, f] for s, (o, f) in state["streams"].items()], np.int32).reshape(-1, 3)
    everyone = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 3)
    return {"step": state["step"], "streams": {str(s): [int(o), int(f)] for s, o, f in everyone}}


def jit_eval_step(cfg, graphdef, mesh, params_shardings, r: int):
    """The jitted held-out step at crossbatch range `r`: (params, batch, r) -> replicated sums."""
    rep = mesh_lib.replicated(mesh)
    fn = functools.partial(eval_step, graphdef=graphdef, spec=crossbatch_spec(cfg, r))
    return jax.jit(fn, in_shardings=(params_shardings, batch_shardings(mesh), rep), out_shardings=rep)
