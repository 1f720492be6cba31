"""Builds the batchers a config asks for (task, split, curriculum stage, host share)."""
from __future__ import annotations

from fot_jax.data.pipeline import DocBatcher
from fot_jax.data.tasks import TASKS
from fot_jax.parallel.distributed import primary_first


def document_source(cfg, split: str, num_docs: int | None = None):
    """A random-access source of documents; one host prepares a shared data_dir, the others wait."""
    d = cfg.data
    if d.task not in TASKS:
        raise ValueError(f"unknown data.task '{d.task}'")
    with primary_first(f"prepare/{d.task}/{split}/{num_docs}"):
        return TASKS[d.task].source(cfg, split, num_docs)


def describe(data_cfg) -> str:
    """One line naming what a (stage's) data section feeds the model."""
    return TASKS[data_cfg.task].describe(data_cfg)


def make_batcher(cfg, split: str, *, num_docs: int | None = None, host_index: int = 0,
                 host_count: int = 1) -> DocBatcher:
    """num_docs: a smaller train set (curriculum stages only need what they consume)."""
    m = cfg.model
    return DocBatcher(document_source(cfg, split, num_docs),
                      batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                      k_packing=cfg.crossbatch.k_packing, bos=m.bos_token_id, eos=m.eos_token_id,
                      seed=cfg.data.seed, shuffle=(split == "train"),
                      host_index=host_index, host_count=host_count)
