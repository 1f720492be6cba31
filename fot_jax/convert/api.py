"""`fot-jax import` / `fot-jax export`: HF or GGUF models into fot_jax checkpoints, and fot_jax
checkpoints out as HF LongLLaMA-format directories. Nothing half-written is left behind: results
are assembled in a temporary directory beside the target and renamed into place at the end."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.checkpoint import load_model, save_params
from fot_jax.convert import hf
from fot_jax.convert.gguf import read_gguf
from fot_jax.convert.hf import ConversionError
from fot_jax.model import layout
from fot_jax.model.llama import abstract_model

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# the modeling code an export carries (config.json's auto_map names them): fot_jax/torch/<file>
MODELING_FILES = ("configuration_longllama.py", "modeling_longllama.py")


def _prepare_target(path: str, overwrite: bool, what: str):
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise ConversionError(f"{what} target {path} exists and is not empty; pass --overwrite to "
                              "replace it (it stays untouched until the new one is complete)")
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    return path, tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)


def _commit(tmp: str, path: str):
    """Atomically swaps `tmp` into `path` (an existing `path` is removed only after the swap)."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def model_config_from_hf(hf_config: dict, overrides=()):
    """A full fot_jax config whose `model` matches an HF config.json; other sections default."""
    cfg = config_lib.base_config()
    for k, v in hf.model_overrides_from_hf(hf_config).items():
        cfg.model[k] = v
    cfg.memory.capacity = max(cfg.memory.capacity, cfg.model.max_position_embeddings)
    cfg.model.trained_context = cfg.model.max_position_embeddings    # the context it was trained with
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_position_embeddings)
    recorded = hf_config.get("fot_jax_memory") or {}
    if recorded:                                   # exported by fot_jax: memory as it ran there
        cfg.memory.search = recorded.get("search", cfg.memory.search)
        cfg.memory.top_k = int(recorded.get("top_k", cfg.memory.top_k))
        cfg.memory.logn_base = int(recorded.get("logn_base", 0))
    elif hf_config.get("model_type") == "longllama":
        # LongLLaMA checkpoints were evaluated with dense attention over all memory: reproduce that;
        # top-k is an explicit choice (--config.memory.search=exact)
        cfg.memory.search = "dense"
    cfg.name = "imported"
    cfg = checks.from_dict(json.loads(cfg.to_json()), overrides)
    return cfg


def read_source(source: str):
    """(hf_config, tensors, tokenizer_files) of an HF directory or a .gguf file."""
    if os.path.isdir(source):
        hf_config = hf.read_hf_config(source)
        tensors = hf.LazyTensors(source)
        files = [os.path.join(source, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(source, f))]
        return hf_config, tensors, files, None
    if source.endswith(".gguf") and os.path.isfile(source):
        hf_config, tensors, meta = read_gguf(source)
        return hf_config, tensors, [], meta
    raise ConversionError(f"{source}: neither an HF model directory nor a .gguf file")


def import_model(source: str, out: str, overrides=(), dtype: str = "float32", overwrite: bool = False,
                 log=print):
    """Writes a fot_jax checkpoint (step 0: parameters + config) into `out` that `fot-jax eval /
    generate` read and `fot-jax train --config.train.init_from=<out>` fine-tunes from. Returns cfg."""
    import jax

    hf_config, tensors, tok_files, gguf_meta = read_source(source)
    cfg = model_config_from_hf(hf_config, overrides)
    cfg.model.param_dtype = dtype
    checks.validate(cfg)
    np_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}[dtype]
    params = hf.from_hf_state_dict(tensors, cfg.model, dtype=np.float32)
    params = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype), params)
    params = _as_state(cfg, params)
    target, tmp = _prepare_target(out, overwrite, "import")
    try:
        save_params(tmp, cfg, params)
        if tok_files:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for f in tok_files:
                shutil.copy(f, os.path.join(tmp, "tokenizer", os.path.basename(f)))
        if gguf_meta is not None:
            _gguf_tokenizer(source, os.path.join(tmp, "tokenizer"), log)
        with open(os.path.join(tmp, "import.json"), "w") as f:
            json.dump({"source": os.path.abspath(source), "hf_config": hf_config}, f, indent=1)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log(f"imported {source}: {n / 1e6:.1f}M parameters, {cfg.model.num_layers} layers, "
        f"{cfg.model.num_heads}/{cfg.model.num_kv_heads} heads -> {target}")
    if cfg.model.mem_layers:
        how = (
            "dense attention over all memory, as the original LongLLaMA code"
            if cfg.memory.search == "dense"
            else f"memory search {cfg.memory.search}, top-k {cfg.memory.top_k}"
        )
        log(f"memory layers {list(cfg.model.mem_layers)}: {how} (change with --config.memory.search / top_k)")
    return cfg


