"""Metrics: model FLOPs, a matmul roofline measured in-process (for MFU), progress lines and
writers (JSONL + TensorBoard event files)."""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from fot_jax import config as config_lib
from fot_jax import paths
from fot_jax.model.layout import LAYER_PARAMS


def model_flops_per_token(m, seq_len: int, r: int = 0, training: bool = True, trainable=()) -> float:
    """Matmul FLOPs per token (PaLM convention: 2 per multiply-add, attention over the full
    context). Memory layers attend to (r + 1) * T keys. Training adds the backward pass: 2x the
    forward when every parameter trains; with `trainable` patterns (`train.trainable`), gradients
    with respect to activations (1x) from the top down to the lowest trainable layer, and with
    respect to weights (1x) of the trainable layers only (the frozen ones below run forward only)."""
    import re
    d = config_lib.head_dim(m)
    e, h, hkv, i = m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size
    dense = 2 * (e * d * (2 * h + 2 * hkv) + 3 * e * i)      # q, o, k, v, gate/up/down
    head = 2 * e * config_lib.padded_vocab(m)
    attention = [2 * 2 * h * d * seq_len * ((r + 1) if layer in list(m.mem_layers) else 1)
                 for layer in range(m.num_layers)]           # q.k and p.v
    fwd = m.num_layers * dense + head + sum(attention)
    if not training:
        return float(fwd)
    patterns = [re.compile(p) for p in trainable]
    if not patterns:
        return float(3 * fwd)

    def trains(names):
        return any(c.search(n) for c in patterns for n in names)
    layers = [trains([f"layers.{layer}.{p}" for p in LAYER_PARAMS]) for layer in range(m.num_layers)]
    head_trains = trains(["embed_tokens", "lm_head", "norm.weight"])
    lowest = 0 if trains(["embed_tokens"]) else next((k for k, t in enumerate(layers) if t), m.num_layers)
    bwd = head * (1 + head_trains)
    for layer in range(lowest, m.num_layers):
        bwd += dense * (1 + layers[layer]) + 2 * attention[layer]
    return float(fwd + bwd)


def measure_matmul_flops(size: int = 1024, repeats: int = 20, dtype=jnp.float32) -> float:
    """Achieved FLOP/s of a square matmul on the default device (the MFU denominator)."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: (x @ x) * (1.0 / size))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = a
        for _ in range(repeats):
            x = f(x)
        x.block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 * repeats / best


# Published dense bfloat16 peak FLOP/s of one chip, keyed by a fragment of jax's `device_kind`
# (first match wins: "TPU v5 lite" is a v5e, "TPU v5" a v5p).
CHIP_PEAK_BF16 = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12),
    ("v5", 459e12), ("v4", 275e12), ("v3", 123e12), ("v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
)


def chip_peak_flops(device_kind: str) -> float | None:
    """The published bf16 peak of a TPU/GPU chip named like jax's `device_kind`, or None."""
    kind = device_kind.lower()
    for fragment, flops in CHIP_PEAK_BF16:
        if fragment in kind:
            return flops
    return None


def peak_flops(device=None) -> tuple[float, str]:
    """The MFU denominator and what it is: the chip's published bf16 peak on TPU and GPU, a matmul
    measured now on CPU (or on a chip the table does not know)."""
    device = device or jax.devices()[0]
    published = chip_peak_flops(device.device_kind) if device.platform != "cpu" else None
    if published:
        return published, f"{device.device_kind}'s published bf16 peak ({published / 1e12:,.0f} TFLOP/s)"
    measured = measure_matmul_flops()
    return measured, f"a float32 matmul measured now ({measured / 1e9:,.1f} GFLOP/s)"


class MetricWriter:
    """JSONL (`metrics.jsonl`) and TensorBoard (`tb/`) in the workdir; process 0 only."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        paths.makedirs(workdir)
        self.jsonl = paths.open_file(paths.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = None if paths.is_url(workdir) else SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a runtime dependency
            self.tb = None

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items() if k != "step"}
        row = {"step": int(step), "split": prefix, **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def remaining_seconds(stages, step: int, total: int, flops_per_s: float) -> float:
    """Seconds left to step `total`: each stage's remaining steps x tokens a step x FLOPs a token
    (its own document length, rows and crossbatch range) at `flops_per_s`, the pace just measured.
    Later stages often cost more a step (longer documents, wider ranges), so a pace in steps
    would promise too little."""
    left, start = 0.0, 0
    for s in stages:
        end = min(s.until_step, total)
        steps = max(end - max(start, step), 0)
        d = s.cfg.data
        left += steps * d.batch_size * d.seq_len * model_flops_per_token(
            s.cfg.model, d.seq_len, s.cfg.crossbatch.range, trainable=tuple(s.cfg.train.trainable))
        start = max(start, end)
    return left / max(flops_per_s, 1e-9)


def progress_line(step: int, total: int, metrics: dict, tokens_per_s: float, mfu: float,
                  eta: float, may_stop_early: bool = False) -> str:
    """One progress line; `eta` in seconds (`remaining_seconds`), shown as "ETA <=" when the run
    may stop early (train.stop_at_accuracy, a stage's until_accuracy)."""
    bound = "<= " if may_stop_early else ""
    return (
        f"step {step:>6}/{total}  loss {metrics['loss']:.4f}  acc {metrics['accuracy']:.3f}  "
        f"lr {metrics['learning_rate']:.2e}  gnorm {metrics['grad_norm']:.3f}  "
        f"r {metrics.get('range', 0):.0f}  "
        f"{tokens_per_s:,.0f} tok/s  MFU {100 * mfu:.1f}%  ETA {bound}{_fmt(eta)}"
    )


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stdout, flush=True)
