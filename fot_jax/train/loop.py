"""The training loop: mesh, sharded state, jitted steps, curriculum and range schedule, periodic
evaluation (at several crossbatch ranges), metrics and the end-of-run report."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import socket
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import config as config_lib
from fot_jax import paths
from fot_jax.data.sources import make_batcher
from fot_jax.model import kernels
from fot_jax.model.attention import CrossbatchSpec
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train import metrics as metrics_lib
from fot_jax.train.optim import make_schedule
from fot_jax.train.state import count_params, create_train_state
from fot_jax.train.step import eval_step, train_step


class TrainingError(RuntimeError):
    pass


class NoCheckpoints:
    """The seam where the checkpoint manager plugs in: restore() -> (state, data_state) or None."""

    def restore(self, abstract_state, shardings):
        return None

    def save(self, step, state, data_state, force=False):
        pass

    def offer_best(self, step, state, data_state, metrics):
        return False

    def wait(self):
        pass

    def close(self):
        pass


def crossbatch_spec(cfg, range_max: int) -> CrossbatchSpec:
    x = cfg.crossbatch
    return CrossbatchSpec(range_max=int(range_max), k_packing=x.k_packing, stepping=x.stepping,
                          doc_mask=x.doc_mask, implementation=x.implementation)


BATCH_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")


def batch_shardings(mesh) -> dict:
    s = mesh_lib.batch_sharding(mesh, 2)
    return {name: s for name in BATCH_FIELDS}


def jit_train_step(cfg, graphdef, tx, mesh, state_shardings, range_max: int, schedule=None):
    """The jitted train step for crossbatch range `range_max`: explicit shardings, donated state."""
    rep = mesh_lib.replicated(mesh)
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, spec=crossbatch_spec(cfg, range_max),
                           microbatches=cfg.train.microbatches, schedule=schedule or make_schedule(cfg.train),
                           temperature_lr_scale=float(cfg.train.temperature_lr_scale))
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh), rep),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


def check_batch_divides(cfg, mesh) -> None:
    dp = mesh_lib.data_parallel_size(mesh)
    if cfg.data.batch_size % dp:
        raise config_lib.ConfigError(
            f"config field 'data.batch_size': {cfg.data.batch_size} rows do not divide over the "
            f"mesh's data-parallel size {dp} (mesh data x fsdp)")


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


class Trainer:
    def __init__(self, cfg, workdir: str, checkpoints=None, devices=None, quiet: bool = False):
        """checkpoints: None -> `fot_jax.checkpoint.Checkpoints` in workdir; False -> none; or any
        object with restore/save/close."""
        config_lib.validate(cfg)
        if jax.process_count() > 1:
            from fot_jax.parallel import distributed
            distributed.check_agreement(cfg)
        config_lib.check_platform(cfg)
        self.cfg, self.workdir = cfg, workdir
        self.quiet = quiet
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        check_batch_divides(cfg, self.mesh)
        if checkpoints is None:  # default: Orbax checkpoints in the workdir (resumes from there)
            from fot_jax.checkpoint import Checkpoints
            checkpoints = Checkpoints(workdir, cfg, every=cfg.train.checkpoint_every,
                                      keep=cfg.train.checkpoint_keep, best=cfg.train.checkpoint_best,
                                      resume_step=cfg.train.resume_step)
        self.checkpoints = checkpoints or NoCheckpoints()  # False: no checkpoints
        self.schedule = make_schedule(cfg.train)
        with mesh_lib.use_mesh(self.mesh):
            self.graphdef, self.tx, self.state, self.state_shardings = create_train_state(cfg, self.mesh)
        self.num_params = count_params(self.state["params"])
        self.attention_backend = kernels.resolve(cfg.model.attention_backend)
        self._train_steps = {}
        self._eval_steps = {}
        self.stages = config_lib.parse_curriculum(cfg.data.curriculum) if cfg.data.curriculum else []
        self._stage_cfgs = [config_lib.stage_config(cfg, s) for s in self.stages]
        self.writer = None

    # -- compiled steps ------------------------------------------------------------------------
    def _batch_shardings(self):
        return batch_shardings(self.mesh)

    def train_step_fn(self, range_max: int):
        if range_max not in self._train_steps:
            self._train_steps[range_max] = jit_train_step(self.cfg, self.graphdef, self.tx, self.mesh,
                                                          self.state_shardings, range_max, self.schedule)
        return self._train_steps[range_max]

    def eval_step_fn(self, r: int):
        if r not in self._eval_steps:
            rep = mesh_lib.replicated(self.mesh)
            fn = functools.partial(eval_step, graphdef=self.graphdef, spec=crossbatch_spec(self.cfg, r))
            self._eval_steps[r] = jax.jit(
                fn, in_shardings=(self.state_shardings["params"], self._batch_shardings(), rep),
                out_shardings=rep)
        return self._eval_steps[r]

    # -- data ----------------------------------------------------------------------------------
    def stage(self, step: int):
        """(index, config, documents the stage consumes or None for the full set) at `step`;
        index len(stages) is the configured task."""
        begin = 0
        for i, stage in enumerate(self.stages):
            if step < stage[0]:
                cfg = self._stage_cfgs[i]
                streams = cfg.data.batch_size // cfg.crossbatch.k_packing
                return i, cfg, min((stage[0] - begin) * streams, cfg.data.num_train_docs)
            begin = stage[0]
        return len(self.stages), self.cfg, None

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
        from fot_jax.data.text import TEXT_TASKS, tokenizer_path
        from fot_jax.data.tokenizer import load_tokenizer
        if self.cfg.data.task not in TEXT_TASKS or jax.process_index() != 0:
            return
        out = paths.join(self.workdir, "tokenizer")
        if paths.isdir(out):
            return
        src = load_tokenizer(tokenizer_path(self.cfg)).path
        # under the names load_tokenizer and export look for; an HF tokenizer's special tokens
        # live beside it in tokenizer_config.json
        if src.endswith(".json"):
            files = {"tokenizer.json": src}
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
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

    def _run(self, until):
        cfg, t, x = self.cfg, self.cfg.train, self.cfg.crossbatch
        self.writer = metrics_lib.MetricWriter(self.workdir)
        peak, peak_source = metrics_lib.peak_flops()
        start_step = int(jax.device_get(self.state["step"]))
        restored = self.checkpoints.restore(self.state, self.state_shardings)
        data_state = None
        if restored is not None:
            self.state, data_state = restored
            start_step = int(jax.device_get(self.state["step"]))
        elif t.init_from:
            from fot_jax.checkpoint import load_params
            params = load_params(t.init_from, cfg, self.state["params"], self.state_shardings["params"],
                                 log=self.log)
            self.state = dict(self.state, params=params)
            self.log(f"fine-tuning from the parameters in {t.init_from}")
        self._save_tokenizer()
        self.log(
            f"fot_jax: {self.num_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
            f"{jax.device_count()} devices, attention {self.attention_backend}, MFU against {peak_source}, "
            f"steps {start_step}->{t.steps}"
        )
        current_range = x.range
        switched = False
        if data_state is not None and "range" in data_state:
            current_range, switched = int(data_state["range"]), bool(data_state["switched"])
        # saved with the data position; the closure reads the loop's current values
        self._range_state = lambda: {"range": current_range, "switched": switched}
        preempted = False
        stage_index = None
        batcher = None
        history = []
        last_time, last_step, run_start = time.perf_counter(), start_step, time.perf_counter()
        pending = None
        acc_window = []
        final_eval = None
        with mesh_lib.use_mesh(self.mesh):
            for step in range(start_step, t.steps):
                index, stage_cfg, stage_docs = self.stage(step)
                if batcher is None or index != stage_index:
                    d = stage_cfg.data
                    if d.task == "dictionary_lookup":
                        name = (f"{d.num_definitions or 'all'} defs, {d.key_length}:{d.value_length}, "
                                f"docs of {d.doc_length}, T={d.seq_len}, {d.batch_size} rows")
                    else:
                        name = f"{d.task} {d.source or ''}, T={d.seq_len}, {d.batch_size} rows".replace(
                            "  ", " "
                        )
                    self.log(f"data: from step {step}: {name}")
                    batcher = self._host_batcher(stage_cfg, "train", stage_docs)
                    stage_index = index
                    history.append({"step": step, "stage": name})
                    if data_state is not None and data_state.get("stage") == stage_index:
                        batcher.restore(data_state["batcher"])
                if x.sample_range:
                    # stateless per step, so a resumed run draws the same r as an uninterrupted one
                    rng = np.random.default_rng([t.seed, 7, step])
                    range_max, r = current_range, int(rng.integers(x.range_min, current_range + 1))
                else:
                    range_max = r = current_range
                batch = to_global(next(batcher).as_dict(), self.mesh)
                self.state, step_metrics = self.train_step_fn(range_max)(self.state, batch, jnp.int32(r))
                step_metrics = dict(step_metrics, range=r)
                if pending is not None:
                    self._check(pending)
                pending = step_metrics
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    m = {k: float(v) for k, v in jax.device_get(pending).items()}
                    self._check(m)
                    now = time.perf_counter()
                    sd = stage_cfg.data
                    tokens = (done - last_step) * sd.batch_size * sd.seq_len
                    tps = tokens / max(now - last_time, 1e-9)
                    mfu = tps * metrics_lib.model_flops_per_token(cfg.model, sd.seq_len, range_max) / peak
                    m.update(tokens_per_s=tps, mfu=mfu, curriculum_stage=index)
                    self.log(metrics_lib.progress_line(done, t.steps, m, tps, mfu, now - run_start,
                                                                start_step))
                    self.writer.write(done, m)
                    history.append({**m, "step": done})
                    last_time, last_step = now, done
                    acc_window.append(m["accuracy"])
                    if (x.switch_range >= 0 and not switched and stage_index == len(self.stages)
                            and np.mean(acc_window[-3:]) >= x.switch_accuracy and len(acc_window) >= 3):
                        current_range, switched = x.switch_range, True
                        self.log(f"crossbatch range switched to r={current_range} at step {done} "
                                 f"(train accuracy {np.mean(acc_window[-3:]):.3f})")
                is_eval = t.eval_every and done % t.eval_every == 0
                if is_eval or done == t.steps:
                    final_eval = self._eval_and_log(done)
                    history.append({"step": done, "eval": {str(k): v for k, v in final_eval.items()}})
                    if self.checkpoints.offer_best(done, self.state, self._data_state(batcher, stage_index),
                                                   final_eval[max(final_eval)]):
                        self.log(
                            f"best {t.checkpoint_best} so far at step {done}: saved to {self.workdir}/best"
                        )
                    if t.stop_at_accuracy > 0:
                        best_r = max(final_eval)
                        if final_eval[best_r]["accuracy"] >= t.stop_at_accuracy and done < t.steps:
                            self.log(f"eval accuracy {final_eval[best_r]['accuracy']:.3f} at r={best_r} "
                                     f">= {t.stop_at_accuracy}: stopping at step {done}")
                            self.checkpoints.save(done, self.state, self._data_state(batcher, stage_index),
                                                  force=True)
                            break
                if t.checkpoint_every and done % t.checkpoint_every == 0:
                    self.checkpoints.save(done, self.state, self._data_state(batcher, stage_index))
                stop = self._stop_agreed(done)
                if stop or (until is not None and done >= until and done < t.steps):
                    preempted = stop
                    if stop and not self._term:
                        self.log("another host received SIGTERM")
                    self.log(("SIGTERM" if preempted else f"stop requested after step {until}") +
                             f": saving a checkpoint at step {done} and stopping; the next run resumes here")
                    self.checkpoints.save(
                        done, self.state, self._data_state(batcher, stage_index), force=True
                    )
                    final_eval = final_eval or {}
                    break
            if pending is not None:
                self._check({k: float(v) for k, v in jax.device_get(pending).items()})
        if final_eval is None:
            final_eval = self._eval_and_log(int(jax.device_get(self.state["step"])))
        if preempted or (until is not None and int(jax.device_get(self.state["step"])) < t.steps):
            self.checkpoints.close()
            self.writer.close()
            return {"steps": int(jax.device_get(self.state["step"])), "preempted": preempted,
                    "seconds": time.perf_counter() - run_start,
                    "eval": {str(k): v for k, v in final_eval.items()}}
        self.checkpoints.save(int(jax.device_get(self.state["step"])), self.state,
                              self._data_state(batcher, stage_index), force=True)
        self.checkpoints.close()
        self.writer.close()
        summary = {"steps": int(jax.device_get(self.state["step"])),
                   "seconds": time.perf_counter() - run_start,
                   "eval": {str(k): v for k, v in final_eval.items()}}
        if jax.process_index() == 0:
            with paths.open_file(paths.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            plot_history(history, paths.join(self.workdir, "curve.png"))
        return summary

    def _data_state(self, batcher, stage_index):
        if batcher is None:
            return None
        return {"stage": stage_index, "batcher": global_batcher_state(batcher.state()),
                **self._range_state()}

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
        if "stage" in h and h["step"] > 0:
            ax.axvline(h["step"], color="grey", ls=":", lw=1)
            ax.text(h["step"], 0.98, " " + h["stage"], rotation=90, va="top", fontsize=7, color="grey")
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
