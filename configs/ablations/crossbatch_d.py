"""Ablation: the importance of negatives (the paper's d in {1, 2, 4, 8}).

The paper's memory of d contexts holds the document's own previous context and d - 1 contexts of
other documents (negatives). In the dictionary lookup task (k = 2 packing with stepping) the query
row's memory layer sees r other rows: its own definitions (the row before) and r - 1 rows of
other documents, so d = r here. The model of `configs/dictionary_lookup.py` is trained for the same
number of steps with r = 1, 2, 4, 8 (r = 1: never a negative) and evaluated with its own
definitions among 1, 7 and 31 contexts (held-out eval at r = 1, 7, 31). The paper's finding: more
negatives in training keep the model focused when memory holds many documents.

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
    c.stages = c.stages[:-1]             # the default's document-length stages fill the 1,000 steps
    c.train.stop_at_accuracy = 0.0       # same budget for every point
    c.train.eval_every = 250
    c.crossbatch.eval_ranges = [1, 7, 31]
    return c


def get_sweep():
    return [{"name": f"d={d}", "crossbatch.range": d} for d in (1, 2, 4, 8)]
