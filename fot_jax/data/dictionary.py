"""The dictionary lookup task of the FoT paper (appendix "Dictionary lookup task"), as a
tensorflow-datasets builder in `array_record` format (no TensorFlow needed).

Vocabulary of 64 tokens: pad 0, bos 1, eos 2, `<k>` 3, `<v>` 4, `<q>` 5 and 58 symbols.
A document (bos and eos are added by the batching pipeline) is
    definitions  `<k> k1 k2 k3 k4 <v> v1 v2 v3 v4` ...   (keys unique within the document)
    queries      `<q> k1 k2 k3 k4 <v> v1 v2 v3 v4` ...   (distinct keys, all defined earlier)
with the queries in the last `query_length` tokens (eos included) and definitions before them
(bos included); regions are padded with pad tokens. Loss and accuracy are on the four value
tokens of each query only (`loss_mask`). Deterministic: document i of a split depends only on
(seed, split, i).
"""
from __future__ import annotations

import numpy as np

from fot_jax.data.tfds_io import default_data_dir, import_tfds
from fot_jax.errors import ConfigError

PAD, BOS, EOS, KEY, VALUE, QUERY = 0, 1, 2, 3, 4, 5
FIRST_SYMBOL = 6
VOCAB_SIZE = 64
NUM_SYMBOLS = VOCAB_SIZE - FIRST_SYMBOL
RECORD = 10
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def regions(doc_length: int, query_length: int) -> tuple[int, int]:
    """Content tokens of the definition and query regions (bos and eos excluded)."""
    return doc_length - query_length - 1, query_length - 1


def describe(d) -> str:
    """A dictionary-lookup data section (or training stage) in one line."""
    hard = f", near-miss keys {d.near_miss:g}" if d.near_miss else ""
    return (f"{d.num_definitions or 'all'} defs, {d.key_length}:{d.value_length}, docs of {d.doc_length}, "
            f"T={d.seq_len}, {d.batch_size} rows{hard}")


def _near_miss_keys(keys: np.ndarray, share: float, rng) -> np.ndarray:
    """Replaces about `share` of the keys (after the first) by an earlier key of the document with
    one or two symbols changed, keeping keys unique: hard negatives, which a lookup must tell
    from the key it asks for (in a large memory most keys that score near a query are such)."""
    seen = {tuple(k) for k in keys}
    n, key_len = keys.shape
    for i in np.flatnonzero(rng.random(n) < share):
        if i == 0:
            continue
        new = keys[rng.integers(i)].copy()
        where = rng.choice(key_len, size=min(key_len, int(rng.integers(1, 3))), replace=False)
        new[where] = rng.integers(FIRST_SYMBOL, VOCAB_SIZE, where.size)
        if tuple(new) not in seen:
            seen.discard(tuple(keys[i]))
            seen.add(tuple(new))
            keys[i] = new
    return keys


