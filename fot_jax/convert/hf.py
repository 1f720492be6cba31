"""fot_jax parameters <-> HF LLaMA tensors: one declarative name map, used in both directions.

Each entry: (fot_jax path pattern, HF name pattern, transform). `{i}` is the layer index. The
transform takes the fot_jax array and the model config and returns the HF array; its inverse is
given alongside. RoPE is in the HF `rotate_half` layout already, so q/k need no permutation.
"""
from __future__ import annotations

import numpy as np

from fot_jax import config as config_lib


def _t(x, m):
    return x.T


def _qkv_to_hf(x, m):          # [E, H, D] -> [H*D, E]
    return x.reshape(x.shape[0], -1).T


def _o_to_hf(x, m):            # [H, D, E] -> [E, H*D]
    return x.reshape(-1, x.shape[-1]).T


def _embed_to_hf(x, m):        # [V_padded, E] -> [V, E]
    return x[: m.vocab_size]


def _head_to_hf(x, m):         # [E, V_padded] -> [V, E]
    return x[:, : m.vocab_size].T


def _same(x, m):
    return x


NAME_MAP = (
    ("embed_tokens", "model.embed_tokens.weight", _embed_to_hf),
    ("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", _same),
    ("layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight", _same),
    ("layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.q_proj.weight", _qkv_to_hf),
    ("layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.k_proj.weight", _qkv_to_hf),
    ("layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.v_proj.weight", _qkv_to_hf),
    ("layers.{i}.self_attn.o_proj", "model.layers.{i}.self_attn.o_proj.weight", _o_to_hf),
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", _t),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj.weight", _t),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj.weight", _t),
    ("norm.weight", "model.norm.weight", _same),
    ("lm_head", "lm_head.weight", _head_to_hf),
)


def flatten(tree, prefix=""):
    """Nested dict (nnx.to_pure_dict) -> {'a.b.c': array}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def to_hf_state_dict(params: dict, m) -> dict[str, np.ndarray]:
    """Pure-dict fot_jax params -> HF LLaMA state dict (numpy, unpadded vocab)."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    out = {}
    for i in [None] + list(range(m.num_layers)):
        for src, dst, fn in NAME_MAP:
            if ("{i}" in src) != (i is not None):
                continue
            key = src.format(i=i)
            if key not in flat:
                if key == "lm_head" and m.tie_embeddings:
                    continue
                raise KeyError(f"parameter '{key}' missing from the fot_jax state")
            out[dst.format(i=i)] = np.ascontiguousarray(fn(flat.pop(key), m))
    for key in list(flat):
        if key.endswith("qk_temperature"):
            flat.pop(key)  # fot_jax-only parameter (query/key normalisation), no HF counterpart
    if flat:
        raise KeyError(f"parameters without an HF name: {sorted(flat)}")
    return out


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
