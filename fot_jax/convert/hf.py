"""fot_jax parameters <-> HF LLaMA / LongLLaMA tensors: one declarative name map, both directions.

Each entry: (fot_jax path, HF name, to_hf, from_hf). `{i}` is the layer index. `to_hf(x, m)` takes
the fot_jax array and the model config and returns the HF array; `from_hf(y, m)` is its exact
inverse. RoPE is in the HF `rotate_half` layout in both, so q/k need no permutation here (GGUF files
do: see `gguf.py`). Vocabulary rows are padded to `model.vocab_multiple` in fot_jax and unpadded in
HF files.
"""
from __future__ import annotations

import json
import os

import numpy as np

from fot_jax import config as config_lib
from fot_jax.errors import FotError
from fot_jax.model import layout, llama
from fot_jax.model.layout import flatten


class ConversionError(FotError, ValueError):
    """A file, tensor or config that cannot be converted (the message names it)."""


def _hd(m):
    return config_lib.head_dim(m)


def _t(x, m):
    return x.T


def _qkv_to_hf(x, m):          # [E, H, D] -> [H*D, E]
    return x.reshape(x.shape[0], -1).T


def _q_from_hf(y, m):          # [H*D, E] -> [E, H, D]
    return y.T.reshape(y.shape[1], m.num_heads, _hd(m))


def _kv_from_hf(y, m):
    return y.T.reshape(y.shape[1], m.num_kv_heads, _hd(m))


def _o_to_hf(x, m):            # [H, D, E] -> [E, H*D]
    return x.reshape(-1, x.shape[-1]).T


def _o_from_hf(y, m):          # [E, H*D] -> [H, D, E]
    return y.T.reshape(m.num_heads, _hd(m), y.shape[0])


def _embed_to_hf(x, m):        # [V_padded, E] -> [V, E]
    return x[: m.vocab_size]


def _embed_from_hf(y, m):      # [V, E] -> [V_padded, E] (zero rows: never produced, masked in logits)
    out = np.zeros((config_lib.padded_vocab(m), y.shape[1]), y.dtype)
    out[: y.shape[0]] = y
    return out


def _head_to_hf(x, m):         # [E, V_padded] -> [V, E]
    return x[:, : m.vocab_size].T


def _head_from_hf(y, m):       # [V, E] -> [E, V_padded]
    out = np.zeros((y.shape[1], config_lib.padded_vocab(m)), y.dtype)
    out[:, : y.shape[0]] = y.T
    return out


def _same(x, m):
    return x


NAME_MAP = (
    ("embed_tokens", "model.embed_tokens.weight", _embed_to_hf, _embed_from_hf),
    ("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", _same, _same),
    (
        "layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        _same,
        _same,
    ),
    ("layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.q_proj.weight", _qkv_to_hf, _q_from_hf),
    ("layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.k_proj.weight", _qkv_to_hf, _kv_from_hf),
    ("layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.v_proj.weight", _qkv_to_hf, _kv_from_hf),
    ("layers.{i}.self_attn.o_proj", "model.layers.{i}.self_attn.o_proj.weight", _o_to_hf, _o_from_hf),
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", _t, _t),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj.weight", _t, _t),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj.weight", _t, _t),
    ("norm.weight", "model.norm.weight", _same, _same),
    ("lm_head", "lm_head.weight", _head_to_hf, _head_from_hf),
    # fot_jax extensions (query/key normalisation, Memorizing-Transformer gate): exported under
    # these names only with `fot_extensions`; stock LLaMA code has no counterpart.
    ("layers.{i}.self_attn.qk_temperature", "model.layers.{i}.self_attn.qk_temperature", _same, _same),
    ("layers.{i}.self_attn.mem_gate", "model.layers.{i}.self_attn.mem_gate", _same, _same),
)
EXTENSION_KEYS = ("qk_temperature", "mem_gate")


