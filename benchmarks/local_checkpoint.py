"""Local (emergency) checkpoint cost on a pod: how long a local save blocks a train step, against
the step and against a persistent save, measured in the same run on the local pod simulator.

    python benchmarks/local_checkpoint.py                    # 2 processes x 1 CPU device, two configs
    python benchmarks/local_checkpoint.py --configs configs/dictionary_lookup.py --steps 6

Every process runs the same steps (the global batch split over the processes), then the same
steps with a local save after each (`Checkpoints.save_local`: this host's shards, to its own
directory; the copy to host memory blocks, the write runs in the background), then with a
persistent save after each (`Checkpoints.save`: Orbax across hosts into the workdir). Each save is
issued with no other in flight (the previous one waited for outside the timing), as with a save
interval longer than a write; the step after a save competes with its background write. Process 0
prints one JSON line per config; the table gives the blocked time as a share of a step.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = ["configs/dictionary_lookup.py", "configs/dictionary_lookup_37m.py"]
SMALLER_37M = ["--config.stages=[]", "--config.data.batch_size=16"]     # fits two CPU cores


def worker(path, steps, workdir, overrides):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fot_jax import config as config_lib
    from fot_jax.parallel import distributed
    from fot_jax.parallel import mesh as mesh_lib
    from fot_jax.train.loop import Trainer, to_global

    distributed.initialize()
    cfg = config_lib.load_config(os.path.join(ROOT, path), list(overrides) + [
        f"--config.train.local_checkpoint_dir={workdir}/local", "--config.train.local_checkpoint_every=1"])
    tr = Trainer(cfg, workdir, quiet=True)
    r = config_lib.max_range(cfg)
    rng = np.random.default_rng(jax.process_index())
    b, t, v = cfg.data.batch_size // jax.process_count(), cfg.data.seq_len, cfg.model.vocab_size
    batches = [to_global({"inputs": rng.integers(0, v, (b, t)).astype(np.int32),
                          "targets": rng.integers(0, v, (b, t)).astype(np.int32),
                          "loss_mask": np.ones((b, t), np.float32),
                          "segment_ids": np.ones((b, t), np.int32)}, tr.mesh) for _ in range(2)]
    fn = tr.train_step_fn(r)

    def run(save=None, first=0):
        """Mean step time (the step after a save, whose background write it competes with) and
        mean time a save call blocks, each save issued with no other in flight."""
        blocked, step_times = [], []
        for i in range(steps):
            s = time.perf_counter()
            tr.state, _ = fn(tr.state, batches[i % 2], jnp.int32(r))
            jax.block_until_ready(tr.state)
            step_times.append(time.perf_counter() - s)
            if save is not None:
                tr.checkpoints.wait()
                s = time.perf_counter()
                save(first + i, tr.state, {"stage": 0})
                blocked.append(time.perf_counter() - s)
        tr.checkpoints.wait()
        return float(np.mean(step_times)), float(np.mean(blocked)) if blocked else 0.0

    with mesh_lib.use_mesh(tr.mesh):
        for i in range(2):                                   # compile and warm up
            tr.state, _ = fn(tr.state, batches[i], jnp.int32(r))
        jax.block_until_ready(tr.state)
        step_s, _ = run()
        local_step_s, local_blocked = run(tr.checkpoints.save_local, first=100)
        persistent_step_s, persistent_blocked = run(tr.checkpoints.save, first=200)
    tr.checkpoints.close()
    from fot_jax.local_checkpoint import host_bytes
    row = {"config": os.path.basename(path), "processes": jax.process_count(),
           "params_m": sum(x.size for x in jax.tree.leaves(tr.state["params"])) / 1e6,
           "host_mb": host_bytes(tr.state) / 1e6, "step_ms": step_s * 1e3,
           "local_blocked_ms": local_blocked * 1e3, "local_share": local_blocked / step_s,
           "step_with_local_ms": local_step_s * 1e3,
           "persistent_blocked_ms": persistent_blocked * 1e3, "persistent_share": persistent_blocked / step_s,
           "step_with_persistent_ms": persistent_step_s * 1e3}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULTS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    if args.worker:
        return worker(args.worker, args.steps, args.workdir, overrides)
    from fot_jax.parallel.local_pod import run_pod
    rows = []
    for path in args.configs:
        tmp = tempfile.mkdtemp(prefix="fot_local_ckpt_bench_")
        extra = list(overrides) or (SMALLER_37M if "37m" in path else [])
        sink = io.StringIO()
        try:
            codes = run_pod([sys.executable, os.path.abspath(__file__), "--worker", path, "--workdir", tmp,
                             "--steps", str(args.steps), *extra], args.processes, 1, sink=sink)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        found = [line.split("RESULT ", 1)[1] for line in sink.getvalue().splitlines() if "RESULT " in line]
        if codes != [0] * args.processes or not found:
            print(sink.getvalue()[-3000:], file=sys.stderr)
            raise SystemExit(f"{path}: the pod failed ({codes})")
        rows.append(json.loads(found[0]))
        r = rows[-1]
        print(f"{r['config']}: step {r['step_ms']:.0f} ms; a local save blocks "
              f"{r['local_blocked_ms']:.1f} ms "
              f"({100 * r['local_share']:.1f}%), a persistent one {r['persistent_blocked_ms']:.1f} ms "
              f"({100 * r['persistent_share']:.1f}%)", flush=True)
    print(f"\n{args.processes} processes x 1 CPU device each:\n")
    print("| config | parameters | shards per host | step | local save blocks | share | step while saving "
          "locally | persistent save blocks | share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['params_m']:.2f}M | {r['host_mb']:.1f} MB | {r['step_ms']:.0f} ms | "
              f"{r['local_blocked_ms']:.1f} ms | {100 * r['local_share']:.1f}% | "
              f"{r['step_with_local_ms']:.0f} ms | "
              f"{r['persistent_blocked_ms']:.1f} ms | {100 * r['persistent_share']:.1f}% |")


if __name__ == "__main__":
    main()
