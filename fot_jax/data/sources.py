"""Builds the batchers a config asks for (task, split, curriculum stage, host share)."""
from __future__ import annotations

from fot_jax.data import dictionary, text
from fot_jax.data.pipeline import DocBatcher
from fot_jax.parallel.distributed import primary_first


def document_source(cfg, split: str, num_docs: int | None = None):
    """A random-access source of documents; one host prepares a shared data_dir, the others wait."""
    d = cfg.data
    if d.task != "dictionary_lookup" and d.task not in text.TEXT_TASKS:
        raise ValueError(f"unknown data.task '{d.task}'")
    with primary_first(f"prepare/{d.task}/{split}/{num_docs}"):
        if d.task == "dictionary_lookup":
            return dictionary.data_source(
                split, data_dir=d.data_dir, doc_length=d.doc_length, query_length=d.query_length,
                num_definitions=d.num_definitions,
                num_train=num_docs or d.num_train_docs, num_eval=d.num_eval_docs, seed=d.seed,
                key_length=d.key_length, value_length=d.value_length)
        return text.data_source(cfg, split)


def describe(data_cfg) -> str:
    """One line naming what a (stage's) data section feeds the model."""
    d = data_cfg
    if d.task == "dictionary_lookup":
        return dictionary.describe(d)
    return f"{d.task} {d.source or ''}, T={d.seq_len}, {d.batch_size} rows".replace("  ", " ")


def make_batcher(cfg, split: str, *, num_docs: int | None = None, host_index: int = 0,
                 host_count: int = 1) -> DocBatcher:
    """num_docs: a smaller train set (curriculum stages only need what they consume)."""
    m = cfg.model
    return DocBatcher(document_source(cfg, split, num_docs),
                      batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                      k_packing=cfg.crossbatch.k_packing, bos=m.bos_token_id, eos=m.eos_token_id,
                      seed=cfg.data.seed, shuffle=(split == "train"),
                      host_index=host_index, host_count=host_count)
