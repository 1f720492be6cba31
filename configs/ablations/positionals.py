"""Ablation: positional encoding of memory keys, LongLLaMA's `as_first` (memory keys get the
position of the window's first token) against the paper's `none` (no positional encoding in memory
layers), on the dictionary lookup model of `configs/dictionary_lookup.py` at the same budget.

    fot-jax sweep --config configs/ablations/positionals.py --workdir runs/ablation_pos
"""
import os

from fot_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config(os.path.join(HERE, "..", "dictionary_lookup.py"))
    c.name = "ablation_positionals"
    c.train.steps = 1000
    c.stages = c.stages[:-1]             # the default's document-length stages fill the 1,000 steps
    c.train.stop_at_accuracy = 0.0
    c.train.eval_every = 250
    c.crossbatch.eval_ranges = [1, 7]
    return c


def get_sweep():
    return {"product": {"model.mem_positionals": ["as_first", "none"]}}
