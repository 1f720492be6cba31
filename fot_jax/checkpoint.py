"""Orbax checkpoints: train state + data position + config (docs/architecture.md).

A checkpoint step directory holds three items: `state` (the train state pytree, restored onto the
shardings of an abstract target, so onto any mesh), `data` (the pipeline position and the range
schedule, JSON) and `config` (the run's config, JSON). Saves are asynchronous; Orbax writes a step
under a temporary name and renames it when complete, so a partial save (a process killed mid-save)
is never mistaken for a checkpoint: the next start restores the last complete step.

Local checkpoints (`train.local_checkpoint_dir`, `fot_jax.local_checkpoint`): each host's own
shards saved often to its own disk; a restart resumes from the newest step every host holds when it
is newer than the newest persistent one.

Keep-best (`train.checkpoint_best`): a second manager in `<workdir>/best` holds the step with the
best held-out metric, apart from the rolling `keep` latest ones that resuming uses.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fot_jax import checks, paths
from fot_jax import config as config_lib
from fot_jax.config import config_diff
from fot_jax.errors import FotError
from fot_jax.model import layout
from fot_jax.model.llama import abstract_model


class CheckpointError(FotError, RuntimeError):
    pass


# Model fields that do not change parameters or the training computation: a resumed run may
# change them freely (inference settings, compute dtype, rematerialisation).
# Model fields that change how the model computes, never what: a run may resume with others.
RESUMABLE_MODEL_FIELDS = frozenset({"last_context_length", "mem_dtype", "remat", "dtype", "attention_backend",
                                    "attention_block_q", "attention_block_kv", "scan_layers", "scan_unroll"})

# Model fields a fine-tune (`train.init_from`) may change: they turn a pretrained model into an FoT
# model (LongLLaMA = OpenLLaMA + memory layers + FoT training) or extend its window, and keep the
# shapes of every pretrained parameter. Parameters the new settings add (gates, q/k temperatures)
# start from their initialisation; the differences are logged.
FINETUNE_MODEL_FIELDS = frozenset({"mem_layers", "mem_positionals", "mem_attention", "qk_norm",
                                   "qk_temperature_init", "max_position_embeddings", "rope_theta",
                                   "init_std", "param_dtype", "trained_context"})


def stored_config(workdir: str, step=None) -> dict:
    """The config a workdir's latest (or chosen) checkpoint was written with, as a dict."""
    directory = paths.join(workdir, "checkpoints")
    if not paths.isdir(directory):
        raise CheckpointError(f"no checkpoints in {workdir!r} (expected {directory})")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    finally:
        manager.close()


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _check_model_config(stored: dict, cfg, where: str, ignore=()):
    current = json.loads(cfg.to_json())
    # a field the schema gained after the checkpoint was written reads as its default
    stored_model = {**json.loads(config_lib.base_config().model.to_json()), **stored.get("model", {})}
    diff = {k: v for k, v in config_diff(stored_model, current["model"]).items()
            if k not in RESUMABLE_MODEL_FIELDS and k not in ignore}
    if diff:
        lines = "; ".join(f"model.{k}: checkpoint {a!r}, run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"the checkpoint in {where} was trained with a different model config "
                              f"({lines}). Resume with the checkpoint's model settings, or start a "
                              "new workdir.")


def _restore_error(step, directory, err):
    return CheckpointError(
        f"checkpoint step {step} in {directory} cannot be restored ({type(err).__name__}: "
        f"{str(err)[:300]}). It is corrupt or incomplete (a missing or damaged file). Nothing was "
        "changed on disk; move that step directory aside to resume from the one before it, or set "
        "--config.train.resume_step to an earlier step.")


