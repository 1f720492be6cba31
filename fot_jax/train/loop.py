"""The training loop: mesh, sharded state, jitted steps, training stages (data, crossbatch range,
learning rates, each until a step or a training accuracy), periodic evaluation (at several
crossbatch ranges), metrics and the end-of-run report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import checks, paths
from fot_jax import config as config_lib
from fot_jax.checkpoint import Checkpoints, load_params
from fot_jax.data.sources import describe as describe_data
from fot_jax.data.sources import make_batcher
from fot_jax.data.text import TOKENIZED_TASKS, tokenizer_path
from fot_jax.data.tokenizer import load_tokenizer
from fot_jax.errors import FotError
from fot_jax.local_checkpoint import LocalCheckpoints
from fot_jax.model import kernels
from fot_jax.parallel import distributed
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train import goodput as goodput_lib
from fot_jax.train import metrics as metrics_lib
from fot_jax.train.compile import (
    TrainStep,
    batch_shardings,
    check_batch_divides,
    global_batcher_state,
    jit_eval_step,
    jit_train_step,
    to_global,
)
from fot_jax.train.optim import check_trainable, make_schedule
from fot_jax.train.stages import StageSchedule
from fot_jax.train.state import count_params, create_train_state


class TrainingError(FotError, RuntimeError):
    pass


class StopTraining(Exception):
    """Raised by a hook to end the run after the step it saw: a checkpoint is saved at that step
    and the run finishes as at its last step (final evaluation, summary); the message is the
    reason the summary gives for the stage's end."""


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What a hook sees after a step (read-only)."""
    step: int                                   # steps completed (the step just trained is step - 1)
    total_steps: int                            # train.steps
    stage: str                                  # the stage that trained the step
    stage_index: int
    r: int                                      # the crossbatch range the step trained with
    seconds: float                              # since this run (process) started training
    metrics: Mapping[str, Any]                  # the step's metrics as the device returned them
    progress: Mapping[str, float] | None = None   # the progress line written after the step, if any
    eval: Mapping[int, Mapping[str, float]] | None = None   # the evaluation run after the step, if any

    def host_metrics(self) -> dict[str, float]:
        """The step's metrics as floats (waits for the step to finish)."""
        return {k: float(v) for k, v in jax.device_get(dict(self.metrics)).items()}


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(record)` after every step that is a multiple of `every` (0: never) and, with `at_end`,
    after the last step."""
    fn: Callable[[StepRecord], None]
    every: int = 1
    at_end: bool = False

    def due(self, done: int, total: int) -> bool:
        return due(self.every, done, total, self.at_end)


def due(every: int, done: int, total: int, at_end: bool = False) -> bool:
    """Whether work done every `every` steps (0: never; with `at_end`, also after the last step)
    runs after step `done` of `total`."""
    return bool(every and done % every == 0) or (at_end and done == total)


@dataclasses.dataclass
class RunState:
    """What the loop keeps during one `Trainer.run` (the stages live in `Trainer.schedule`)."""
    start_step: int
    done: int                       # steps completed
    until: int | None
    data_state: dict | None         # the restored data position (applies when its stage starts)
    run_start: float
    last_time: float = 0.0          # of the last progress line
    last_step: int = 0
    batcher: Any = None
    batcher_stage: int | None = None
    range_max: int = 0
    r: int = 0                      # the range of the last step
    pending: dict | None = None     # the last step's metrics, still on the device
    history: list = dataclasses.field(default_factory=list)
    final_eval: dict | None = None
    stop: str | None = None         # "accuracy", "stages", "hook", "preempted" or "until"
    stop_reason: str | None = None  # a hook's StopTraining message
    step_mark: float = 0.0          # goodput: when the last step's bookkeeping ended
    aside: float = 0.0              # goodput: evaluation/checkpoint/hook seconds after this step
    data_seconds: float = 0.0       # goodput: waiting for this step's batch
    compiles: bool = False          # goodput: this step compiled a new program


class NoCheckpoints:
    """The seam where the checkpoint manager plugs in: restore() -> (state, data_state) or None."""

    def restore(self, abstract_state, shardings):
        return None

    def save(self, step, state, data_state, force=False):
        pass

    def local_due(self, step) -> bool:
        return False

    def offer_best(self, step, state, data_state, metrics):
        return False

    def wait(self):
        pass

    def close(self):
        pass


class _TermWatch:
    """SIGTERM handling for a run: the first signal sets `trainer._term`; a watcher thread (woken
    at once through `signal.set_wakeup_fd`, even while the main thread is blocked inside a
    collective) exits the process with 143 if the run has not stopped `timeout` seconds later, or
    at a second SIGTERM. Outside the main thread (tests) it does nothing."""

    def __init__(self, trainer, timeout: float):
        self.trainer, self.timeout = trainer, timeout
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self.done = threading.Event()
        self.read_sock, write_sock = socket.socketpair()
        self.write_sock = write_sock
        write_sock.setblocking(False)

        def on_term(signum, frame):
            self.trainer._term = True
        self.previous = signal.signal(signal.SIGTERM, on_term)
        self.previous_fd = signal.set_wakeup_fd(write_sock.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="fot-jax-sigterm").start()
        return self

    def _watch(self):
        first = None
        self.read_sock.settimeout(1.0)
        while not self.done.is_set():
            try:
                data = self.read_sock.recv(64)
            except (TimeoutError, OSError):
                data = b""
            terms = sum(1 for b in data if b == signal.SIGTERM)
            if terms:
                self.trainer._term = True
                if first is not None or terms > 1:
                    self._exit("a second SIGTERM")
                first = time.monotonic()
            if first is not None and time.monotonic() - first > self.timeout:
                self._exit(f"no agreed stop within train.stop_timeout={self.timeout:g} s of SIGTERM "
                           "(a host stuck in a collective?)")

    def _exit(self, why):
        if self.done.is_set():
            return
        print(f"fot-jax train: {why}: exiting (143) without saving; the last complete checkpoint stays "
              "valid", file=sys.stderr, flush=True)
        os._exit(143)

    def __exit__(self, *exc):
        if self.previous is None:
            return False
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGTERM, self.previous)
        self.read_sock.close()
        self.write_sock.close()
        return False


def adopt_init(cfg, init_from: str):
    """cfg with train.init_from = `init_from` (a checkpoint directory) and, when the run leaves
    model.trained_context at 0, the context its initial model records (an import's: so that a
    window beyond it is a config error naming model.max_position_embeddings)."""
    from fot_jax.checkpoint import stored_config
    d = cfg.to_dict()
    d["train"]["init_from"] = init_from
    if not cfg.model.trained_context:
        init_model = stored_config(init_from).get("model", {})
        d["model"]["trained_context"] = int(init_model.get("trained_context", 0))
    return checks.from_dict(d)


class Trainer:
    def __init__(self, cfg, workdir: str, checkpoints=None, devices=None, quiet: bool = False):
        """checkpoints: None -> `fot_jax.checkpoint.Checkpoints` in workdir; False -> none; or any
        object with restore/save/close."""
        init_start = time.perf_counter()
        self.goodput = goodput_lib.Recorder(workdir, bool(cfg.train.goodput) and jax.process_index() == 0,
                                            log=metrics_lib.log)
        self.goodput.event("job_start", pid=os.getpid(), processes=jax.process_count())
        checks.validate(cfg)
        if jax.process_count() > 1:
            distributed.check_agreement(cfg)
        checks.check_platform(cfg)
        if cfg.train.init_from:       # a model file or a package's: imported into the workdir once
            from fot_jax.convert.api import resolve_init_from
            resolved = resolve_init_from(cfg.train.init_from, workdir, log=metrics_lib.log)
            cfg = adopt_init(cfg, resolved)
        self.cfg, self.workdir = cfg, workdir
        self.quiet = quiet
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        check_batch_divides(cfg, self.mesh)
        if checkpoints is None:  # default: Orbax checkpoints in the workdir (resumes from there)
            checkpoints = Checkpoints(workdir, cfg, every=cfg.train.checkpoint_every,
                                      keep=cfg.train.checkpoint_keep, best=cfg.train.checkpoint_best,
                                      resume_step=cfg.train.resume_step)
        self.checkpoints = checkpoints or NoCheckpoints()  # False: no checkpoints
        self.schedule = make_schedule(cfg.train)      # the learning rate per step
        with mesh_lib.use_mesh(self.mesh):
            self.graphdef, self.tx, self.state, self.state_shardings = create_train_state(cfg, self.mesh)
        check_trainable(self.state["params"], list(cfg.train.trainable))
        if cfg.train.local_checkpoint_dir and isinstance(self.checkpoints, Checkpoints):
            local = LocalCheckpoints(cfg.train.local_checkpoint_dir, workdir, self.mesh,
                                     every=cfg.train.local_checkpoint_every,
                                     minutes=cfg.train.local_checkpoint_minutes)
            local.check_room(self.state)        # before step 0: a disk without room for one save
            self.checkpoints.attach_local(local)
        self.num_params = count_params(self.state["params"])
        self.attention_backend = kernels.resolve(cfg.model.attention_backend)
        self._train_steps = {}
        self._eval_steps = {}
        self.stages = config_lib.build_stages(cfg)
        self.stage_schedule: StageSchedule | None = None
        self.writer = None
        self.hooks: list[Hook] = []         # added with add_hook
        self.goodput.event("init", seconds=time.perf_counter() - init_start)

    # -- compiled steps ------------------------------------------------------------------------
    def _batch_shardings(self):
        return batch_shardings(self.mesh)

    def train_step_fn(self, range_max: int, cfg=None) -> TrainStep:
        """The train step for `range_max` with `cfg`'s (a stage's) crossbatch layout and microbatches."""
        cfg = cfg or self.cfg
        x = cfg.crossbatch
        key = (range_max, x.k_packing, x.stepping, x.doc_mask, x.implementation, cfg.train.microbatches)
        if key not in self._train_steps:
            self._train_steps[key] = jit_train_step(cfg, self.graphdef, self.tx, self.mesh,
                                                    self.state_shardings, range_max, self.schedule)
        return self._train_steps[key]

    def eval_step_fn(self, r: int):
        if r not in self._eval_steps:
            self._eval_steps[r] = jit_eval_step(self.cfg, self.graphdef, self.mesh,
                                                self.state_shardings["params"], r)
        return self._eval_steps[r]

    # -- data ----------------------------------------------------------------------------------
    def _host_batcher(self, cfg, split, num_docs=None):
        check_batch_divides(cfg, self.mesh)
        return make_batcher(cfg, split, num_docs=num_docs, host_index=jax.process_index(),
                            host_count=jax.process_count())

    def eval_batches(self):
        if not hasattr(self, "_eval_batches"):
            batcher = self._host_batcher(self.cfg, "validation")
            self._eval_batches = [next(batcher).as_dict() for _ in range(self.cfg.train.eval_batches)]
        return self._eval_batches

    def evaluate(self, ranges=None) -> dict:
        """{r: {"loss", "accuracy"}} over the fixed held-out batches."""
        ranges = list(self.cfg.crossbatch.eval_ranges if ranges is None else ranges)
        out = {}
        with mesh_lib.use_mesh(self.mesh):
            for r in ranges:
                fn = self.eval_step_fn(r)
                tot = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
                for batch in self.eval_batches():
                    res = jax.device_get(fn(self.state["params"], to_global(batch, self.mesh),
                                            jnp.int32(r)))
                    for k in tot:
                        tot[k] += float(res[k])
                n = max(tot["count"], 1.0)
                out[r] = {"loss": tot["loss_sum"] / n, "accuracy": tot["correct"] / n}
        return out

    # -- loop ----------------------------------------------------------------------------------
    def log(self, msg):
        if not self.quiet:
            metrics_lib.log(msg)

    def run(self, until: int | None = None) -> dict:
        """Trains to `train.steps` (or stops after step `until`, saving a checkpoint there, as a
        preemption would). SIGTERM (TPU preemption) stops the run at a step every host agrees on
        (see `_stop_agreed`), saves a checkpoint there and returns with `summary["preempted"] =
        True`; the next run resumes from it. A process that cannot reach that step within
        `train.stop_timeout` seconds of the signal (stuck in a collective), or that gets a second
        SIGTERM, exits 143 at once: checkpoints are written atomically, so nothing half-written
        is left."""
        self._term = False
        with _TermWatch(self, self.cfg.train.stop_timeout) as watch:
            self._term_watch = watch
            return self._run(until)

    def _stop_agreed(self, done: int) -> bool:
        """Whether every host stops after step `done`: each host's SIGTERM flag is all-gathered
        every `train.preemption_check_every` steps, so hosts that got the signal at different
        moments still save and stop at the same step."""
        if jax.process_count() == 1:
            return self._term
        if done % self.cfg.train.preemption_check_every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._term))))

    def _save_tokenizer(self):
        """A run on text keeps the tokenizer it was trained with in <workdir>/tokenizer, so that the
        workdir alone is enough to export (`fot-jax export` copies it), to run passkey, or to be
        the `train.init_from` of a further fine-tune. Process 0 writes it, once."""
        if self.cfg.data.task not in TOKENIZED_TASKS or jax.process_index() != 0:
            return
        out = paths.join(self.workdir, "tokenizer")
        if paths.isdir(out):
            return
        src = load_tokenizer(tokenizer_path(self.cfg)).path
        # under the names load_tokenizer and export look for; an HF tokenizer's special tokens
        # live beside it in tokenizer_config.json, its chat template in chat_template.jinja
        if src.endswith(".json"):
            files = {"tokenizer.json": src}
            for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                if os.path.exists(os.path.join(os.path.dirname(src), name)):
                    files[name] = os.path.join(os.path.dirname(src), name)
        else:
            files = {"tokenizer.model": src}
        tmp = out + ".tmp"
        paths.makedirs(tmp)
        for name, f in files.items():
            with open(f, "rb") as r, paths.open_file(paths.join(tmp, name), "wb") as w:
                w.write(r.read())
        paths.rename(tmp, out)

    # -- the loop: one step, then what is due after it ----------------------------------------
    def add_hook(self, fn: Callable[[StepRecord], None], every: int = 1, at_end: bool = False) -> None:
        """Calls `fn(record)` after every `every`-th step (and after the last one with `at_end`), after
        the run's own work for that step (progress line, stage end, evaluation, checkpoint) and before
        the check for an agreed stop. `fn` ends the run by raising `StopTraining`; any other
        exception propagates (the last checkpoint stays valid)."""
        if not callable(fn):
            raise TypeError(f"add_hook: {fn!r} is not callable")
        if int(every) < 0:
            raise ValueError(f"add_hook: every must be >= 0, got {every}")
        self.hooks.append(Hook(fn, int(every), at_end))

    def _run(self, until):
        rs = self._start(until)
        t = self.cfg.train
        with mesh_lib.use_mesh(self.mesh):
            for step in range(rs.start_step, t.steps):
                self._step(rs, step)
                self._after_step(rs)
                if rs.stop is not None:
                    break
            if rs.pending is not None:
                self._check({k: float(v) for k, v in jax.device_get(rs.pending).items()})
        return self._finish(rs)

    def _after_step(self, rs):
        """In this order: progress line and metrics, the end of a stage, held-out evaluation (best
        checkpoint, early stop), periodic checkpoint, the hooks added with `add_hook`, the agreed stop."""
        t, done = self.cfg.train, rs.done
        stage = self.stage_schedule.current
        rs.aside = 0.0                      # evaluation, checkpoint and hook seconds after this step
        progress = self._log_progress(rs) if due(t.log_every, done, t.steps, at_end=True) else None
        self._advance_stage(rs, progress is not None)
        evaluation = None
        if rs.stop is None and due(t.eval_every, done, t.steps, at_end=True):
            evaluation = self._evaluate(rs)
        if rs.stop is None and due(t.checkpoint_every, done, t.steps):
            self._save(rs, done)
        elif rs.stop is None and done < t.steps and self.checkpoints.local_due(done):
            self._save(rs, done, local=True)
        now = time.perf_counter()           # recorded before the hooks, which may not return
        self.goodput.event("step", step=done, seconds=now - rs.step_mark - rs.aside,
                           data_seconds=rs.data_seconds, compile=rs.compiles)
        rs.step_mark = now
        if rs.stop is None and self.hooks:
            hooks_start = time.perf_counter()
            record = StepRecord(
                step=done, total_steps=t.steps, stage=stage.name, stage_index=stage.index, r=rs.r,
                seconds=time.perf_counter() - rs.run_start, metrics=types.MappingProxyType(dict(rs.pending)),
                progress=None if progress is None else types.MappingProxyType(progress),
                eval=None if evaluation is None else types.MappingProxyType(
                    {r: types.MappingProxyType(v) for r, v in evaluation.items()}))
            for hook in self.hooks:
                if hook.due(done, t.steps):
                    try:
                        hook.fn(record)
                    except StopTraining as e:
                        self.log(f"a hook stopped the run after step {done}: {e}")
                        self._save(rs, done, force=True)
                        rs.stop, rs.stop_reason = "hook", f"hook: {e}"
                        break
            rs.step_mark += time.perf_counter() - hooks_start     # hook time is no step's
        if rs.stop is None:
            self._stop_check(rs)

    def _save(self, rs, step, force=False, local=False):
        """A checkpoint save, persistent or local (its blocking part timed as checkpoint badput)."""
        start = time.perf_counter()
        if local:
            self.checkpoints.save_local(step, self.state, self._data_state(rs))
        else:
            self.checkpoints.save(step, self.state, self._data_state(rs), force=force)
        seconds = time.perf_counter() - start
        rs.aside += seconds
        self.goodput.event("checkpoint", step=step, seconds=seconds, **({"local": True} if local else {}))

    def _start(self, until) -> "RunState":
        """Restores (or initialises from train.init_from), logs the run and returns its state."""
        t = self.cfg.train
        self.writer = metrics_lib.MetricWriter(self.workdir)
        self.peak, peak_source = metrics_lib.peak_flops()
        restore_start = time.perf_counter()
        restored = self.checkpoints.restore(self.state, self.state_shardings)
        data_state = None
        if restored is not None:
            self.state, data_state = restored
        elif t.init_from:
            params = load_params(t.init_from, self.cfg, self.state["params"], self.state_shardings["params"],
                                 log=self.log)
            self.state = dict(self.state, params=params)
            self.log(f"fine-tuning from the parameters in {t.init_from}")
        self._save_tokenizer()
        start = int(jax.device_get(self.state["step"]))
        self.goodput.event("restore", seconds=time.perf_counter() - restore_start, step=start)
        self.log(f"fot_jax: {self.num_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
                 f"{jax.device_count()} devices, attention {self.attention_backend}, MFU against "
                 f"{peak_source}, steps {start}->{t.steps}")
        rs = RunState(start_step=start, done=start, until=until, data_state=data_state,
                      run_start=time.perf_counter())
        rs.last_time, rs.last_step = rs.run_start, start
        rs.step_mark = time.perf_counter()
        self.stage_schedule = StageSchedule(self.stages)
        recorded = self.stage_schedule.resume(data_state, start)
        self._log_stage(rs, self.stage_schedule.start,
                        resumed_at=start if recorded or start > 0 else None)
        return rs

    def _begin_stage(self, rs, stage, step):
        self.stage_schedule.begin(stage, step)
        self._log_stage(rs, step)

    def _log_stage(self, rs, step, resumed_at=None):
        """One line on the stage being trained: where it began and, on a resumed run, the step
        training goes on from."""
        stage = self.stage_schedule.current
        c = stage.cfg
        x = c.crossbatch
        r = f"r={x.range_min}..{x.range}" if x.sample_range else f"r={x.range}"
        self.log(f"stage {stage.index + 1}/{len(self.stages)} '{stage.name}' "
                 f"from step {step}" + (f", resumed at step {resumed_at}" if resumed_at is not None else "")
                 + f": {describe_data(c.data)}, {r}, "
                 f"lr x{stage.lr_scale:g}, temperature lr x{stage.temperature_scale:g}, until step "
                 f"{stage.until_step}" + (f" or train accuracy {stage.until_accuracy:g}"
                                          if stage.until_accuracy else ""))
        rs.history.append({"step": step, "begin_stage": stage.name})

    def _enter_stage(self, rs):
        """The batcher of the stage being trained (restored to the checkpoint's position)."""
        stage = self.stage_schedule.current
        if rs.batcher is not None and rs.batcher_stage == stage.index:
            return
        rs.batcher = self._host_batcher(stage.cfg, "train", stage.num_docs)
        rs.batcher_stage = stage.index
        ds = rs.data_state
        if ds is not None and ds.get("stage") == stage.index and ds.get("batcher") is not None:
            rs.batcher.restore(ds["batcher"])

    def _step(self, rs, step):
        data_start = time.perf_counter()    # a stage's batcher (its dataset prepared) counts as data
        self._enter_stage(rs)
        stage = self.stage_schedule.current
        x = stage.cfg.crossbatch
        if x.sample_range:
            # stateless per step, so a resumed run draws the same r as an uninterrupted one
            rng = np.random.default_rng([self.cfg.train.seed, 7, step])
            rs.range_max, r = x.range, int(rng.integers(x.range_min, x.range + 1))
        else:
            rs.range_max = r = x.range
        batch = to_global(next(rs.batcher).as_dict(), self.mesh)
        rs.data_seconds = time.perf_counter() - data_start
        compiled = len(self._train_steps)
        fn = self.train_step_fn(rs.range_max, stage.cfg)
        rs.compiles = len(self._train_steps) > compiled
        self.state, metrics = fn(
            self.state, batch, jnp.int32(r), stage.lr_scale, stage.temperature_scale)
        if rs.pending is not None:       # checked one step late: no wait on the step just issued
            self._check(rs.pending)
        rs.pending, rs.done, rs.r = dict(metrics, range=r), step + 1, r

    def _log_progress(self, rs) -> dict:
        """Writes the progress line (and metrics) of the last step; returns its values."""
        stage = self.stage_schedule.current
        t, sd = self.cfg.train, stage.cfg.data
        m = {k: float(v) for k, v in jax.device_get(rs.pending).items()}
        self._check(m)
        now = time.perf_counter()
        tps = (rs.done - rs.last_step) * sd.batch_size * sd.seq_len / max(now - rs.last_time, 1e-9)
        flops_s = tps * metrics_lib.model_flops_per_token(self.cfg.model, sd.seq_len, rs.range_max,
                                                          trainable=tuple(self.cfg.train.trainable))
        mfu = flops_s / self.peak
        m.update(tokens_per_s=tps, mfu=mfu, stage=stage.index)
        early = t.stop_at_accuracy > 0 or any(s.until_accuracy for s in self.stages)
        eta = metrics_lib.remaining_seconds(self.stages[stage.index:], rs.done, t.steps, flops_s)
        self.log(metrics_lib.progress_line(rs.done, t.steps, m, tps, mfu, eta, may_stop_early=early))
        self.writer.write(rs.done, m)
        rs.history.append({**m, "step": rs.done})
        rs.last_time, rs.last_step = now, rs.done
        self.stage_schedule.note_accuracy(m["accuracy"])
        return m

    def _advance_stage(self, rs, progress_written: bool):
        """Asks the schedule whether the stage ends after this step; the next stage begins, or after
        the last one the run ends."""
        reason = self.stage_schedule.end_reason(rs.done, progress_written)
        if reason is None:
            return
        stage = self.stage_schedule.current
        following = self.stage_schedule.end(rs.done, reason)
        if len(self.stages) > 1:
            self.log(f"stage '{stage.name}' ends at step {rs.done}: {reason}")
        if following is not None:
            self._begin_stage(rs, following, rs.done)
        elif rs.done < self.cfg.train.steps:
            rs.stop = "stages"

    def _evaluate(self, rs) -> dict:
        """Held-out evaluation after a step: best checkpoint, early stop at train.stop_at_accuracy."""
        t, done = self.cfg.train, rs.done
        eval_start = time.perf_counter()
        rs.final_eval = res = self._eval_and_log(done)
        seconds = time.perf_counter() - eval_start
        rs.aside += seconds
        self.goodput.event("eval", step=done, seconds=seconds)
        rs.history.append({"step": done, "eval": {str(k): v for k, v in res.items()}})
        best_start = time.perf_counter()
        if self.checkpoints.offer_best(done, self.state, self._data_state(rs), res[max(res)]):
            rs.aside += time.perf_counter() - best_start
            self.goodput.event("checkpoint", step=done, seconds=time.perf_counter() - best_start)
            self.log(f"best {t.checkpoint_best} so far at step {done}: saved to {self.workdir}/best")
        best_r = max(res)
        if t.stop_at_accuracy > 0 and res[best_r]["accuracy"] >= t.stop_at_accuracy and done < t.steps:
            self.log(f"eval accuracy {res[best_r]['accuracy']:.3f} at r={best_r} >= {t.stop_at_accuracy}: "
                     f"stopping at step {done}")
            self._save(rs, done, force=True)
            rs.stop = "accuracy"
        return res

    def _stop_check(self, rs):
        """SIGTERM agreed by every host, or the step `run(until=...)` asked for."""
        agreed = self._stop_agreed(rs.done)
        if not (agreed or (rs.until is not None and rs.until <= rs.done < self.cfg.train.steps)):
            return
        if agreed and not self._term:
            self.log("another host received SIGTERM")
        self.log(("SIGTERM" if agreed else f"stop requested after step {rs.until}") +
                 f": saving a checkpoint at step {rs.done} and stopping; the next run resumes here")
        self._save(rs, rs.done, force=True)
        rs.final_eval = rs.final_eval or {}
        rs.stop = "preempted" if agreed else "until"

    def _finish(self, rs) -> dict:
        """Final evaluation (unless one ran), checkpoint, summary.json and curve.png; a stopped run
        returns early with its checkpoint (and `preempted` when SIGTERM stopped it)."""
        t = self.cfg.train
        step = int(jax.device_get(self.state["step"]))
        eval_start = time.perf_counter()
        final_eval = rs.final_eval if rs.final_eval is not None else self._eval_and_log(step)
        if rs.final_eval is None:
            self.goodput.event("eval", step=step, seconds=time.perf_counter() - eval_start)
        summary = {"steps": step, "seconds": time.perf_counter() - rs.run_start,
                   "eval": {str(k): v for k, v in final_eval.items()}, **self._stage_summary(rs, step)}
        if rs.stop == "preempted" or (rs.until is not None and step < t.steps):
            self._close(step)
            return {"steps": step, "preempted": rs.stop == "preempted", **summary}
        self._save(rs, step, force=True)
        self._close(step)
        if jax.process_index() == 0:
            with paths.open_file(paths.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_history(rs.history, paths.join(self.workdir, "curve.png"))
        return summary

    def _close(self, step):
        close_start = time.perf_counter()
        self.checkpoints.close()            # waits for the saves still being written
        self.goodput.event("checkpoint", step=step, seconds=time.perf_counter() - close_start)
        self.writer.close()
        self.goodput.event("job_end", step=step)

    def _stage_summary(self, rs, step) -> dict:
        """The stages run (name, steps, why each ended), the largest training range, and a warning
        when a model with memory layers never trained with r > 1: it is not expected to read large
        memories (its memory layers never had to tell its own context from other documents')."""
        stopped_by = rs.stop_reason or {"accuracy": "train.stop_at_accuracy"}.get(rs.stop)
        ends = self.stage_schedule.summary(step, step >= self.cfg.train.steps, stopped_by)
        current = self.stage_schedule.current
        trained = max(self.stages[i].cfg.crossbatch.range for i in range(current.index + 1))
        out = {"stages": ends, "max_train_range": trained}
        if len(self.stages) > 1:
            self.log("stages: " + ", ".join(f"{e['name']} {e['start']}-{e['end']} ({e['reason']})"
                                            for e in ends))
        if self.cfg.model.mem_layers and trained <= 1:
            out["warnings"] = [
                f"crossbatch range never exceeded r=1 in training (largest r={trained}): the memory "
                "layers never had to tell their own context from other documents', so this model is "
                "not expected to read large memories; train with larger r in a later stage (see "
                "configs/dictionary_lookup_memory.py)"]
            self.log("warning: " + out["warnings"][0])
        return out

    def _data_state(self, rs):
        if self.stage_schedule is None or self.stage_schedule.current is None:
            return None
        own = rs.batcher is not None and rs.batcher_stage == self.stage_schedule.current.index
        return {**self.stage_schedule.state(),
                "batcher": global_batcher_state(rs.batcher.state()) if own else None}

    def _check(self, m):
        loss = float(jax.device_get(m["loss"]))
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {int(jax.device_get(m['step'])) + 1}; "
                                "stopping (lower train.learning_rate or check the data)")

    def _eval_and_log(self, step):
        res = self.evaluate()
        for r, v in res.items():
            self.writer.write(step, v, prefix=f"eval_r{r}")
        self.log("eval step {}: ".format(step) + "  ".join(
            f"r={r}: loss {v['loss']:.4f} acc {v['accuracy']:.3f}" for r, v in res.items()))
        return res


def plot_history(history, path):
    """Training accuracy and held-out accuracy per crossbatch range against steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    train = [(h["step"], h["accuracy"]) for h in history if "accuracy" in h]
    evals = {}
    for h in history:
        for r, v in h.get("eval", {}).items():
            evals.setdefault(r, []).append((h["step"], v["accuracy"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for h in history:
        if "begin_stage" in h and h["step"] > 0:
            ax.axvline(h["step"], color="grey", ls=":", lw=1)
            ax.text(h["step"], 0.98, " " + h["begin_stage"], rotation=90, va="top", fontsize=7, color="grey")
    if train:
        ax.plot(*zip(*train), label="train (loss tokens)", alpha=0.6)
    for r, pts in sorted(evals.items()):
        ax.plot(*zip(*pts), marker="o", label=f"held-out, crossbatch r={r}")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with paths.open_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def train(cfg, workdir: str, **kwargs) -> dict:
    return Trainer(cfg, workdir, **kwargs).run()
