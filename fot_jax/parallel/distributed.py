"""Multi-host (multi-controller) runtime: start-up, agreement checks and bounded barriers.

A pod is N hosts running the same program; each is one JAX process that owns its local devices.
`initialize()` joins the processes:

- Under a scheduler, `jax.distributed.initialize()` finds the others itself, and fot_jax asks it to
  without flags when `detect_cluster()` sees one: GKE TPU slices (JobSet, `launch/xpk.py`), Cloud
  TPU VM pods, multislice, Slurm and Open MPI with more than one process
  (`FOT_JAX_DISTRIBUTED=auto` forces it, `off` turns it off).
- On CPU or GPU machines without a scheduler, give the coordinator (`host:port` of process 0), the
  process count and this process's id, as flags (`fot-jax train --coordinator ... --num-processes
  ... --process-id ...`) or environment (`FOT_JAX_COORDINATOR`, `FOT_JAX_NUM_PROCESSES`,
  `FOT_JAX_PROCESS_ID`); `launch/local_pod.py` does this for N local processes. CPU collectives
  use gloo.

After joining, `check_agreement(cfg)` makes every process publish a hash of its config and of the
fot_jax source it runs; a process that differs stops all of them with an error naming the process
and what differs (different configs on different hosts otherwise hang or silently diverge). Every
wait (`barrier`, the agreement check) has a timeout. A process that dies is noticed by the others
through the coordination service's heartbeats (`heartbeat_timeout_s`) or by a failed collective:
they stop with an error instead of hanging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys

import jax

from fot_jax import __version__
from fot_jax.config import config_diff
from fot_jax.errors import FotError

ENV_COORDINATOR = "FOT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "FOT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FOT_JAX_PROCESS_ID"
ENV_MODE = "FOT_JAX_DISTRIBUTED"          # "" (decide) | auto (jax detects: TPU/SLURM/MPI) | off


class DistributedError(FotError, RuntimeError):
    pass


@dataclasses.dataclass
class DistributedSettings:
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    mode: str = ""
    init_timeout_s: int = 120
    heartbeat_timeout_s: int = 30
    barrier_timeout_s: int = 600

    @classmethod
    def from_env(cls, coordinator=None, num_processes=None, process_id=None, **kwargs):
        env = os.environ
        def pick(value, name, cast=str, default=None):
            if value is not None:
                return value
            return cast(env[name]) if env.get(name, "") != "" else default
        try:
            return cls(coordinator=pick(coordinator, ENV_COORDINATOR, str, ""),
                       num_processes=pick(num_processes, ENV_NUM_PROCESSES, int, 1),
                       process_id=pick(process_id, ENV_PROCESS_ID, int, 0),
                       mode=env.get(ENV_MODE, ""), **kwargs)
        except ValueError as e:
            raise DistributedError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers ({e})")

    def wanted(self) -> str:
        """'explicit', 'auto' or 'off'."""
        if self.mode == "off":
            return "off"
        if self.mode == "auto":
            return "auto"
        if self.coordinator or self.num_processes > 1:
            return "explicit"
        return "auto" if detect_cluster() else "off"


def _count(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def detect_cluster(env=None) -> str | None:
    """The multi-process scheduler this process runs under, which `jax.distributed.initialize()`
    reads by itself: 'gke-tpu' (GKE TPU slices: JobSet/xpk), 'cloud-tpu' (a TPU VM pod slice or
    queued resource), 'multislice' (several TPU slices, one host each), 'slurm' or 'openmpi' with
    more than one process; None for one process (or FOT_JAX_* / flags, handled as explicit)."""
    env = os.environ if env is None else env
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1:
        return "gke-tpu" if env.get("KUBERNETES_SERVICE_HOST") else "cloud-tpu"
    if _count(env.get("MEGASCALE_NUM_SLICES")) > 1:
        return "multislice"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _count(env.get("SLURM_NTASKS")) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "openmpi"
    return None


_STATE = {"initialized": False, "settings": None, "barriers": {}}


def initialize(settings: DistributedSettings | None = None) -> bool:
    """Joins the other processes (see module doc). Returns whether this is a multi-process run.
    Must run before JAX touches a device."""
    settings = settings or DistributedSettings.from_env()
    how = settings.wanted()
    if how == "off" or _STATE["initialized"]:
        return jax.process_count() > 1 if _STATE["initialized"] else False
    if how == "explicit":
        if not settings.coordinator:
            raise DistributedError(f"{settings.num_processes} processes need a coordinator address "
                                   f"(--coordinator HOST:PORT or ${ENV_COORDINATOR}, process 0's address)")
        if ":" not in settings.coordinator:
            raise DistributedError(f"coordinator {settings.coordinator!r} must be HOST:PORT")
        if settings.num_processes < 1 or not 0 <= settings.process_id < settings.num_processes:
            raise DistributedError(
                f"process id {settings.process_id} is not in 0..{settings.num_processes - 1} "
                f"(--process-id / ${ENV_PROCESS_ID}, --num-processes / ${ENV_NUM_PROCESSES})"
            )
    if how == "explicit" and settings.process_id != 0:
        # jax aborts the process (no Python exception) when it cannot reach the coordinator: probe
        # it first, so that an unreachable address is an error that names it.
        _wait_for_coordinator(settings)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - older/newer jax without the option: its default applies
        pass
    kwargs = dict(initialization_timeout=int(settings.init_timeout_s),
                  heartbeat_timeout_seconds=int(settings.heartbeat_timeout_s))
    try:
        if how == "auto":
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(coordinator_address=settings.coordinator,
                                       num_processes=settings.num_processes,
                                       process_id=settings.process_id, **kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises several types (RuntimeError, XlaRuntimeError)
        where = settings.coordinator or "the auto-detected coordinator"
        raise DistributedError(
            f"could not join the distributed run through coordinator {where} within "
            f"{settings.init_timeout_s} s as process {settings.process_id} of {settings.num_processes} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). Check that process 0 "
            "is running, that the address is reachable from this host and that every process was "
            "given the same process count.") from e
    _STATE.update(initialized=True, settings=settings)
    return jax.process_count() > 1


def _wait_for_coordinator(settings: DistributedSettings) -> None:
    import socket
    import time
    host, port = settings.coordinator.rsplit(":", 1)
    deadline = time.monotonic() + settings.init_timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            last = e
            time.sleep(0.5)
    raise DistributedError(
        f"coordinator {settings.coordinator} not reachable within {settings.init_timeout_s} s from process "
        f"{settings.process_id} of {settings.num_processes} ({type(last).__name__}: {last}). Start process 0 "
        "(it hosts the coordinator), check the address and port, and that this host can reach it.")


def is_initialized() -> bool:
    """Whether this process joined a distributed run through `initialize()`."""
    return bool(_STATE["initialized"])


def _client():
    from jax._src import distributed as _dist
    return _dist.global_state.client


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reaches `barrier(name)`; a DistributedError after `timeout_s`
    names the barrier (a process that died or is stuck elsewhere)."""
    if jax.process_count() == 1:
        return
    settings = _STATE["settings"] or DistributedSettings()
    timeout_s = settings.barrier_timeout_s if timeout_s is None else timeout_s
    # Every process passes the same barriers in the same order; a counter makes each id unique.
    count = _STATE["barriers"][name] = _STATE["barriers"].get(name, 0) + 1
    try:
        _client().wait_at_barrier(f"fot_jax/{name}/{count}", int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"process {jax.process_index()}: barrier {name!r} not reached by every one of "
                               f"{jax.process_count()} processes within {timeout_s:.0f} s "
                               f"({type(e).__name__}: {str(e)[:200]}); a process died or is stuck") from e