class Checkpoints:
    """The Trainer's checkpoint seam, backed by `ocp.CheckpointManager` in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, cfg, every: int = 0, keep: int = 3, async_save: bool = True,
                 best: str = "", resume_step: int = -1):
        self.directory = paths.join(workdir, "checkpoints")
        self.cfg = cfg
        self.resume_step = None if resume_step is None or resume_step < 0 else int(resume_step)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.local = None               # LocalCheckpoints, attached by the trainer once the mesh exists
        self.best_metric = best
        self.best_manager = None
        self.best_value = None
        if best:
            self.best_dir = paths.join(workdir, "best")
            self.best_manager = ocp.CheckpointManager(self.best_dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=async_save))
            step = self.best_manager.latest_step()
            if step is not None:
                meta = self.best_manager.restore(step, args=ocp.args.Composite(
                    metrics=ocp.args.JsonRestore()))["metrics"]
                self.best_value = meta.get(best)

    def stored_config(self, step) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def attach_local(self, local) -> None:
        """Adds local (emergency) checkpoints: `local_due`/`save_local` save there; `restore` prefers
        them when newer than the persistent ones."""
        self.local = local

    def local_due(self, step) -> bool:
        return self.local is not None and self.local.due(step)

    def save_local(self, step, state, data_state):
        self.local.save(step, state, data_state, json.loads(self.cfg.to_json())["model"])

    def _restore_local(self, target):
        got = self.local.restore(target, newer_than=self.manager.latest_step())
        if got is None:
            return None
        state, record, step = got
        _check_model_config({"model": record.get("model", {})}, self.cfg, f"{self.local.directory}/{step}")
        if jax.process_index() == 0:
            print(f"resuming from the local checkpoint at step {step} ({self.local.directory}; newest "
                  f"persistent step: {self.manager.latest_step()})", flush=True)
        return state, record.get("data") or None, step

    def restore(self, abstract_state, shardings, step=None):
        """(state, data_state) of the latest complete step (or `step`, or train.resume_step), placed
        on `shardings` (any mesh); None when the workdir has no checkpoint. With local checkpoints
        attached, the newest local step every host holds wins when it is newer."""
        step = step if step is not None else self.resume_step
        if self.local is not None:
            got = self._restore_local(_abstract(abstract_state, shardings)) if step is None else None
            resumed = got[2] if got is not None else step if step is not None else self.manager.latest_step()
            self.local.discard_after(resumed or 0)       # a restart abandons the local steps after it
            if got is not None:
                return got[:2]
        if step is None:
            step = self.manager.latest_step()
            if step is None:
                return None
        elif step not in self.manager.all_steps():
            raise CheckpointError(f"checkpoint step {step} not found in {self.directory}; "
                                  f"complete steps: {sorted(self.manager.all_steps())}")
        try:
            stored = self.stored_config(step)
        except Exception as err:  # noqa: BLE001 -- any failure to read is a corrupt checkpoint
            raise _restore_error(step, self.directory, err) from err
        where = f"{self.directory}/{step}"
        _check_model_config(stored, self.cfg, where)
        tree = _stored_tree(self.directory, step)
        try:
            if tree is not None and _shapes(tree) != _shapes(abstract_state):
                return self._restore_regrouped(step, tree, abstract_state, shardings, where)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(abstract_state, shardings)),
                data=ocp.args.JsonRestore()))
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise _restore_error(step, self.directory, err) from err
        return restored["state"], restored["data"]

    def _restore_regrouped(self, step, tree, abstract_state, shardings, where):
        """A train state stored in another layout of the same model (each layer on its own, as
        checkpoints written before layers were stacked, or runs split elsewhere): every leaf,
        parameters and optimizer moments alike, is read to host memory and regrouped into the
        run's stacks by its per-layer name. Each process reads whole arrays: a one-time cost of
        resuming such a checkpoint."""
        reader = ocp.CheckpointManager(self.directory)   # PyTree-restore handler: the run saves Standard
        try:
            flat = layout.unstack_flat(_read_numpy(reader, step, tree))
        finally:
            reader.close()
        state, _ = _place(flat, abstract_state, shardings, where, hint=_RESUME_HINT)
        data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        if jax.process_index() == 0:
            print(f"resuming {where}: its train state is stored in another layer layout; regrouped "
                  "into this run's stacked layers", flush=True)
        return state, data

    def save(self, step, state, data_state, force=False):
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(self.cfg.to_json()))), force=force)

    def offer_best(self, step, state, data_state, metrics: dict) -> bool:
        """Saves into `<workdir>/best` when `metrics[best]` beats the best so far (accuracy: higher;
        loss: lower). Returns whether it saved."""
        if self.best_manager is None or self.best_metric not in metrics:
            return False
        value = float(metrics[self.best_metric])
        better = (self.best_value is None or
                  (value < self.best_value if self.best_metric == "loss" else value > self.best_value))
        if not better:
            return False
        self.best_manager.wait_until_finished()
        self.best_manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(self.cfg.to_json())),
            metrics=ocp.args.JsonSave({self.best_metric: value, "step": int(step)})), force=True)
        self.best_value = value
        return True

    def wait(self):
        self.manager.wait_until_finished()
        if self.best_manager is not None:
            self.best_manager.wait_until_finished()
        if self.local is not None:
            self.local.wait()

    def close(self):
        self.wait()
        self.manager.close()
        if self.best_manager is not None:
            self.best_manager.close()
        if self.local is not None:
            self.local.close()


def _restore_params(manager, step, abstract_params):
    """Only the parameters of a step (the optimizer state, if any, is not read), placed as the
    abstract target's shardings say."""
    target = {"params": abstract_params}
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]["params"]


