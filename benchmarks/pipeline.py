"""Is the input pipeline ever the bottleneck? Tokens/s of the data pipeline (tfds array_record
source -> doc-aware k-packed batches, one host's share) against the tokens/s the train step of the
same config consumes, both measured in this run (goal: pipeline >= 10x the step).

    python benchmarks/pipeline.py                                  # the default configs
    python benchmarks/pipeline.py --configs configs/stdlib_code.py --batches 200

Preparation of the dataset (once per data_dir) is excluded; so is the step's compilation. A
pipeline "from cold" opens a fresh source and batcher, as a resumed run does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from fot_jax import config as config_lib
from fot_jax.data.sources import document_source, make_batcher
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train.loop import Trainer, to_global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline_speed(cfg, batches: int) -> tuple[float, float]:
    """(tokens/s warm, seconds to the first batch from cold)."""
    document_source(cfg, "train")                      # prepared once, outside the timing
    t0 = time.perf_counter()
    batcher = make_batcher(cfg, "train")
    next(batcher)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(batcher)
    dt = time.perf_counter() - t0
    return batches * cfg.data.batch_size * cfg.data.seq_len / dt, first


def step_speed(cfg, steps: int) -> float:
    trainer = Trainer(
        cfg, "/tmp/fot_bench_pipeline", checkpoints=False, devices=jax.devices()[:1], quiet=True
    )
    batcher = make_batcher(cfg, "train")
    batches = [next(batcher).as_dict() for _ in range(steps + 1)]
    r = cfg.crossbatch.range
    with mesh_lib.use_mesh(trainer.mesh):
        fn = trainer.train_step_fn(r)
        state = trainer.state
        state, m = fn(state, to_global(batches[0], trainer.mesh), jnp.int32(r))   # compile
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[1:]:
            state, m = fn(state, to_global(b, trainer.mesh), jnp.int32(r))
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
    return steps * cfg.data.batch_size * cfg.data.seq_len / dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=[os.path.join(ROOT, "configs", "dictionary_lookup.py"),
                                                    os.path.join(ROOT, "configs", "stdlib_code.py")])
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    args, overrides = p.parse_known_args(argv)
    print("| config | pipeline tokens/s | first batch from cold | train step tokens/s | pipeline / step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path in args.configs:
        cfg = config_lib.load_config(path, overrides)
        cfg.stages = []   # the configured task itself (earlier stages train on smaller documents)
        pipe, first = pipeline_speed(cfg, args.batches)
        step = step_speed(cfg, args.steps)
        print(
            f"| {os.path.basename(path)} | {pipe:,.0f} | {first:.2f} s | {step:,.0f} | "
            f"**{pipe / step:,.0f}x** |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
