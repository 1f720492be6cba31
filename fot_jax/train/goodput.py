"""Where a run's wall time goes. With `train.goodput`, process 0 appends what it did to
`<workdir>/goodput.jsonl`, one JSON object a line, across restarts:

    job_start   a process started the run
    init        constructing the trainer: mesh, sharded state, compiled nothing yet (seconds)
    restore     reading a checkpoint (seconds; step: the step the run goes on from)
    step        one train step: seconds between the end of the previous step and the end of this one,
                less the evaluation, checkpoint and hook time inside; data_seconds of it waiting for
                the batch; compile true when the step compiled a new program
    eval        a held-out evaluation (seconds)
    checkpoint  the blocking part of a checkpoint save (seconds)
    job_end     the run finished or stopped cleanly

With `ml-goodput-measurement` installed and Cloud Logging reachable (a GCP job), the same moments
also go to its `GoodputRecorder` (job start and end, training preparation, every step's start, data
loading), under the job name of the workdir's last path part, for its calculator and monitor; where
the package or the cloud is absent, the run says so once and the local log is all there is. A
bucket workdir, which cannot be appended to, keeps only the cloud record.

`summarize` turns the events into goodput (productive step time over the job's wall time, from the
first job_start to the last event) and badput by cause; `fot-jax goodput --workdir W` prints it.
A restart is a job_start after the first: the wall time between the previous attempt's last event
and the restart, plus the steps that attempt trained beyond the checkpoint the restart resumed from,
is restart badput. Times are `time.time()` seconds, so attempts on different hosts of one pod are
comparable only as far as their clocks agree.
"""
from __future__ import annotations

import json
import os
import time

from fot_jax import paths
from fot_jax.errors import FotError

FILE = "goodput.jsonl"
CAUSES = ("compile", "data", "checkpoint", "eval", "init", "restart", "other")


class GoodputError(FotError, ValueError):
    """A goodput log that cannot be read."""


def cloud_recorder(job_name: str, log=print):
    """ml-goodput-measurement's GoodputRecorder writing to Cloud Logging, or None (said once, with
    why) where the package is not installed or Cloud Logging cannot be reached."""
    try:
        from ml_goodput_measurement import goodput as mgm
    except ImportError:
        log("goodput: ml-goodput-measurement is not installed (pip install -e '.[goodput]'): recording "
            "locally only")
        return None
    try:
        return mgm.GoodputRecorder(job_name=job_name, logger_name=f"goodput_{job_name}", logging_enabled=True)
    except Exception as e:  # noqa: BLE001 -- no credentials, no project, no network: no cloud
        why = str(e).splitlines()[0][:200] if str(e) else ""
        log(f"goodput: Cloud Logging is not reachable ({type(e).__name__}: {why}): recording locally only")
        return None


class _CloudMirror:
    """Maps the local events onto GoodputRecorder's calls (backfilled times, UTC)."""

    def __init__(self, recorder, log=print):
        self.recorder, self.log = recorder, log

    def event(self, name: str, now: float, fields: dict) -> None:
        if self.recorder is None:
            return
        import datetime
        def at(t):
            return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        r = self.recorder
        try:
            if name == "job_start":
                r.record_job_start_time(at(now))
            elif name == "init":
                r.record_training_preparation_start_time(at(now - fields["seconds"]))
                r.record_training_preparation_end_time(at(now))
            elif name == "step":
                start = now - fields["seconds"]
                r.record_step_start_time(int(fields["step"]) - 1, at(start))
                if fields.get("data_seconds"):
                    r.record_data_loading_start_time(at(start))
                    r.record_data_loading_end_time(at(start + fields["data_seconds"]))
            elif name == "job_end":
                r.record_job_end_time(at(now))
        except Exception as e:  # noqa: BLE001 -- the record must never stop training
            self.log(f"goodput: the cloud recorder failed ({type(e).__name__}: {e}); recording locally only")
            self.recorder = None