def _gguf_tokenizer(path: str, out_dir: str, log):
    """The tokenizer embedded in a GGUF file, saved as HF files (tokenizer.json) by transformers'
    GGUF reader when transformers is installed."""
    try:
        import transformers
    except ImportError:
        log(
            "transformers is not installed: the GGUF's tokenizer was not extracted "
            "(pip install 'fot_jax[torch]')"
        )
        return
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path))
    tok.save_pretrained(out_dir)


def _as_state(cfg, pure: dict):
    """A pure dict of parameters -> the nnx.State layout that training checkpoints have."""
    from flax import nnx

    _, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, layout.stacked(pure, layout.run_counts(state)))
    return state


def _save_safetensors(tensors: dict, path: str, dtype: str):
    import jax.numpy as jnp
    from safetensors.flax import save_file
    jdt = jnp.dtype(dtype)
    save_file({k: jnp.asarray(v, jdt) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def parse_size(text) -> int:
    if isinstance(text, int):
        return text
    t = str(text).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _write_weights(sd: dict, directory: str, dtype: str, limit: int) -> list[dict]:
    """The state dict as safetensors files of at most `limit` bytes (with an index when several)."""
    itemsize = 4 if dtype == "float32" else 2
    shards, current, size = [], {}, 0
    for name, x in sd.items():
        nbytes = int(np.prod(x.shape)) * itemsize
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        _save_safetensors(shards[0], os.path.join(directory, "model.safetensors"), dtype)
        return shards
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, os.path.join(directory, fname), dtype)
        for name, x in shard.items():
            weight_map[name] = fname
            total += int(np.prod(x.shape)) * itemsize
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return shards


def _copy_tokenizer(source: str, directory: str):
    """A tokenizer file, or a directory's tokenizer files, beside the exported weights, so that
    `AutoTokenizer.from_pretrained(directory)` loads it on transformers 4.4x and 5.x: the chat
    template both as `chat_template.jinja` and inside `tokenizer_config.json`, and a tokenizer
    class every version knows."""
    if os.path.isfile(source):
        shutil.copy(source, os.path.join(directory, os.path.basename(source)))
    elif os.path.isdir(source):
        for f in os.listdir(source):
            if f in TOKENIZER_FILES and f != "generation_config.json":
                shutil.copy(os.path.join(source, f), os.path.join(directory, f))
    config_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        tok_cfg = json.load(f)
    template = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(template) and "chat_template" not in tok_cfg:
        with open(template) as f:
            tok_cfg["chat_template"] = f.read()
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend":   # transformers 5's name for a tokenizer.json
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):        # where it was loaded from, not what it is
        tok_cfg.pop(key, None)
    with open(config_path, "w") as f:
        json.dump(tok_cfg, f, indent=1)


