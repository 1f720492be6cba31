"""A pod on one machine: N local processes x M simulated CPU devices running the same command.

    python -m fot_jax.parallel.local_pod --processes 2 --devices 4 -- \\
        fot-jax train --config configs/tiny.py --workdir /tmp/pod

Each process gets `XLA_FLAGS=--xla_force_host_platform_device_count=M`, `JAX_PLATFORMS=cpu` and the
`FOT_JAX_COORDINATOR` / `FOT_JAX_NUM_PROCESSES` / `FOT_JAX_PROCESS_ID` that `fot-jax train` joins
with (process 0 hosts the coordinator on a free local port). Output lines are prefixed `[pN]`.
When one process fails, the others get `--grace` seconds to notice (they should stop with an
error by themselves) and are then killed; the exit status is the first failure's. SIGTERM or
SIGINT to the simulator goes to every process (as a pod's preemption reaches every host); those
still running `--grace` seconds later are killed, and no process outlives the simulator (they
also die with it if it is killed outright). With `--max-restarts N` a failed process brings the
whole pod down and up again, at most N times (what a JobSet does on a real cluster): a run with
local checkpoints resumes from the newest step every process holds. This is what a TPU pod runs
(`launch/tpu.py` runs the same command on every worker), minus the hardware.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from fot_jax.parallel import with_host_devices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix, sink, lock, seen):
    for line in iter(stream.readline, ""):
        if seen is not None and len(seen) < 100000:
            seen.append(f"{prefix} {line}")
        with lock:
            sink.write(f"{prefix} {line}" if prefix else line)
            sink.flush()
    stream.close()


def _death_signal():
    """A function for the child to run before exec: SIGKILL when the simulator dies (Linux's
    PR_SET_PDEATHSIG), so none is left behind; resolved here, in the parent, so that the child
    imports nothing between fork and exec. None where prctl is not available."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


