"""Local (emergency) checkpoints: frequent saves of each host's own shards to a disk of its own (a
ramdisk such as /dev/shm, or a local SSD), beside the rarer persistent checkpoints in the workdir.

    --config.train.local_checkpoint_dir=/dev/shm/fot --config.train.local_checkpoint_every=20
    (or --config.train.local_checkpoint_minutes=5)

Each process writes the shards of the train state it holds (no collective, no shared storage) with
Orbax (a PyTree handler whose array handler has no primary host: every host writes its own shards),
under `<local_checkpoint_dir>/<run>-<hash of the workdir>/process_<i>`, together with the data
position and stage (the same `data` record as a persistent checkpoint) and the topology it was
written on. Orbax writes a step under a temporary name and renames it when complete, so a process
killed mid-save leaves nothing that is ever listed.

A run is known by the id in `<workdir>/run_id` (written once, by process 0): local steps of an
earlier run in a deleted and recreated workdir are never restored. On start every host lists its
complete local steps of this run and topology; the hosts agree
(all-gather) on the newest step that every one of them holds. When that step is newer than the
newest persistent checkpoint, each host restores its own shards from it; a host that cannot read
its copy (corrupt) makes all of them try the next older common step, and then the persistent
checkpoint. Hosts that disagree about their newest step get a warning that lists each one's. Once
the run knows the step it resumes from (local, persistent or none), each host deletes its local
steps after it: they belong to the timeline the restart abandoned.

A local checkpoint restores only on the topology that wrote it (the same processes, devices and
mesh: a host's disk holds only its own shards); a run restarted on another topology resumes from the
persistent checkpoint, which restores onto any mesh.

Orbax's own emergency `CheckpointManager` restores a lost host's shards from a replica on another
slice, which needs at least two data-parallel slices; this works on any mesh, one slice included,
and restores only from the hosts' own disks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

from fot_jax.errors import FotError


class _QuietSizeLogging(logging.Filter):
    """Orbax warns on every save without a primary host that it does not log global sizes."""

    def filter(self, record):
        return "Global object size logging disabled" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietSizeLogging())

LOCAL_KEEP = 2          # local steps kept per host (the newest may be mid-write when a host dies)


class LocalCheckpointError(FotError, RuntimeError):
    pass


def run_directory(base: str, workdir: str, process: int | None = None) -> str:
    """This process's local directory for the run in `workdir` (one per run, one per process)."""
    process = jax.process_index() if process is None else process
    full = os.path.abspath(workdir) if "://" not in workdir else workdir
    tag = hashlib.sha256(full.encode()).hexdigest()[:10]
    name = os.path.basename(full.rstrip("/")) or "run"
    return os.path.join(base, f"{name}-{tag}", f"process_{process}")


def host_bytes(tree) -> int:
    """Bytes of the shards of `tree` this process holds (each distinct shard once)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            seen = set()
            for s in x.addressable_shards:
                key = tuple((sl.start, sl.stop) for sl in s.index)
                if key not in seen:
                    seen.add(key)
                    total += int(np.prod(s.data.shape)) * x.dtype.itemsize
        else:
            total += np.asarray(x).nbytes
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_room(directory: str, needed: int, field: str = "train.local_checkpoint_dir") -> None:
    """Refuses (one line) a directory that cannot be created or written, or whose disk has less free
    space than one save of `needed` bytes."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise LocalCheckpointError(f"{field}: {directory} is not writable ({e.strerror or e}); give a "
                                   "directory on a local disk or ramdisk this process can write") from None
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise LocalCheckpointError(
            f"{field}: {directory} has {_mb(free)} free, one local save of this process's shards needs "
            f"{_mb(needed)}; free space there or choose a larger disk (a ramdisk needs that much memory)")


def run_id(workdir: str) -> str:
    """The id of the run in `workdir`: process 0 writes it once; every process reads it."""
    import uuid

    from fot_jax import paths
    from fot_jax.parallel import distributed
    path = paths.join(workdir, "run_id")
    if jax.process_index() == 0 and not _exists(path):
        paths.makedirs(workdir)
        tmp = f"{path}.tmp{os.getpid()}"
        with paths.open_file(tmp, "w") as f:
            f.write(uuid.uuid4().hex)
        paths.rename(tmp, path)
    distributed.barrier("run_id")
    with paths.open_file(path) as f:
        return f.read().strip()


def _exists(path: str) -> bool:
    from etils import epath
    return epath.Path(path).exists()


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"fot-jax: process {jax.process_index()}: warning: {msg}", file=sys.stderr, flush=True)


def _allgather(values: np.ndarray) -> np.ndarray:
    """[processes, *values.shape]: every process's `values` (one process: just its own)."""
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), *values.shape)


def topology(mesh) -> dict:
    """What a host's shards depend on besides the config: processes, this one's index, the mesh."""
    return {"processes": jax.process_count(), "process": jax.process_index(),
            "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
            "devices": [int(d.id) for d in mesh.devices.flat]}