def unflatten(flat: dict) -> dict:
    """{'layers.0.mlp.up_proj': x} -> nested dict with integer keys for layer indices (nnx pure dict)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _entries(m):
    for src, dst, to_hf, from_hf in NAME_MAP:
        layers = range(m.num_layers) if "{i}" in src else [None]
        for i in layers:
            yield src.format(i=i), dst.format(i=i), to_hf, from_hf


def uses_extensions(m) -> bool:
    return m.qk_norm != "none" or m.mem_attention == "gated"


def to_hf_state_dict(params: dict, m, fot_extensions: bool = False) -> dict[str, np.ndarray]:
    """Pure-dict fot_jax params (either layout) -> HF LLaMA state dict (numpy, unpadded vocab). A
    model that uses query/key normalisation or the memory gate has no stock-LLaMA equivalent: it is
    refused unless `fot_extensions` (then the extra tensors are written under their fot_jax names)."""
    if uses_extensions(m) and not fot_extensions:
        raise ConversionError(
            f"this model uses fot_jax extensions (model.qk_norm='{m.qk_norm}', model.mem_attention="
            f"'{m.mem_attention}') that stock LLaMA / LongLLaMA code would silently ignore, giving "
            "wrong outputs; export with fot_extensions=True (--fot-extensions) for the fot_jax "
            "PyTorch runtime, or train with qk_norm='none' and mem_attention='joint'")
    flat = {k: np.asarray(v) for k, v in flatten(layout.per_layer(params)).items()}
    out = {}
    for key, dst, to_hf, _ in _entries(m):
        if key not in flat:
            if key == "lm_head" and m.tie_embeddings or key.split(".")[-1] in EXTENSION_KEYS:
                continue
            raise ConversionError(f"parameter '{key}' missing from the fot_jax state")
        out[dst] = np.ascontiguousarray(to_hf(flat.pop(key), m))
    if flat:
        raise ConversionError(f"parameters without an HF name: {sorted(flat)}")
    return out


def from_hf_state_dict(tensors, m, dtype=np.float32) -> dict:
    """HF LLaMA state dict (name -> array; a dict or a lazy mapping) -> pure-dict fot_jax params in
    the per-layer layout (`fot_jax.model.layout`), shapes checked against the config (a mismatch
    names the tensor). Extra HF buffers such as `rotary_emb.inv_freq` are ignored; any other
    unknown tensor is an error."""
    from flax import nnx

    expected = flatten(layout.per_layer(nnx.to_pure_dict(
        nnx.eval_shape(lambda: nnx.state(llama.create(m, 0), nnx.Param)))))
    names = set(tensors.keys())
    flat = {}
    for key, src, _, from_hf in _entries(m):
        if key not in expected:
            continue
        if src not in names:
            if key.split(".")[-1] == "qk_temperature":
                flat[key] = np.full(expected[key].shape, m.qk_temperature_init, dtype)
                continue
            if key.split(".")[-1] == "mem_gate":
                flat[key] = np.zeros(expected[key].shape, dtype)
                continue
            raise ConversionError(f"tensor '{src}' is missing from the checkpoint (needed for fot_jax "
                                  f"parameter '{key}')")
        y = np.asarray(tensors[src], dtype=np.float32)
        try:
            x = from_hf(y, m)
        except ValueError:
            x = None
        if x is None or tuple(x.shape) != tuple(expected[key].shape):
            raise ConversionError(f"tensor '{src}' has shape {tuple(y.shape)}, which does not fit the "
                                  f"model config (fot_jax '{key}' wants {tuple(expected[key].shape)})")
        flat[key] = x.astype(dtype)
        names.discard(src)
    unknown = sorted(n for n in names if not n.endswith("rotary_emb.inv_freq")
                     and not (n == "lm_head.weight" and m.tie_embeddings))
    if unknown:
        raise ConversionError(f"tensors with no fot_jax parameter: {unknown[:8]}"
                              f"{' ...' if len(unknown) > 8 else ''}")
    return unflatten(flat)


# --- configs ------------------------------------------------------------------------------------
KNOWN_ARCHITECTURES = ("LlamaForCausalLM", "LongLlamaForCausalLM")
KNOWN_MODEL_TYPES = ("llama", "longllama")


def hf_llama_config(m) -> dict:
    """The `LlamaConfig` fields of a fot_jax model config."""
    return dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=config_lib.head_dim(m),
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=m.bos_token_id,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.pad_token_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


# the modeling code every export carries (fot_jax/torch/{configuration,modeling}_longllama.py)
LONGLLAMA_AUTO_MAP = {
    "AutoConfig": "configuration_longllama.LongLlamaConfig",
    "AutoModel": "modeling_longllama.LongLlamaModel",
    "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM",
}


def longllama_config(m, torch_dtype: str = "float32", fot_extensions: bool = False, memory=None) -> dict:
    """config.json of an exported model: the LongLLaMA format (stock LLaMA loaders read the LLaMA
    fields and ignore the rest), read by the export's own `configuration_longllama.py`. `memory` (a
    config's `memory` section) becomes the modeling code's settings (`mem_top_k`: None for dense
    search, `mem_capacity`, `mem_logn_base`) and is recorded as `fot_jax_memory` (search mode,
    top-k and log-n base), so that an import runs memory as the exporter did."""
    c = hf_llama_config(m)
    c.update(
        # "llama": without trust_remote_code, transformers reads the directory as a plain LLaMA
        # (AutoModelForCausalLM, AutoTokenizer); with it, auto_map selects the memory model
        model_type="llama",
        architectures=["LongLlamaForCausalLM"],
        auto_map=dict(LONGLLAMA_AUTO_MAP),
        mem_layers=list(m.mem_layers),
        mem_positionals=m.mem_positionals == "as_first",
        mem_dtype=m.mem_dtype,
        mem_attention_grouping=None,
        last_context_length=m.last_context_length,
        torch_dtype=torch_dtype,
        use_cache=True,
        initializer_range=m.init_std,
        qk_norm=m.qk_norm,
        mem_attention=m.mem_attention,
    )
    if memory is not None:
        c.update(mem_top_k=None if memory.search == "dense" else int(memory.top_k),
                 mem_capacity=int(memory.capacity), mem_logn_base=int(memory.logn_base))
        c["fot_jax_memory"] = {"search": memory.search, "top_k": int(memory.top_k),
                               "logn_base": int(memory.logn_base)}
    if fot_extensions:
        c["fot_jax"] = {"qk_norm": m.qk_norm, "qk_temperature_init": m.qk_temperature_init,
                        "mem_attention": m.mem_attention, "vocab_multiple": m.vocab_multiple}
    return c


def model_overrides_from_hf(hf: dict) -> dict:
    """fot_jax `model` fields from an HF config.json (LLaMA family, LongLLaMA fields carried over)."""
    arch = list(hf.get("architectures") or [])
    mtype = hf.get("model_type")
    if mtype not in KNOWN_MODEL_TYPES and not set(arch) & set(KNOWN_ARCHITECTURES):
        raise ConversionError(
            f"unknown architecture (model_type={mtype!r}, architectures={arch}); "
            f"fot_jax imports {KNOWN_MODEL_TYPES} models ({', '.join(KNOWN_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("unsupported LLaMA variant: hidden_act must be silu and attention/mlp "
                              f"biases off (got hidden_act={hf.get('hidden_act')!r}, attention_bias="
                              f"{hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')})")
    rope = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in ("default", None):
        raise ConversionError(f"rope_scaling {rope} is not supported (only plain RoPE)")
    rope_params = hf.get("rope_parameters") or {}
    if rope_params and rope_params.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_parameters {rope_params} is not supported (only plain RoPE)")
    heads = int(hf["num_attention_heads"])
    out = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mem_layers=list(hf.get("mem_layers", [])),
        mem_positionals="as_first" if hf.get("mem_positionals", True) else "none",
        qk_norm="none",
        mem_attention="joint",
    )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(name)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            out[name] = int(v)
    if "last_context_length" in hf:
        out["last_context_length"] = int(hf["last_context_length"])
    if hf.get("mem_dtype"):
        out["mem_dtype"] = hf["mem_dtype"]
    out.update({k: hf[k] for k in ("qk_norm", "mem_attention") if hf.get(k)})
    ext = hf.get("fot_jax") or {}
    out.update({k: v for k, v in ext.items() if k in ("qk_norm", "qk_temperature_init", "mem_attention",
                                                       "vocab_multiple")})
    return out


# --- directories --------------------------------------------------------------------------------
class LazyTensors:
    """name -> numpy array over the weight files of an HF directory (safetensors or PyTorch .bin,
    sharded with an index or not), read one tensor at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, str] = {}
        self._bin_cache: dict[str, dict] = {}
        files = sorted(os.listdir(directory))
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if index_name in files:
                index = _read_json(os.path.join(directory, index_name))
                if not isinstance(index.get("weight_map"), dict):
                    raise ConversionError(f"{directory}/{index_name}: no 'weight_map' object")
                for name, fname in index["weight_map"].items():
                    self._where[name] = fname
                missing = sorted({f for f in self._where.values() if f not in files})
                if missing:
                    raise ConversionError(
                        f"{directory}: shard(s) {missing} named in {index_name} are missing"
                    )
                break
        else:
            weights = [f for f in files if f.endswith(".safetensors")] or \
                      [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
            if not weights:
                raise ConversionError(f"{directory}: no model.safetensors, pytorch_model.bin or index "
                                      "file (is this an HF model directory?)")
            for fname in weights:
                for name in self._names(fname):
                    self._where[name] = fname

    def _names(self, fname):
        path = os.path.join(self.directory, fname)
        if fname.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, framework="numpy") as f:
                    return list(f.keys())
            except Exception as err:  # noqa: BLE001
                raise ConversionError(f"{path}: not a readable safetensors file ({err})") from err
        return list(self._load_bin(fname))

    def _load_bin(self, fname):
        if fname not in self._bin_cache:
            try:
                import torch
            except ImportError as err:
                raise ConversionError("reading PyTorch .bin weights needs torch: pip install "
                                      "'fot_jax[torch]'") from err
            path = os.path.join(self.directory, fname)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
            self._bin_cache = {fname: sd}  # one shard in memory at a time
        return self._bin_cache[fname]

    def keys(self):
        return list(self._where)

    def __getitem__(self, name):
        fname = self._where[name]
        if fname.endswith(".safetensors"):
            from safetensors import safe_open
            # numpy cannot hold bfloat16: read through torch, or through JAX without it
            with safe_open(
                os.path.join(self.directory, fname), framework="pt" if _has_torch() else "flax"
            ) as f:
                x = f.get_tensor(name)
            return x.float().numpy() if hasattr(x, "float") else np.asarray(x.astype("float32"))
        return self._load_bin(fname)[name].float().numpy()


def _has_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{directory}: no config.json (is this an HF model directory?)")
    return _read_json(path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: a JSON {type(data).__name__}, expected an object")
    return data
