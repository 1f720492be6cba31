"""GGUF (llama.cpp) LLaMA-architecture files -> HF-named float32 tensors and an HF-style config.

Tensors are dequantised with the `gguf` package. llama.cpp stores q and k projections permuted for
its interleaved RoPE (pairs (2i, 2i+1)); fot_jax and HF rotate halves (i, i + D/2), so q/k rows
are un-permuted here: GGUF row (h, i, j) -> HF row (h, j, i) for i < D/2, j in {0, 1}.
"""
from __future__ import annotations

import numpy as np

from fot_jax.convert.hf import ConversionError

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """[heads*D, E] in llama.cpp's interleaved order -> HF rotate-half order."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_name(name: str, path: str) -> str:
    """The HF LLaMA name of a GGUF tensor (`GGUF_NAMES`, `{i}` the layer index)."""
    for src, dst in GGUF_NAMES.items():
        if "{i}" in src:
            prefix, suffix = src.split("{i}")
            idx = name[len(prefix): len(name) - len(suffix)]
            if name.startswith(prefix) and name.endswith(suffix) and idx.isdigit():
                return dst.format(i=int(idx))
        elif name == src:
            return dst
    if name == "rope_freqs.weight":
        raise ConversionError(f"{path}: has rope_freqs (scaled RoPE), which is not supported")
    raise ConversionError(f"{path}: tensor '{name}' has no LLaMA counterpart")


def _hf_config(reader, path: str) -> dict:
    """The HF LlamaConfig fields of a llama GGUF file's metadata."""
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
    hidden = int(_field(reader, a + "embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, a + "vocab_size", len(tokens)))
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, a + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    for key, name in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        v = _field(reader, name)
        if v is not None:
            config[key] = int(v)
    if _field(reader, a + "rope.scaling.type") not in (None, "none"):
        raise ConversionError(
            f"{path}: RoPE scaling {_field(reader, a + 'rope.scaling.type')!r} is not supported"
        )
    return config


def read_gguf(path: str):
    """(hf_config dict, {HF name: float32 array}, tokenizer metadata dict)."""
    try:
        import gguf
    except ImportError as err:
        raise ConversionError("reading GGUF files needs the gguf package: pip install gguf") from err
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001
        raise ConversionError(f"{path}: not a readable GGUF file ({err})") from err
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: unknown architecture {arch!r} in GGUF metadata; fot_jax imports "
                              "'llama' GGUF files")
    config = _hf_config(reader, path)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, kv_heads)
        tensors[_hf_name(t.name, path)] = w
    meta = {"model": _field(reader, "tokenizer.ggml.model"), "tokens": tokens,
            "chat_template": _field(reader, "tokenizer.chat_template")}
    return config, tensors, meta
