"""AdamW with global-norm clipping, warmup then cosine / inverse-sqrt / constant schedules, no
weight decay on norms, embeddings and temperatures, and optionally a trainable subset of the
parameters (`train.trainable`): the others get no gradient, no update and no optimizer state."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from fot_jax.errors import ConfigError
from fot_jax.model import layout


def make_schedule(t):
    """Learning rate as a function of the step (optax schedule)."""
    peak, warmup = t.learning_rate, max(int(t.warmup_steps), 0)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    decay_steps = max(int(t.steps) - warmup, 1)
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=t.end_lr_factor)
    elif t.schedule == "inverse_sqrt":
        base = max(warmup, 1)
        after = lambda step: peak * jnp.sqrt(base / (step + base))
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
    """True for matrices (projections, lm_head); False for norms, embeddings, temperatures."""
    def keep(path, leaf):
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return leaf.ndim >= 2 and "embed_tokens" not in names
    return jax.tree_util.tree_map_with_path(keep, params)


def param_path(path) -> str:
    """A parameter's dotted name as stored, e.g. `stacks.2.layer.self_attn.q_proj`."""
    return layout.dotted(path)


def trainable_mask(params, patterns):
    """True for the parameters whose per-layer names (`layers.{i}.<name>`, see
    `fot_jax.model.layout`) match one of `patterns` (`re.search`); every parameter when `patterns`
    is empty. A stacked parameter holds several layers: all of them must agree (the model splits
    its runs where `train.trainable` changes)."""
    compiled = [re.compile(p) for p in patterns]
    if not compiled:
        return jax.tree.map(lambda _: True, params)
    names = layout.layer_names(params)

    def one(path, _):
        hits = {any(c.search(n) for c in compiled) for n in names[layout.dotted(path)]}
        if len(hits) > 1:
            raise ConfigError(f"config field 'train.trainable' trains part of the stacked parameter "
                              f"{layout.dotted(path)} ({names[layout.dotted(path)][0]} ...); build the "
                              "model with runs split where train.trainable changes (llama.abstract_model)")
        return hits.pop()
    return jax.tree_util.tree_map_with_path(one, params)


def check_trainable(params, patterns) -> None:
    """Every `train.trainable` pattern names at least one parameter (a typo would freeze the model)."""
    names = [n for group in layout.layer_names(params).values() for n in group]
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            raise ConfigError(f"config field 'train.trainable': {pattern!r} matches no parameter "
                              f"(names look like {names[1]!r}, {names[-1]!r})")


def make_optimizer(t):
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                     mask=decay_mask),
    )
    if list(t.trainable):
        # frozen parameters hold no moments; their (zero) gradients pass through as zero updates
        tx = optax.masked(tx, lambda params: trainable_mask(params, list(t.trainable)))
    return tx


def freeze(params, patterns):
    """`params` with the parameters outside `patterns` behind stop_gradient: differentiating
    through it computes no gradient for them, nor any backward pass that only they would need
    (layers below the lowest trainable one, with the embedding frozen, run forward only)."""
    if not list(patterns):
        return params
    return jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params,
                        trainable_mask(params, list(patterns)))


def scale_temperature_updates(updates, scale: float):
    """Multiplies the optimizer's updates of the qk_norm temperatures by `scale`
    (`train.temperature_lr_scale`). Applied to the updates, after the optimizer, so the optimizer
    state has the same structure whatever the scale (checkpoints stay restorable). `scale` may be
    a traced scalar (a stage's scale is a runtime input of the train step)."""
    if isinstance(scale, (int, float)) and scale == 1.0:
        return updates

    def one(path, u):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        return u * jnp.asarray(scale, u.dtype) if "qk_temperature" in names else u
    return jax.tree_util.tree_map_with_path(one, updates)
