"""Generates this fixture: a train-state checkpoint (parameters and optimizer moments) written in
the per-layer layout, where every layer's parameters are stored under its own `layers.{i}.` name.

Run it from a checkout of commit 2d764f0 (the last commit that stored layers one by one):

    git worktree add /tmp/per_layer 2d764f0
    PYTHONPATH=/tmp/per_layer python tests/data/per_layer_train_state/make.py /tmp/out

It trains configs/tiny.py (with the overrides in OVERRIDES) to step 4 and keeps that checkpoint,
then resumes the same run to step 8 and records the train losses of steps 5-8 (expected.json)
and the parameters at step 8 (params_step8.npz, per-layer names). A run in today's stacked
layout that resumes from checkpoints/4 must reproduce both.
"""
import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
OUT = sys.argv[1]
os.environ["FOT_JAX_DATA_DIR"] = os.path.join(OUT, "tfds")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fot_jax import checks  # noqa: E402
from fot_jax.train.loop import Trainer  # noqa: E402
from fot_jax.train.optim import param_path  # noqa: E402

ROOT = os.environ["PYTHONPATH"]
OVERRIDES = [
    "--config.crossbatch.eval_ranges=[1]", "--config.train.eval_batches=1",
    "--config.model.num_layers=4", "--config.model.mem_layers=[2]",
    "--config.train.trainable=['^layers\\\\.[0-2]\\\\.']",
    "--config.train.steps=8", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
    "--config.crossbatch.sample_range=true", "--config.crossbatch.range=3",
    "--config.train.eval_every=0",
]


def config():
    return checks.load_config(os.path.join(ROOT, "configs", "tiny.py"), OVERRIDES)


def main():
    workdir = os.path.join(OUT, "run")
    shutil.rmtree(workdir, ignore_errors=True)
    Trainer(config(), workdir, quiet=True).run(until=4)
    fixture = os.path.join(OUT, "per_layer_train_state")
    shutil.rmtree(fixture, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "checkpoints", "4"),
                    os.path.join(fixture, "checkpoints", "4"))
    resumed = Trainer(config(), workdir, quiet=True)
    resumed.run()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = {int(r["step"]): r["loss"] for r in records
              if r["split"] == "train" and r["step"] > 4}
    params = jax.device_get(resumed.state["params"])
    np.savez_compressed(
        os.path.join(fixture, "params_step8.npz"),
        **{param_path(p): np.asarray(x)
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]})
    with open(os.path.join(fixture, "expected.json"), "w") as f:
        json.dump({"overrides": OVERRIDES, "losses": losses}, f, indent=1)
    print(losses)


if __name__ == "__main__":
    main()