def _copy_modeling_code(directory: str):
    """configuration_longllama.py and modeling_longllama.py (what auto_map names) beside the weights."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torch")
    for name in MODELING_FILES:
        shutil.copy(os.path.join(here, name), os.path.join(directory, name))


def _eval_tables(workdir: str) -> list[str]:
    """The markdown tables `fot-jax eval` wrote into <workdir>/eval (and its subdirectories)."""
    root = os.path.join(workdir, "eval")
    out = []
    for dirpath, _, files in sorted(os.walk(root)) if os.path.isdir(root) else []:
        for f in sorted(files):
            if f.endswith(".md"):
                with open(os.path.join(dirpath, f)) as fh:
                    out.append(fh.read().strip())
    return out


def model_card(cfg, workdir: str, config: dict, name: str) -> str:
    """README.md of an export: what the model is, its memory settings, how to load it, and the
    evaluations recorded in the workdir."""
    m = cfg.model
    top_k = config.get("mem_top_k")
    reading = ("dense (every memory entry)" if top_k is None
               else f"each query's top {top_k} entries (exact kNN)")
    keys = ("keys un-rotated, as if at position 0" if m.mem_positionals == "as_first"
            else "no rotary embedding in memory layers")
    lines = [
        "---", "library_name: transformers", "tags: [focused-transformer, longllama, fot_jax]", "---", "",
        f"# {name}", "",
        f"A LLaMA-architecture model with Focused Transformer (FoT) memory layers, exported by "
        f"fot_jax from `{os.path.abspath(workdir)}` (run `{cfg.name}`"
        + (f", fine-tuned from `{cfg.train.init_from}`" if cfg.train.init_from else "") + ").", "",
        f"- {m.num_layers} layers, hidden size {m.hidden_size}, {m.num_heads} query / {m.num_kv_heads} "
        f"key-value heads of {config['head_dim']}, vocabulary {m.vocab_size}, RoPE theta {m.rope_theta:g}.",
        f"- Memory layers {list(m.mem_layers)} ({keys}); window {m.max_position_embeddings} tokens; "
        f"the last {m.last_context_length} tokens of a prompt stay local.",
        f"- Memory: {reading}; capacity {config.get('mem_capacity')} tokens a sequence (FIFO beyond); "
        f"store {m.mem_dtype}; log-n scaling base {config.get('mem_logn_base') or 'off'}.", "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "ids = tok(long_text, return_tensors='pt').input_ids       # any length: windows go to memory",
        "out = model.generate(ids, max_new_tokens=32, mem_top_k=32)   # or mem_top_k=None: dense memory",
        "print(tok.decode(out[0, ids.shape[1]:]))",
        "```", "",
        "Memory settings are config fields and `generate` keyword arguments: `mem_top_k` (None: every "
        "entry), `mem_capacity` (entries a sequence keeps; the oldest go first), `mem_logn_base`, "
        "`last_context_length`. The modeling code is in this directory (`modeling_longllama.py`, "
        "`configuration_longllama.py`): loading needs torch, transformers and safetensors, no network.",
        "",
        "Without `trust_remote_code`, load it as a plain LLaMA (no memory: only the last window of a "
        "prompt is read): `transformers.LlamaForCausalLM.from_pretrained(path)`.",
    ]
    if m.num_kv_heads < m.num_heads and m.mem_layers:
        lines += ["", "Grouped-query attention: the original LongLLaMA code (multi-head only) cannot run "
                      "this model's memory; the code here and `fot_jax.torch` can."]
    tables = _eval_tables(workdir)
    if tables:
        where = os.path.join(workdir, "eval")
        lines += ["", "## Evaluations", "", f"Recorded by `fot-jax eval` in `{where}`:", ""]
        for t in tables:
            lines += [t, ""]
    return "\n".join(lines).rstrip() + "\n"


def export_model(workdir: str, out: str, step=None, dtype: str = "float32", overwrite: bool = False,
                 fot_extensions: bool = False, max_shard_size="5GB", tokenizer: str | None = None,
                 log=print) -> str:
    """An HF directory in the LongLLaMA format from a fot_jax checkpoint (parameters only)."""
    from flax import nnx

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"export dtype {dtype!r} is not one of float32, bfloat16, float16")
    cfg, model = load_model(workdir, step=step)
    m = cfg.model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    sd = hf.to_hf_state_dict(params, m, fot_extensions=fot_extensions)
    target, tmp = _prepare_target(out, overwrite, "export")
    try:
        shards = _write_weights(sd, tmp, dtype, parse_size(max_shard_size))
        hf_config = hf.longllama_config(m, dtype, fot_extensions, memory=cfg.memory)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": m.bos_token_id, "eos_token_id": m.eos_token_id,
                       "pad_token_id": m.pad_token_id}, f, indent=1)
        _copy_tokenizer(tokenizer or os.path.join(workdir, "tokenizer"), tmp)
        _copy_modeling_code(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(cfg, workdir, hf_config, os.path.basename(os.path.abspath(out))))
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {workdir} (step {step if step is not None else 'latest'}) -> {target} "
        f"({len(shards)} safetensors file(s), {dtype})")
    if m.mem_layers and m.num_kv_heads < m.num_heads:
        log(f"note: grouped-query attention ({m.num_heads} query / {m.num_kv_heads} key-value heads): the "
            "original LongLLaMA code is multi-head only and cannot run this model's memory; the export's "
            "own code can (AutoModelForCausalLM with trust_remote_code=True, or fot_jax.torch), and stock "
            "LlamaForCausalLM loads it without memory")
    return target


def resolve_init_from(init_from: str, workdir: str, log=print) -> str:
    """The checkpoint directory `train.init_from` names: a training workdir or an import as it is;
    an HF directory, a .gguf file or `package:file` (`config.package_file`) is imported once into
    `<workdir>/init` (by process 0; the others wait) and that directory is returned."""
    from fot_jax import paths
    from fot_jax.parallel.distributed import primary_first
    source = config_lib.package_file(init_from) or init_from
    if paths.is_url(source) or os.path.isdir(os.path.join(source, "checkpoints")):
        return init_from
    if not os.path.exists(source):
        from fot_jax.checkpoint import CheckpointError
        raise CheckpointError(f"train.init_from: {init_from!r} does not exist; give a training workdir, an "
                              "`fot-jax import` output, an HF model directory, a .gguf file or package:file")
    target = paths.join(workdir, "init")
    with primary_first(f"init_from/{target}"):
        if not os.path.isdir(os.path.join(target, "checkpoints")):
            log(f"train.init_from: importing {source} into {target}")
            import_model(source, target, log=log)
    return target
