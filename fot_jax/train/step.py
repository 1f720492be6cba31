"""Loss, train step (with gradient accumulation) and eval step: pure functions of
(graph def, state, batch), jitted by the loop with explicit shardings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fot_jax.model.attention import CrossbatchSpec
from fot_jax.train.optim import freeze, scale_temperature_updates


def cross_entropy(logits, targets, mask):
    """Token-weighted sums: (loss_sum, correct_sum, token_count), all float32 scalars."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    loss_sum = jnp.sum((logz - gold) * mask)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
    return loss_sum, correct, jnp.sum(mask)


def forward_sums(graphdef, params, batch, spec: CrossbatchSpec, r):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], crossbatch=spec,
                   crossbatch_range=r).logits
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def split_microbatches(batch, n: int):
    """[B, T] -> [n, B/n, T], contiguous rows so that k-packed streams stay together."""
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state, batch, r, lr_scale=1.0, temperature_scale=1.0, *, graphdef, tx, spec: CrossbatchSpec,
               microbatches: int, schedule, trainable=()):
    """One optimizer step on the global batch. Gradients are token-weighted: the sum over all
    microbatches of d(loss_sum), divided by the total number of loss tokens, which equals the
    gradient of the whole batch's mean loss. `lr_scale` multiplies the optimizer's updates (AdamW's
    update is linear in its learning rate, so this is the schedule's learning rate times
    lr_scale); `temperature_scale` multiplies the qk_norm temperatures' updates on top.
    `trainable`: patterns of the parameters that train (`train.trainable`; empty: all); the others
    get a zero gradient that is never computed."""
    params = state["params"]

    def grad_sums(mb):
        def f(p):
            loss_sum, correct, count = forward_sums(graphdef, freeze(p, trainable), mb, spec, r)
            return loss_sum, (correct, count)
        (loss_sum, (correct, count)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, loss_sum, correct, count

    if microbatches == 1:
        grads, loss_sum, correct, count = grad_sums(batch)
    else:
        def body(acc, mb):
            g, l, c, n = grad_sums(mb)
            return jax.tree.map(jnp.add, acc, (g, l, c, n)), None
        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, correct, count), _ = jax.lax.scan(
            body, zeros, split_microbatches(batch, microbatches))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    updates = scale_temperature_updates(updates, temperature_scale)
    updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "accuracy": correct / denom,
        "tokens": count,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state["step"]) * lr_scale,
        "step": state["step"],
    }
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics


def eval_step(params, batch, r, *, graphdef, spec: CrossbatchSpec):
    loss_sum, correct, count = forward_sums(graphdef, params, batch, spec, r)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}
