"""AdamW with global-norm clipping, warmup then cosine / inverse-sqrt / constant schedules, and no
weight decay on norms, embeddings and temperatures."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def make_optimizer(t):
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                     mask=decay_mask),
    )


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
