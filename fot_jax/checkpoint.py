"""Orbax checkpoints: train state + data position + config (DESIGN "Checkpoints and interop").

A checkpoint step directory holds three items: `state` (the train state pytree, restored onto the
shardings of an abstract target, so onto any mesh), `data` (the pipeline position, JSON) and
`config` (the run's config, JSON). Saves are asynchronous; Orbax writes a step under a temporary
name and renames it when complete, so a partial save is never mistaken for a checkpoint.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
    pass


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The Trainer's checkpoint seam, backed by `ocp.CheckpointManager` in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, cfg, every: int = 0, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def restore(self, abstract_state, shardings, step=None):
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        target = _abstract(abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def save(self, step, state, data_state, force=False):
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(self.cfg.to_json()))), force=force)

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def load_model(workdir: str, step=None, overrides=()):
    """(cfg, model) from the latest (or a chosen) checkpoint of a training workdir; parameters
    are restored replicated on the default device. `overrides` are `--config.a.b=v` strings applied
    to the stored config (inference settings such as `memory.top_k`)."""
    from fot_jax import config as config_lib
    from fot_jax.train.state import abstract_model
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoints in {workdir!r} (expected {directory}); train first "
                              "with `fot-jax train --workdir ...`")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise CheckpointError(f"checkpoint step {step} not found in {directory}; steps: {manager.all_steps()}")
    stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    cfg = config_lib.from_dict(stored, overrides)
    graphdef, abstract_params = abstract_model(cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                     abstract_params)}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)))["state"]
    manager.close()
    model = nnx.merge(graphdef, restored["params"])
    return cfg, model
