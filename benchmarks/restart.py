"""A pod run with one SIGKILL: how long the restart takes and what goodput the run keeps.

    python benchmarks/restart.py                       # ~10 minutes: 2 processes x 1 CPU device
    python benchmarks/restart.py --steps 100 --kill-after 60

`fot-jax train` on the local pod with goodput recording, local checkpoints every
`--local-every` steps and persistent ones every `--persistent-every`; process 1 is SIGKILLed
`--kill-after` seconds in, and the pod's restart policy (`--max-restarts 1`) brings both processes
back. Printed: the restart time (the kill to the first step trained after it, and its parts: to
the pod's restart, to the restore), the steps lost, and `fot-jax goodput`'s report of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from fot_jax.parallel.local_pod import run_pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TimedSink:
    """Keeps every line written with the time it arrived, and shows the pod's progress lines."""

    def __init__(self):
        self.lines, self.start, self.lock, self.buf = [], time.monotonic(), threading.Lock(), ""

    def write(self, text):
        with self.lock:
            self.buf += text
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                self.lines.append((time.monotonic() - self.start, line))
                if re.search(r"\[p0\] step|resuming|restarting|exited|Traceback|error", line):
                    print(f"{self.lines[-1][0]:7.1f} s  {line}", flush=True)

    def flush(self):
        pass

    def first(self, pattern, after=0.0):
        for t, line in self.lines:
            if t >= after and re.search(pattern, line):
                return t, line
        return None, None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/dictionary_lookup.py")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--kill-after", type=float, default=300.0)
    p.add_argument("--local-every", type=int, default=20)
    p.add_argument("--persistent-every", type=int, default=200)
    p.add_argument("--workdir", help="default: a temporary directory")
    args, overrides = p.parse_known_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="fot_restart_")
    command = [sys.executable, "-m", "fot_jax.cli", "train", "--config", os.path.join(ROOT, args.config),
               "--workdir", workdir, f"--config.train.steps={args.steps}", "--config.train.goodput=True",
               f"--config.train.local_checkpoint_dir={workdir}/local",
               f"--config.train.local_checkpoint_every={args.local_every}",
               f"--config.train.checkpoint_every={args.persistent_every}", "--config.train.log_every=10",
               f"--config.train.eval_every={args.persistent_every}", "--heartbeat-timeout", "10", *overrides]
    sink = TimedSink()
    codes = run_pod(command, 2, 1, sink=sink, kill_after={1: args.kill_after}, max_restarts=1)
    if codes != [0, 0]:
        print("\n".join(line for _, line in sink.lines[-60:]), file=sys.stderr)
        raise SystemExit(f"the pod failed: {codes}")
    kill = args.kill_after
    restarted, _ = sink.first(r"restarting the pod", kill)
    restored, restore_line = sink.first(r"resuming from the local checkpoint at step|steps \d+->", kill)
    before = [int(m.group(1)) for t, line in sink.lines if t < kill
              for m in [re.search(r"\[p0\] step +(\d+)/", line)] if m]
    stepped, step_line = sink.first(r"\[p0\] step +\d+/", restarted or kill)
    resumed = re.search(r"at step (\d+)|steps (\d+)->", restore_line or "")
    resumed_at = int(next(g for g in resumed.groups() if g)) if resumed else None
    report = subprocess.run([sys.executable, "-m", "fot_jax.cli", "goodput", "--workdir", workdir, "--json",
                             os.path.join(workdir, "goodput.json")], capture_output=True, text=True)
    print(report.stdout)
    summary = json.load(open(os.path.join(workdir, "goodput.json")))
    print(f"SIGKILL of process 1 at {kill:.0f} s: the pod restarted {restarted - kill:.1f} s later, the run "
          f"restored step {resumed_at} at +{restored - kill:.1f} s and trained its next logged step at "
          f"+{stepped - kill:.1f} s; last step logged before the kill: {max(before) if before else None}")
    print(json.dumps({"restart_s": stepped - kill, "pod_restart_s": restarted - kill,
                      "restore_s": restored - kill, "resumed_at": resumed_at,
                      "last_logged_before_kill": max(before) if before else None,
                      "goodput": summary.get("goodput")}))


if __name__ == "__main__":
    main()