def run_pod(command: list[str], processes: int, devices: int, *, port: int | None = None,
            env: dict | None = None, grace: float = 60.0, timeout: float | None = None,
            kill_after: dict | None = None, kill_on: tuple | None = None, sink=None,
            cwd: str | None = None, stop: "threading.Event | None" = None,
            max_restarts: int = 0) -> list[int]:
    """Runs `command` as `processes` processes; returns their exit codes (process order).
    `stop` (an Event, set by a signal handler) sends SIGTERM to every process. Restart policy (a
    JobSet's): when a process fails and fewer than `max_restarts` restarts have happened, the
    others are killed at once and the whole pod starts again (a new coordinator port); the codes
    returned are the last attempt's. Failure tests (first attempt only): kill_after {process_id:
    seconds} SIGKILLs that process after so long; kill_on (process_id, text[, signal]) sends it
    SIGKILL (or the signal given) once any process has printed a line containing text."""
    if processes < 1 or devices < 1:
        raise ValueError(f"a pod needs at least 1 process and 1 device each, got {processes} x {devices}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    sink = sink or sys.stdout
    start = time.monotonic()
    for attempt in range(max_restarts + 1):
        last = attempt == max_restarts
        left = None if timeout is None else timeout - (time.monotonic() - start)
        first: list[int] = []
        codes = _attempt(command, processes, devices, port=port if attempt == 0 else None, env=env,
                         grace=grace if last else 0.0, timeout=left, sink=sink, cwd=cwd, stop=stop,
                         kill_after=kill_after if attempt == 0 else None,
                         kill_on=kill_on if attempt == 0 else None, first=first)
        if all(c == 0 for c in codes) or last or (stop is not None and stop.is_set()) or \
                (left is not None and time.monotonic() - start >= timeout):
            return codes
        i = first[0] if first else next(i for i, c in enumerate(codes) if c != 0)
        c = codes[i]
        sink.write(f"local_pod: process {i} exited with {c}; restarting the pod "
                   f"(restart {attempt + 1} of {max_restarts})\n")
        sink.flush()
    return codes


def _attempt(command, processes, devices, *, port, env, grace, timeout, sink, cwd, stop, kill_after,
             kill_on, first=None) -> list[int]:
    """One start of the pod: its processes' exit codes (`first` receives the first to fail)."""
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    seen = [] if kill_on is not None else None
    on_parent_death = _death_signal()
    for pid in range(processes):
        e = dict(os.environ, **(env or {}))
        e.update(XLA_FLAGS=with_host_devices(e.get("XLA_FLAGS", ""), devices),
                 JAX_PLATFORMS="cpu", FOT_JAX_COORDINATOR=f"127.0.0.1:{port}",
                 FOT_JAX_NUM_PROCESSES=str(processes), FOT_JAX_PROCESS_ID=str(pid),
                 PYTHONUNBUFFERED="1")
        p = subprocess.Popen(command, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True, preexec_fn=on_parent_death)
        procs.append(p)
        t = threading.Thread(
            target=_pump, args=(p.stdout, f"[p{pid}]" if processes > 1 else "", sink, lock, seen), daemon=True
        )
        t.start()
        pumps.append(t)
    start = time.monotonic()
    try:
        return _supervise(procs, pumps, start, grace, timeout, kill_after, kill_on, seen, stop, first)
    finally:
        for p in procs:          # whatever happened (an exception, KeyboardInterrupt): none is left
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
                p.wait()


def _signal(p, sig):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def _supervise(procs, pumps, start, grace, timeout, kill_after, kill_on, seen, stop, first=None):
    """Waits for the processes; `first` (a list) receives the id of the first one that failed."""
    first_failure = None
    failed_first = first if first is not None else []
    stopped_at = None
    killed = set()
    while True:
        now = time.monotonic() - start
        codes = [p.poll() for p in procs]
        for pid, seconds in (kill_after or {}).items():
            if pid not in killed and now >= seconds and codes[pid] is None:
                os.killpg(procs[pid].pid, signal.SIGKILL)
                killed.add(pid)
        if kill_on is not None and kill_on[0] not in killed and codes[kill_on[0]] is None and \
                any(kill_on[1] in line for line in list(seen)):
            _signal(procs[kill_on[0]], kill_on[2] if len(kill_on) > 2 else signal.SIGKILL)
            killed.add(kill_on[0])
        if stop is not None and stop.is_set() and stopped_at is None:
            stopped_at = time.monotonic()
            for p in procs:
                if p.poll() is None:
                    _signal(p, signal.SIGTERM)
        if all(c is not None for c in codes):
            break
        if first_failure is None and any(c not in (None, 0) for c in codes):
            first_failure = time.monotonic()
            # the cause, when several are seen at once: a process this supervisor killed (even one
            # not reaped yet: on a loaded machine a peer can notice its death and exit first), else
            # one a signal ended, else the first (the others exit on noticing it: code 3 or an abort)
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            cause = ([i for i in sorted(killed) if codes[i] != 0] or [i for i in failed if codes[i] < 0]
                     or failed)
            failed_first.append(cause[0])
        if (first_failure is not None and time.monotonic() - first_failure > grace) or \
                (stopped_at is not None and time.monotonic() - stopped_at > grace) or \
                (timeout is not None and now > timeout):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait()
            break
        time.sleep(0.1)
    for t in pumps:
        t.join(timeout=5)
    return [p.returncode for p in procs]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="local_pod", description="N local processes x M CPU devices")
    parser.add_argument("--processes", "-n", type=int, default=2)
    parser.add_argument("--devices", "-m", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the others get to stop by themselves after one fails")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart the whole pod when a process fails, at most this many times")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("give the command after --")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    codes = run_pod(command, args.processes, args.devices, port=args.port, grace=args.grace, stop=stop,
                    max_restarts=args.max_restarts)
    print(f"local_pod: exit codes {codes}", file=sys.stderr)
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    return bad[0] if bad[0] > 0 else 128 - bad[0]   # killed by a signal: 128 + signal


if __name__ == "__main__":
    sys.exit(main())