def load_model(workdir: str, step=None, overrides=(), best: bool = False):
    """(cfg, model) from the latest (or a chosen, or the best) checkpoint of a training workdir;
    parameters are restored replicated on the default device. `overrides` are `--config.a.b=v`
    strings applied to the stored config (inference settings such as `memory.top_k`, or memory
    layers for the base model: the stored layers are then restacked into the new runs).
    Checkpoints whose layers are stored one by one (the layout before runs were stacked) load too."""
    directory = paths.join(workdir, "best" if best else "checkpoints")
    if not paths.isdir(directory):
        raise CheckpointError(f"no checkpoints in {workdir!r} (expected {directory}); train first "
                              "with `fot-jax train --workdir ...`" +
                              (" and --config.train.checkpoint_best=accuracy" if best else ""))
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise CheckpointError(
            f"checkpoint step {step} not found in {directory}; steps: {manager.all_steps()}"
        )
    try:
        stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        cfg = checks.from_dict(stored, overrides)
        graphdef, abstract_params = abstract_model(cfg)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: sharding, abstract_params)
        params = _restore_into(manager, directory, step, abstract_params, shardings,
                               f"{directory}/{step}")[0]
    except (config_lib.ConfigError, CheckpointError):
        raise
    except Exception as err:  # noqa: BLE001
        raise _restore_error(step, directory, err) from err
    finally:
        manager.close()
    model = nnx.merge(graphdef, params)
    return cfg, model


def _stored_tree(directory: str, step):
    """A step's `state` item as Orbax's metadata tree (nested dicts and lists whose leaves carry
    shapes and dtypes); None when the checkpoint has no metadata."""
    from etils import epath
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(paths.join(directory, str(step), "state")))
    except Exception:  # noqa: BLE001 (no metadata: read as the layout this code writes)
        return None
    return getattr(meta, "tree", meta)


def _shapes(tree) -> dict:
    """{dotted name: shape} of a tree's array leaves (arrays, abstract arrays or Orbax metadata)."""
    return {layout.dotted(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def _read_numpy(manager, step, tree) -> dict:
    """{dotted name: NumPy array} of the leaves of `tree` (a part of a step's metadata tree, such as
    {"params": ...}), read to host memory whole, whatever the mesh that wrote them."""
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        restore_args=args, partial_restore=True)))["state"]
    return {layout.dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]}


# what a checkpoint leaf without a place in the run, or of another shape, means for each caller
_FINETUNE_HINT = ("fine-tuning can add FoT memory settings but not change the pretrained "
                  "architecture")
_RESUME_HINT = ("the run's config differs from the checkpoint's (train.trainable, say); resume with "
                "the checkpoint's config, or start a new workdir")


def _place(flat: dict, abstract, shardings, where: str, fresh_ok: bool = False, hint: str = _FINETUNE_HINT):
    """The tree `abstract` (a train state or parameters in the stacked layout) filled from `flat`
    ({per-layer dotted name: NumPy array}, `layout.unstack_flat`): each stacked leaf is the stack
    of its layers' arrays, cast to the leaf's dtype and placed shard by shard on `shardings`.
    Returns (tree, names of the leaves taken from `abstract` because `flat` lacks them: only when
    `fresh_ok` and `abstract` holds arrays, a fresh initialisation). A leaf `flat` lacks otherwise,
    one of another shape, or an entry of `flat` with no place is an error that names it."""
    flat = dict(flat)
    names = layout.layer_names(abstract)
    placed, added, shard_list = [], [], jax.tree.leaves(shardings)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key = layout.dotted(path)
        have = [n in flat for n in names[key]]
        if not any(have) and fresh_ok and hasattr(leaf, "addressable_shards"):
            placed.append(leaf)
            added.append(key)
            continue
        if not all(have):
            missing = [n for n, h in zip(names[key], have) if not h]
            raise CheckpointError(f"{where}: the checkpoint has no parameter {missing[0]} (needed for "
                                  f"{key}); " + ("pass initialised parameters" if fresh_ok else
                                                 "the config adds parameters that only training makes"
                                                 if hint == _FINETUNE_HINT else hint))
        parts = [np.asarray(flat.pop(n)) for n in names[key]]
        value = np.stack(parts) if layout.is_stacked(key) else parts[0]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {names[key][0]} {tuple(parts[0].shape)} has no "
                                  f"counterpart of that shape in the run's model; {hint}")
        value = value.astype(leaf.dtype)
        placed.append(jax.make_array_from_callback(value.shape, shard_list[len(placed)],
                                                   lambda idx, v=value: v[idx]))
    if flat:
        raise CheckpointError(f"{where}: checkpoint parameters {sorted(flat)[:4]} have no counterpart in the "
                              f"run's model; {hint}")
    treedef = jax.tree_util.tree_structure(abstract)
    return jax.tree_util.tree_unflatten(treedef, placed), added


