"""The data tasks, in one table: a task name maps to its config validator, its document source
and its one-line description. Adding a task is adding a row here."""
from __future__ import annotations

import dataclasses
from typing import Callable

from fot_jax.data import dictionary, retrieval, text


@dataclasses.dataclass(frozen=True)
class Task:
    validate: Callable        # validate(cfg): raises ConfigError naming the field
    source: Callable          # source(cfg, split, num_docs): a random-access source of documents
    describe: Callable        # describe(data_cfg) -> str


def _dictionary_source(cfg, split, num_docs):
    d = cfg.data
    return dictionary.data_source(
        split, data_dir=d.data_dir, doc_length=d.doc_length, query_length=d.query_length,
        num_definitions=d.num_definitions, num_train=num_docs or d.num_train_docs, num_eval=d.num_eval_docs,
        seed=d.seed, key_length=d.key_length, value_length=d.value_length, near_miss=d.near_miss)


def _retrieval_source(cfg, split, num_docs):
    return retrieval.data_source(cfg, split, num_docs)


def _text_source(cfg, split, num_docs):
    return text.data_source(cfg, split)


def _describe_text(d) -> str:
    return f"{d.task} {d.source or ''}, T={d.seq_len}, {d.batch_size} rows".replace("  ", " ")


TASKS = {"dictionary_lookup": Task(dictionary.validate, _dictionary_source, dictionary.describe),
         "retrieval": Task(retrieval.validate, _retrieval_source, retrieval.describe)}
TASKS.update({name: Task(text.validate, _text_source, _describe_text) for name in text.TEXT_TASKS})
