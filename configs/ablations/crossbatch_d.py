"""Ablation: the importance of negatives (the paper's crossbatch d = r + 1 in {1, 2, 4, 8}).

The dictionary lookup model of `configs/dictionary_lookup.py`, trained for the same number of steps
with crossbatch range r = 0, 1, 3, 7 (r = 0: the memory layer never sees another document during
training) and evaluated with the query window's memory layer seeing its own definitions among
1, 7 and 31 other contexts (held-out eval at r = 1, 7, 31). The paper's finding: more negatives
in training keep the model focused when memory holds many documents.

    fot-jax sweep --config configs/ablations/crossbatch_d.py --workdir runs/ablation_d

CPU scale: about 1,000 steps a point (an hour or more each on 2 cores).
"""
import os

from fot_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config(os.path.join(HERE, "..", "dictionary_lookup.py"))
    c.name = "ablation_crossbatch_d"
    c.train.steps = 1000
    c.train.stop_at_accuracy = 0.0       # same budget for every point
    c.train.eval_every = 250
    c.crossbatch.eval_ranges = [1, 7, 31]
    return c


def get_sweep():
    return [{"name": f"d={r + 1}", "crossbatch.range": r} for r in (0, 1, 3, 7)]