def _restore_into(manager, directory, step, abstract_params, shardings, where: str, fresh_ok: bool = False):
    """A step's parameters laid out, typed and placed as `abstract_params` / `shardings` (a State of
    the run's model). Returns (params, names of the run's parameters the checkpoint lacks).

    When the checkpoint's layout is the run's (same paths and shapes), the arrays are restored
    straight onto the shardings. Otherwise (another run split, other memory layers, the per-layer
    layout of older checkpoints) they are read to host memory, regrouped by their per-layer names
    (`fot_jax.model.layout`) into the run's stacks and placed shard by shard (`_place`)."""
    tree = _stored_tree(directory, step)
    if tree is None or _shapes(tree["params"]) == _shapes(abstract_params):
        return _restore_params(manager, step, _abstract(abstract_params, shardings)), []
    flat = layout.unstack_flat(_read_numpy(manager, step, {"params": tree["params"]}))
    flat = {k.removeprefix("params."): v for k, v in flat.items()}
    return _place(flat, abstract_params, shardings, where, fresh_ok=fresh_ok)


def load_params(workdir: str, cfg, abstract_params, shardings, step=None, log=None):
    """Parameters of another run's (or an import's) checkpoint, placed on `shardings`, for
    fine-tuning (`train.init_from`). Model fields outside FINETUNE_MODEL_FIELDS must agree
    (differences are listed). Parameters that the run's config adds (memory-layer gates, q/k
    temperatures) come from `abstract_params` when it holds arrays (a fresh initialisation);
    every pretrained parameter must exist in the run with the same shape. The layers are
    regrouped into the run's stacks when the two split them differently."""
    directory = paths.join(workdir, "checkpoints")
    if not paths.isdir(directory):
        raise CheckpointError(f"train.init_from: no checkpoints in {workdir!r} (expected {directory}); "
                              "give a training workdir or the output of `fot-jax import`")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"train.init_from: {directory} holds no complete checkpoint")
        try:
            stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as err:  # noqa: BLE001
            raise _restore_error(step, directory, err) from err
        where = f"{directory}/{step} (train.init_from)"
        # parameters are cast to the run's param_dtype on restore
        _check_model_config(stored, cfg, where, ignore=FINETUNE_MODEL_FIELDS)
        changed = {
            k: v
            for k, v in config_diff(stored.get("model", {}), json.loads(cfg.to_json())["model"]).items()
            if k in FINETUNE_MODEL_FIELDS
        }
        try:
            params, added = _restore_into(manager, directory, step, abstract_params, shardings,
                                          where, fresh_ok=True)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise _restore_error(step, directory, err) from err
    finally:
        manager.close()
    if changed and log is not None:
        log("fine-tuning changes " + "; ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + (f"; new parameters (initialised): {', '.join(added)}" if added else ""))
    return params


def save_params(workdir: str, cfg, params, step: int = 0):
    """A parameters-only checkpoint (step `step`: params + config) that `load_model` reads and
    `train.init_from` fine-tunes from (what `fot-jax import` writes)."""
    manager = ocp.CheckpointManager(paths.join(workdir, "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(create=True,
                                                                         enable_async_checkpointing=False))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}), data=ocp.args.JsonSave({}),
        config=ocp.args.JsonSave(json.loads(cfg.to_json()))))
    manager.wait_until_finished()
    manager.close()
