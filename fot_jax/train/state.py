"""Train state, created already sharded from its abstract shape.

The state is a pytree `{"step", "params", "opt_state"}` whose parameters (and the optimizer moments
that mirror them) are `nnx.Param` variables carrying `logical_axes`; shardings are read off the
abstract state (`jax.eval_shape`), and `jax.jit(init, out_shardings=...)` materialises every array
directly in its shards: no full copy on one device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fot_jax.model import llama
from fot_jax.model.llama import abstract_model
from fot_jax.parallel.mesh import DEFAULT_RULES, logical_to_spec
from fot_jax.train.optim import make_optimizer


def _is_var(x):
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh, rules=DEFAULT_RULES):
    """NamedSharding for every leaf: by logical axes for variables, replicated otherwise."""
    def one(x):
        if _is_var(x) and isinstance(x.get_raw_value(), optax.MaskedNode):
            return x        # a frozen parameter's empty optimizer slot (`train.trainable`): no array
        if _is_var(x):
            names = x.get_metadata().get("logical_axes")
            spec = logical_to_spec(names, mesh, rules, x.shape) if names else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, abstract_state, is_leaf=_is_var)


def abstract_train_state(cfg, mesh, rules=DEFAULT_RULES):
    """(graphdef, optimizer, init function, abstract state, state shardings): nothing allocated."""
    tx = make_optimizer(cfg.train)

    def init():
        model = llama.from_config(cfg)
        params = nnx.state(model, nnx.Param)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    graphdef, _ = abstract_model(cfg)
    abstract = jax.eval_shape(init)
    return graphdef, tx, init, abstract, state_shardings(abstract, mesh, rules)


def create_train_state(cfg, mesh, rules=DEFAULT_RULES):
    """Returns (graphdef, optimizer, state, state_shardings)."""
    graphdef, tx, init, _, shardings = abstract_train_state(cfg, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, tx, state, shardings


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