@contextlib.contextmanager
def primary_first(name: str):
    """Process 0 runs the block first (e.g. preparing a dataset on a shared disk), the others after."""
    if jax.process_count() == 1:
        yield
        return
    if jax.process_index() != 0:
        barrier(name)
    yield
    if jax.process_index() == 0:
        barrier(name)


def code_fingerprint() -> str:
    """sha256 over fot_jax's own source files (the code every host must run identically)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def fingerprint(cfg) -> dict:
    cfg_json = json.dumps(json.loads(cfg.to_json()), sort_keys=True)
    return {"config": hashlib.sha256(cfg_json.encode()).hexdigest()[:16],
            "code": code_fingerprint()[:16], "version": __version__,
            "jax": jax.__version__, "config_json": cfg_json}


def check_agreement(cfg, timeout_s: float = 120) -> None:
    """Every process publishes its config and code hashes; any difference is a DistributedError
    on every process that names the differing process and the differing fields."""
    if jax.process_count() == 1:
        return
    me = fingerprint(cfg)
    client = _client()
    pid, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"fot_jax/fingerprint/{pid}", json.dumps(me))
    problems = []
    for other in range(n):
        if other == pid:
            continue
        try:
            theirs = json.loads(client.blocking_key_value_get(f"fot_jax/fingerprint/{other}",
                                                              int(timeout_s * 1000)))
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"process {pid}: process {other} did not report its config within "
                f"{timeout_s:.0f} s ({type(e).__name__}); is it running the same command?"
            ) from e
        what = [k for k in ("config", "code", "version", "jax") if theirs[k] != me[k]]
        if what:
            detail = ""
            if "config" in what:
                diff = config_diff(json.loads(theirs["config_json"]), json.loads(me["config_json"]))
                detail = " (" + "; ".join(f"{k}: process {other} {a!r}, process {pid} {b!r}"
                                          for k, (a, b) in list(diff.items())[:8]) + ")"
            problems.append(f"process {other} differs in {', '.join(what)}{detail}")
    # Everyone checks before anyone leaves, so no process starts training alone.
    barrier("agreement", timeout_s)
    if problems:
        raise DistributedError("hosts disagree, refusing to train: " + "; ".join(problems) +
                               ". Run the same fot_jax version with the same config on every host.")



def exit_on_failed_collective(fn, *args, **kwargs):
    """Calls `fn`; in a multi-process run, a failed collective (a process died: gloo/ICI reports a
    reset connection) stops this process at once (exit 3) with a message that says so, instead of a
    traceback followed by an abort in the coordination service's shutdown."""
    try:
        return fn(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
        if not is_initialized():
            raise
        print(f"fot-jax: process {jax.process_index()} of {jax.process_count()}: a step with the other "
              f"processes failed ({str(e).splitlines()[0][:300]}). Another process probably died or was "
              "preempted; see its log. Stopping; restart all processes to resume from the last "
              "checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)  # skip jax's shutdown barrier, which the dead process can never reach