class Recorder:
    """Appends events to `<workdir>/goodput.jsonl` (a no-op when `enabled` is false) and, where
    ml-goodput-measurement and Cloud Logging are available, mirrors them to its recorder."""

    def __init__(self, workdir: str, enabled: bool, log=print, cloud=None):
        self.enabled = enabled
        self.path = paths.join(workdir, FILE)
        self.cloud = _CloudMirror(None)
        if not enabled:
            return
        job = os.path.basename(str(workdir).rstrip("/")) or "fot_jax"
        self.cloud = _CloudMirror(cloud_recorder(job, log) if cloud is None else cloud, log)
        self.local = not paths.is_url(workdir)
        if not self.local and self.cloud.recorder is None:
            raise GoodputError(f"train.goodput appends to {FILE}, which an object store ({workdir}) cannot "
                               "do, and no Cloud Logging recorder is available; give a local workdir or "
                               "leave train.goodput off")
        if self.local:
            os.makedirs(workdir, exist_ok=True)

    def event(self, name: str, **fields) -> None:
        if not self.enabled:
            return
        now = time.time()
        self.cloud.event(name, now, fields)
        if self.local:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": name, "time": now, **fields}) + "\n")


def read(workdir: str) -> list[dict]:
    path = paths.join(workdir, FILE)
    if not os.path.exists(path):
        raise GoodputError(f"no {FILE} in {workdir}: train with --config.train.goodput=True to record one")
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:          # a process killed mid-write: only its last line is cut
                break
            raise GoodputError(f"{path}:{n}: not a JSON object") from None
    if not rows or rows[0].get("event") != "job_start":
        raise GoodputError(f"{path}: does not start with a job_start event")
    return rows


def summarize(events: list[dict]) -> dict:
    """Goodput and badput (seconds and shares of the wall time) by cause, attempts and lost steps."""
    attempts: list[list[dict]] = []
    for e in events:
        if e["event"] == "job_start":
            attempts.append([])
        attempts[-1].append(e)
    badput = dict.fromkeys(CAUSES, 0.0)
    productive, lost_steps = 0.0, 0
    # a step that compiled costs its compilation on top of a typical step: the median of the run's
    # steps that compiled nothing
    plain = sorted(e["seconds"] - e.get("data_seconds", 0.0) for e in events
                   if e["event"] == "step" and not e.get("compile"))
    typical = plain[len(plain) // 2] if plain else 0.0

    def resumed_from(attempt):
        return next((e["step"] for e in attempt if e["event"] == "restore"), None)

    for i, attempt in enumerate(attempts):
        resumed_by = resumed_from(attempts[i + 1]) if i + 1 < len(attempts) else None
        steps = [e for e in attempt if e["event"] == "step"]
        for e in steps:
            work = e["seconds"] - e.get("data_seconds", 0.0)
            badput["data"] += e.get("data_seconds", 0.0)
            if resumed_by is not None and e["step"] > resumed_by:   # trained again after the restart
                badput["restart"] += work
                lost_steps += 1
                continue
            extra = max(work - typical, 0.0) if e.get("compile") else 0.0
            badput["compile"] += extra
            productive += work - extra
        for e in attempt:
            if e["event"] in ("restore", "checkpoint"):
                badput["checkpoint"] += e["seconds"]
            elif e["event"] in ("eval", "init"):
                badput[e["event"]] += e["seconds"]
        if i > 0:                            # the dead time between the attempts
            badput["restart"] += max(attempt[0]["time"] - attempts[i - 1][-1]["time"], 0.0)
    total = max(events[-1]["time"] - events[0]["time"], 1e-9)
    badput["other"] = max(total - productive - sum(v for k, v in badput.items() if k != "other"), 0.0)
    return {"wall_seconds": total, "productive_seconds": productive, "goodput": productive / total,
            "badput_seconds": badput, "badput": {k: v / total for k, v in badput.items()},
            "attempts": len(attempts), "steps_lost": lost_steps,
            "last_step": max((e["step"] for e in events if e["event"] == "step"), default=0),
            "finished": events[-1]["event"] == "job_end"}


def report(summary: dict) -> str:
    s = summary
    ended = "" if s["finished"] else " (the last attempt did not end cleanly)"
    lines = [f"wall time {s['wall_seconds']:.1f} s over {s['attempts']} attempt(s), last step "
             f"{s['last_step']}{ended}",
             f"goodput: {100 * s['goodput']:.1f}% ({s['productive_seconds']:.1f} s of train steps)",
             f"steps lost to restarts: {s['steps_lost']}",
             "", "| badput | seconds | share |", "| --- | ---: | ---: |"]
    for cause in CAUSES:
        lines.append(f"| {cause} | {s['badput_seconds'][cause]:.1f} | {100 * s['badput'][cause]:.1f}% |")
    return "\n".join(lines)
