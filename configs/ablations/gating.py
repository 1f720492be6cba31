"""Ablation: FoT's one softmax over memory and local keys (`joint`) against the Memorizing
Transformer's learned per-head gate mixing separate memory and local attention outputs (`gated`),
on the dictionary lookup model of `configs/dictionary_lookup.py` at the same budget.

    fot-jax sweep --config configs/ablations/gating.py --workdir runs/ablation_gating
"""
import os

from fot_jax.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = load_config(os.path.join(HERE, "..", "dictionary_lookup.py"))
    c.name = "ablation_gating"
    c.train.steps = 1000
    c.stages = c.stages[:-1]             # the default's document-length stages fill the 1,000 steps
    c.train.stop_at_accuracy = 0.0
    c.train.eval_every = 250
    c.crossbatch.eval_ranges = [1, 7]
    return c


def get_sweep():
    return [{"name": "fot_joint", "model.mem_attention": "joint"},
            {"name": "memorizing_gated", "model.mem_attention": "gated"}]
