"""Checkpoint cost: how long a train step is blocked by an asynchronous Orbax save, and save /
restore throughput against writing and reading the same bytes as one plain file (same run).

    python benchmarks/checkpoint.py                      # the default configs
    python benchmarks/checkpoint.py --configs configs/dictionary_lookup.py --steps 10
    python benchmarks/checkpoint.py --configs configs/dictionary_lookup_37m.py --steps 2 \
        --config.stages=[] --config.data.batch_size=16   # fits one CPU core

For each config: the mean train step time without saving; the mean time `Checkpoints.save` holds
the training thread (device-to-host copy and dispatch; the write runs in the background) as a share
of a step; the mean step time while saves run in the background; then save (to completion) and
restore MB/s next to `numpy.tofile` / `numpy.fromfile` of the same bytes (with fsync).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import config as config_lib
from fot_jax.checkpoint import Checkpoints
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train.loop import Trainer, to_global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = ["configs/dictionary_lookup.py", "configs/dictionary_lookup_37m.py"]


def _batch(cfg, rng):
    b, t, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    return {"inputs": rng.integers(0, v, (b, t)).astype(np.int32),
            "targets": rng.integers(0, v, (b, t)).astype(np.int32),
            "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32)}


def _state_bytes(state):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def bench(path, steps, workdir, overrides=()):
    cfg = config_lib.load_config(os.path.join(ROOT, path) if not os.path.isabs(path) else path, overrides)
    tr = Trainer(cfg, workdir, checkpoints=False, quiet=True)
    r = config_lib.max_range(cfg)
    rng = np.random.default_rng(0)
    batches = [to_global(_batch(cfg, rng), tr.mesh) for _ in range(2)]
    fn = tr.train_step_fn(r)
    with mesh_lib.use_mesh(tr.mesh):
        for i in range(2):  # compile and warm up
            tr.state, m = fn(tr.state, batches[i % 2], jnp.int32(r))
        jax.block_until_ready(tr.state)
        t0 = time.perf_counter()
        for i in range(steps):
            tr.state, m = fn(tr.state, batches[i % 2], jnp.int32(r))
        jax.block_until_ready(tr.state)
        step_s = (time.perf_counter() - t0) / steps
        ck = Checkpoints(os.path.join(workdir, "async"), cfg, every=1, keep=2)
        blocked, t0 = [], time.perf_counter()
        for i in range(steps):
            tr.state, m = fn(tr.state, batches[i % 2], jnp.int32(r))
            jax.block_until_ready(tr.state)
            s = time.perf_counter()
            ck.save(100 + i, tr.state, {"stage": 0})
            blocked.append(time.perf_counter() - s)
        jax.block_until_ready(tr.state)
        with_saves_s = (time.perf_counter() - t0 - sum(blocked)) / steps + np.mean(blocked)
        ck.close()
    nbytes = _state_bytes(tr.state)
    # save to completion and restore, against a plain file of the same bytes
    sync = Checkpoints(os.path.join(workdir, "sync"), cfg, every=1, keep=1, async_save=False)
    s = time.perf_counter()
    sync.save(1, tr.state, {"stage": 0})
    sync.wait()
    save_s = time.perf_counter() - s
    s = time.perf_counter()
    restored, _ = sync.restore(tr.state, tr.state_shardings)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - s
    sync.close()
    flat = np.concatenate([np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tr.state)])
    plain = os.path.join(workdir, "plain.bin")
    s = time.perf_counter()
    with open(plain, "wb") as f:
        flat.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - s
    s = time.perf_counter()
    back = np.fromfile(plain, np.uint8)
    read_s = time.perf_counter() - s
    assert back.size == flat.size
    mb = nbytes / 1e6
    return {"config": os.path.basename(path), "state_mb": mb, "step_ms": step_s * 1e3,
            "blocked_ms": float(np.mean(blocked)) * 1e3, "blocked_share": float(np.mean(blocked)) / step_s,
            "step_with_saves_ms": with_saves_s * 1e3,
            "save_mb_s": mb / save_s, "plain_write_mb_s": mb / write_s,
            "restore_mb_s": mb / restore_s, "plain_read_mb_s": mb / read_s}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULTS)
    p.add_argument("--steps", type=int, default=8)
    args, overrides = p.parse_known_args()  # --config.a.b=v overrides apply to every config
    rows = []
    for path in args.configs:
        tmp = tempfile.mkdtemp(prefix="fot_ckpt_bench_")
        try:
            rows.append(bench(path, args.steps, tmp, overrides))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r = rows[-1]
        print(f"{r['config']}: state {r['state_mb']:.1f} MB, step {r['step_ms']:.0f} ms, save blocks "
              f"{r['blocked_ms']:.1f} ms = {100 * r['blocked_share']:.1f}% of a step", flush=True)
    print("\n| config | state | step | blocked by async save | share of a step | step while saving | "
          "save | plain write | restore | plain read |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['config']} | {r['state_mb']:.1f} MB | {r['step_ms']:.0f} ms | {r['blocked_ms']:.1f} ms | "
            f"{100 * r['blocked_share']:.1f}% | {r['step_with_saves_ms']:.0f} ms | "
            f"{r['save_mb_s']:.0f} MB/s | "
            f"{r['plain_write_mb_s']:.0f} MB/s | {r['restore_mb_s']:.0f} MB/s | "
            f"{r['plain_read_mb_s']:.0f} MB/s |"
        )


if __name__ == "__main__":
    main()
