"""Retrieval heads: which attention heads of a pretrained model copy a passkey from far back in
its context, and so which layers to make memory layers.

For passkey prompts that fit the model's window, the model reads the prompt and the key's tokens
(teacher-forced); a head's retrieval score is its attention weight, from the position that
predicts each key token, on that token's copy in the needle, averaged over the key's tokens and
the prompts. Heads that retrieve put most of their weight there; the others put almost none.
FoT adds memory to whole layers, so the layers holding the strongest retrieval heads are the
ones that can read a memory in the way the pretrained model already reads its context (for
SmolLM2-135M: layers 17, 18 and 20; configs/smollm2_memory.py).

Every layer attends locally here (memory layers too): this measures the pretrained circuit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import config as config_lib
from fot_jax.evals import passkey
from fot_jax.model.attention import NEG_INF
from fot_jax.model.rope import rope_cos_sin


def _needle_start(ids, answer) -> int:
    for i in range(len(ids) - len(answer)):
        if list(ids[i: i + len(answer)]) == list(answer):
            return i
    raise ValueError("the passkey's tokens do not appear in its prompt as they do after the question")


def retrieval_scores(model, tokenizer, length: int = 1024, seeds: int = 4):
    """(scores [layers, heads], hits): each head's mean attention weight on the key's tokens in the
    needle, and how many of the prompts the model answers (greedy, teacher-forced) right."""
    m = model.config
    d, g = config_lib.head_dim(m), m.num_heads // m.num_kv_heads
    if length > m.max_position_embeddings:
        raise ValueError(f"prompts of {length} tokens do not fit the model's window of "
                         f"{m.max_position_embeddings} (model.max_position_embeddings)")
    scores = np.zeros((m.num_layers, m.num_heads))
    hits = 0
    for seed in range(seeds):
        rng = np.random.default_rng([length, seed, 17])
        key, depth = int(rng.integers(10000, 50001)), float(rng.random())
        ids, answer = passkey.make_prompt(tokenizer, length, depth, key)
        src = _needle_start(ids, answer) + np.arange(len(answer))
        full = jnp.asarray(np.concatenate([ids, answer]).astype(np.int32))[None]
        q_pos = len(ids) - 1 + np.arange(len(answer))         # the positions that predict the key
        t = full.shape[1]
        cos, sin = rope_cos_sin(jnp.arange(t)[None], d, m.rope_theta)
        causal = jnp.tril(jnp.ones((t, t), bool))
        x = jnp.take(model.embed_tokens[...], full, axis=0)
        for li, layer in enumerate(model.layers):
            q, k, _, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            p = jax.nn.softmax(jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k), NEG_INF), axis=-1)
            scores[li] += np.asarray(p[0][:, q_pos, src]).mean(-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", p, v)
            x = x + jnp.einsum("bqhd,hde->bqe", out, layer.self_attn.o_proj[...])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        head = model.embed_tokens[...].T if m.tie_embeddings else model.lm_head[...]
        pred = np.asarray(jnp.argmax(model.norm(x)[0, q_pos] @ head, axis=-1))
        hits += int(list(pred) == list(answer))
    return scores / seeds, hits


def strongest(scores, top: int = 12, layers: int = 3) -> tuple[list[dict], list[int]]:
    """(rows {layer, head, score} of the `top` heads, the `layers` layers whose best head scores
    highest: the memory layers to choose)."""
    h = scores.shape[1]
    flat = np.argsort(-scores.ravel())[:top]
    rows = [{"layer": int(i // h), "head": int(i % h), "score": float(scores.ravel()[i])} for i in flat]
    return rows, sorted(int(i) for i in np.argsort(-scores.max(axis=1))[:layers])