class LocalCheckpoints:
    """This host's local checkpoints of one run (see the module doc). `every` steps and/or `minutes`
    between saves; the time rule is decided by process 0's clock and shared, so every host saves at
    the same step."""

    def __init__(self, base: str, workdir: str, mesh, every: int = 0, minutes: float = 0.0,
                 keep: int = LOCAL_KEEP):
        self.directory = run_directory(base, workdir)
        self.run_id = run_id(workdir)
        self.every, self.minutes = int(every), float(minutes)
        self.topology = topology(mesh)
        self.workdir = workdir
        check_room(self.directory, 0)
        pid = jax.process_index()
        self._mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid},
                                                      barrier_sync_key_prefix=f"fot_jax_local_{pid}")
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=self._handlers(),
            options=ocp.CheckpointManagerOptions(
                create=False, max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True,
                multiprocessing_options=self._mp, enable_per_process_directory_creation=True,
                save_root_metadata=False, enable_background_delete=False))
        self.last_save = time.monotonic()

    def _handlers(self):
        # every host writes (and reads) the shards it holds: no primary host, no replica selection
        registry = type_handler_registry.create_type_handler_registry(
            (jax.Array, type_handlers.ArrayHandler(primary_host=None, replica_id=None,
                                                   use_replica_parallel=False)))
        return {"state": ocp.handlers.PyTreeCheckpointHandler(
                    use_ocdbt=True, use_zarr3=True, multiprocessing_options=self._mp,
                    type_handler_registry=registry),
                "meta": ocp.handlers.JsonCheckpointHandler(multiprocessing_options=self._mp)}

    def check_room(self, state) -> int:
        """Refuses before step 0 a disk without room for one save; returns the bytes of one save."""
        needed = host_bytes(state)
        check_room(self.directory, needed)
        return needed

    # -- saving ----------------------------------------------------------------------------------
    def due(self, done: int) -> bool:
        """Whether every host saves a local checkpoint after step `done` (the same answer on all)."""
        if self.every and done % self.every == 0:
            return True
        if not self.minutes:
            return False
        late = np.int32(time.monotonic() - self.last_save >= self.minutes * 60)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            late = multihost_utils.broadcast_one_to_all(late)
        return bool(late)

    def save(self, step: int, state, data_state: dict | None, model_config: dict) -> None:
        """Starts an asynchronous save of this host's shards at `step` (the copy to host memory
        blocks; the write does not)."""
        meta = {"step": int(step), "workdir": self.workdir, "run_id": self.run_id, "topology": self.topology,
                "data": data_state or {}, "model": model_config}
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                              meta=ocp.args.JsonSave(meta)), force=True)
        self.last_save = time.monotonic()

    # -- restoring -------------------------------------------------------------------------------
    def _meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def usable_steps(self) -> list[int]:
        """This host's complete local steps written by this run on this topology, newest first; an
        unreadable one is skipped with a warning."""
        out = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self._meta(step)
            except Exception as err:  # noqa: BLE001 -- any failure to read: corrupt
                _warn(f"local checkpoint step {step} in {self.directory} is unreadable "
                      f"({type(err).__name__}); skipped")
                continue
            if meta.get("run_id") != self.run_id:
                _warn(f"local checkpoint step {step} in {self.directory} belongs to an earlier run in this "
                      "workdir; deleted")
                self.manager.delete(step)
                continue
            if meta.get("topology") != self.topology:
                _warn(f"local checkpoint step {step} in {self.directory} was written on another topology "
                      f"({meta.get('topology', {}).get('processes')} processes, mesh "
                      f"{meta.get('topology', {}).get('mesh')}); skipped")
                continue
            out.append(step)
        return out

    def common_steps(self, log=_log) -> list[int]:
        """The steps every host holds, newest first (agreed by all hosts); warns, listing each
        host's newest step, when they differ."""
        mine = self.usable_steps()[: 2 * LOCAL_KEEP + 2]
        row = np.full(2 * LOCAL_KEEP + 2, -1, np.int32)
        row[: len(mine)] = mine
        everyone = _allgather(row)
        sets = [set(int(s) for s in r if s >= 0) for r in everyone]
        common = sorted(set.intersection(*sets), reverse=True) if sets else []
        newest = [max(s) if s else None for s in sets]
        if len(set(newest)) > 1:
            log("warning: hosts hold different newest local checkpoints ("
                + ", ".join(f"process {i}: {'none' if s is None else f'step {s}'}"
                            for i, s in enumerate(newest))
                + "); " + (f"using step {common[0]}, the newest all hold" if common else "none is common"))
        return common

    def restore(self, abstract_state, newer_than: int | None, log=_log):
        """(state, record, step) from the newest local step every host holds and reads, when it is
        newer than `newer_than` (the newest persistent step); else None. `record`: what the save
        wrote beside the shards (`data`, `model`, `topology`, ...)."""
        for step in self.common_steps(log):
            if newer_than is not None and step <= newer_than:
                return None
            state = meta = None
            try:
                meta = self._meta(step)
                restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)))
                state = restored["state"]
                jax.block_until_ready(state)
            except Exception as err:  # noqa: BLE001 -- corrupt or incomplete: the next older step
                _warn(f"local checkpoint step {step} in {self.directory} cannot be restored "
                      f"({type(err).__name__}: {str(err)[:200]}); trying an older one")
                state = None
            ok = _allgather(np.array([state is not None], np.int32))[:, 0]
            if ok.all():
                return state, meta, step
            log(f"warning: local checkpoint step {step} is unreadable on process(es) "
                f"{[i for i, v in enumerate(ok) if not v]}; trying an older step")
        return None

    def discard_after(self, step: int) -> None:
        """Deletes this host's local steps after `step`, the step the run resumes from (0: none)."""
        for s in self.manager.all_steps():
            if s > step:
                self.manager.delete(s)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