def make_document(seed: int, split: str, index: int, doc_length: int = 512,
                  query_length: int = 256, num_definitions: int = 0, key_length: int = 4,
                  value_length: int = 4, near_miss: float = 0.0) -> dict[str, np.ndarray]:
    """Content tokens (length doc_length - 2) and loss mask (1 on queried value tokens).
    key_length / value_length other than 4 give the shorter records of a training stage;
    near_miss > 0 makes that share of the keys near misses of earlier ones (`_near_miss_keys`)."""
    record = key_length + value_length + 2
    def_len, query_len = regions(doc_length, query_length)
    if def_len < record or query_len < record:
        raise ValueError(f"doc_length={doc_length}, query_length={query_length} leave no room "
                         f"for one {record}-token record in each region")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    n_defs = def_len // record
    if num_definitions:
        n_defs = min(n_defs, num_definitions)
    n_defs = min(n_defs, NUM_SYMBOLS ** key_length)  # short keys: only so many are unique
    n_queries = min(query_len // record, n_defs)
    codes = rng.choice(NUM_SYMBOLS ** key_length, size=n_defs, replace=False)
    keys = np.stack([(codes // NUM_SYMBOLS ** j) % NUM_SYMBOLS for j in range(key_length)], 1) + FIRST_SYMBOL
    values = rng.integers(FIRST_SYMBOL, VOCAB_SIZE, size=(n_defs, value_length))
    asked = rng.choice(n_defs, size=n_queries, replace=False)
    if near_miss > 0:
        keys = _near_miss_keys(keys, near_miss, np.random.default_rng([seed, SPLIT_IDS[split], index, 5]))

    def records(marker, idx):
        rec = np.empty((len(idx), record), np.int32)
        rec[:, 0] = marker
        rec[:, 1:1 + key_length] = keys[idx]
        rec[:, 1 + key_length] = VALUE
        rec[:, 2 + key_length:] = values[idx]
        return rec.reshape(-1)

    tokens = np.full(def_len + query_len, PAD, np.int32)
    mask = np.zeros(def_len + query_len, np.uint8)
    defs = records(KEY, np.arange(n_defs))
    tokens[: defs.size] = defs
    queries = records(QUERY, asked)
    tokens[def_len: def_len + queries.size] = queries
    qmask = np.zeros((n_queries, record), np.uint8)
    qmask[:, 2 + key_length:] = 1
    mask[def_len: def_len + queries.size] = qmask.reshape(-1)
    return {"tokens": tokens, "loss_mask": mask}


def validate(cfg) -> None:
    d, m = cfg.data, cfg.model
    if not 0 <= d.near_miss <= 1:
        raise ConfigError(f"config field 'data.near_miss': must lie in [0, 1], got {d.near_miss}")
    if m.vocab_size < VOCAB_SIZE:
        raise ConfigError(f"config field 'model.vocab_size': dictionary lookup needs {VOCAB_SIZE} tokens, "
                          f"got {m.vocab_size}")
    if d.query_length < RECORD + 1 or d.doc_length - d.query_length < RECORD + 1:
        raise ConfigError(f"config field 'data.doc_length': {d.doc_length} tokens with query_length="
                          f"{d.query_length} leave no room for a {RECORD}-token record in each half")
    k = cfg.crossbatch.k_packing
    if d.doc_length % (k * d.seq_len):
        raise ConfigError(
            f"config field 'data.seq_len': documents of {d.doc_length} tokens do not fill whole steps of "
            f"k_packing*seq_len = {k}*{d.seq_len} tokens; choose seq_len and k_packing so that "
            f"k_packing*seq_len divides data.doc_length")


# --- tensorflow-datasets builder -------------------------------------------------------------

def builder_class():
    """Defined lazily: importing tensorflow_datasets costs seconds."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    tfds = import_tfds()

    class DictionaryLookupConfig(tfds.core.BuilderConfig):
        def __init__(self, *, doc_length=512, query_length=256, num_definitions=0,
                     num_train=20000, num_eval=512, seed=0, key_length=4, value_length=4, near_miss=0.0):
            name = (f"len{doc_length}_q{query_length}_defs{num_definitions}"
                    f"_train{num_train}_eval{num_eval}_seed{seed}")
            if (key_length, value_length) != (4, 4):
                name += f"_k{key_length}v{value_length}"
            if near_miss:
                name += f"_nm{near_miss:g}"
            self.key_length, self.value_length, self.near_miss = key_length, value_length, near_miss
            super().__init__(name=name, description="dictionary lookup documents")
            self.doc_length, self.query_length = doc_length, query_length
            self.num_definitions, self.seed = num_definitions, seed
            self.num_train, self.num_eval = num_train, num_eval

    class DictionaryLookup(tfds.core.GeneratorBasedBuilder):
        """Synthetic dictionary lookup documents (FoT appendix)."""
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [DictionaryLookupConfig()]

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                }),
                supervised_keys=None,
            )

        def _split_generators(self, dl_manager):
            c = self.builder_config
            return {"train": self._generate_examples("train", c.num_train),
                    "validation": self._generate_examples("validation", c.num_eval)}

        def _generate_examples(self, split, count):
            c = self.builder_config
            for i in range(count):
                yield i, make_document(c.seed, split, i, c.doc_length, c.query_length,
                                       c.num_definitions, c.key_length, c.value_length, c.near_miss)

    DictionaryLookup.__module__ = __name__
    _BUILDER = (DictionaryLookup, DictionaryLookupConfig)
    return _BUILDER


_BUILDER = None


def data_source(split: str, *, data_dir: str = "", doc_length=512, query_length=256,
                num_definitions=0, num_train=20000, num_eval=512, seed=0, key_length=4,
                value_length=4, near_miss=0.0):
    """Prepares (once) and opens a split as a random-access source of documents."""
    builder_cls, config_cls = builder_class()
    config = config_cls(doc_length=doc_length, query_length=query_length,
                        num_definitions=num_definitions, num_train=num_train,
                        num_eval=num_eval, seed=seed, key_length=key_length,
                        value_length=value_length, near_miss=near_miss)
    builder = builder_cls(config=config, data_dir=default_data_dir(data_dir),
                          file_format="array_record")
    builder.download_and_prepare()
    return builder.as_data_source(split=split)
