"""How parameters are laid out, and the names people and other formats use for them.

The model stores each run of layers of one structure stacked: `stacks.{s}.layer.<name>`, arrays
with a leading axis of the run's size (`fot_jax.model.llama.LayerStack`). Everything outside the
model names a decoder parameter per layer, `layers.{i}.<name>` (HF's names, less `model.`): the
`train.trainable` patterns, HF conversion, and checkpoints written before layers were stacked. The
functions here go between the two layouts on pure dicts (`nnx.to_pure_dict`), for arrays and for
abstract `jax.ShapeDtypeStruct` leaves alike.
"""
from __future__ import annotations

import re

import jax
import numpy as np

# parameters of a decoder layer `layers.{i}.<name>` (what `train.trainable` patterns see)
LAYER_PARAMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj",
                "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.qk_temperature",
                "self_attn.mem_gate", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def trainable_splits(m, patterns) -> tuple:
    """Layers before which `train.trainable` changes for some parameter: the model splits its runs
    there, so that each stored (stacked) parameter is trained or frozen as a whole."""
    if not patterns:
        return ()
    compiled = [re.compile(p) for p in patterns]

    def status(i):
        return tuple(any(c.search(f"layers.{i}.{p}") for c in compiled) for p in LAYER_PARAMS)
    return tuple(i for i in range(1, m.num_layers) if status(i) != status(i - 1))


def dotted(path) -> str:
    """A key path's dotted name, e.g. `stacks.2.layer.self_attn.q_proj` (a Variable's trailing
    `value` left out)."""
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    return ".".join(names[:-1] if names and names[-1] == "value" else names)


# a stacked leaf's dotted name: anything before it (an optimizer moment's path, say), the run, the
# parameter within the layer
_STACKED = re.compile(r"^((?:.+\.)?)stacks\.(\d+)\.layer\.(.+)$")


def _leading(leaf) -> int:
    return int(leaf.shape[0])


def _named(tree):
    return ((dotted(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])


def _counts(named) -> dict:
    """{run index: layers} from (dotted name, leaf) pairs."""
    counts = {}
    for name, leaf in named:
        hit = _STACKED.match(name)
        if hit:
            counts.setdefault(int(hit.group(2)), _leading(leaf))
    return counts


def _starts(counts: dict) -> dict:
    starts, start = {}, 0
    for s, n in sorted(counts.items()):
        starts[s], start = start, start + n
    return starts


def run_counts(tree) -> tuple:
    """Layers per run of a parameter tree in the stacked layout."""
    counts = _counts(_named(tree))
    return tuple(counts[s] for s in sorted(counts))


def stack_starts(tree) -> dict:
    """{run index: first layer} of a parameter tree in the stacked layout (read off its shapes)."""
    return _starts(_counts(_named(tree)))


def is_stacked(name: str) -> bool:
    """Whether a dotted name is a stacked leaf (a run's parameter, or an optimizer moment of one)."""
    return _STACKED.match(name) is not None


def layer_names(tree) -> dict:
    """{dotted path: the per-layer names it holds} for every leaf of a tree in the stacked layout
    (parameters, or a train state whose optimizer moments mirror them): a stacked leaf
    `<prefix>stacks.{s}.layer.<name>` holds `<prefix>layers.{i}.<name>` of each layer of its run,
    any other leaf its own name."""
    starts = stack_starts(tree)
    return {name: _per_layer(name, leaf, starts) for name, leaf in _named(tree)}


def _per_layer(name: str, leaf, starts: dict) -> list:
    """The per-layer names a leaf holds: `<prefix>layers.{i}.<name>` of each layer of a stacked
    leaf's run, else the leaf's own name."""
    hit = _STACKED.match(name)
    if not hit:
        return [name]
    prefix, first = hit.group(1), starts[int(hit.group(2))]
    return [f"{prefix}layers.{first + j}.{hit.group(3)}" for j in range(_leading(leaf))]


def unstack_flat(flat: dict) -> dict:
    """{dotted name: array} in either layout (a checkpoint's leaves, read as NumPy) -> the per-layer
    layout: each stacked leaf becomes one leaf a layer, under the names `layer_names` gives."""
    starts, out = _starts(_counts(flat.items())), {}
    for name, leaf in flat.items():
        names = _per_layer(name, leaf, starts)
        if is_stacked(name):
            out.update(zip(names, leaf))
        else:
            out[name] = leaf
    return out


def _take(leaf, j):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[j]


def _stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jax.numpy.stack(leaves)


def _int_keys(tree):
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


def per_layer(pure: dict) -> dict:
    """Pure-dict parameters in either layout -> the per-layer layout {'layers': {i: {...}}, ...}."""
    pure = _int_keys(pure)
    if "stacks" not in pure:
        return pure
    out = {k: v for k, v in pure.items() if k != "stacks"}
    layers, start = {}, 0
    for s in sorted(pure["stacks"]):
        tree = pure["stacks"][s]["layer"]
        n = _leading(jax.tree.leaves(tree)[0])
        for j in range(n):
            layers[start + j] = jax.tree.map(lambda x, j=j: _take(x, j), tree)
        start += n
    out["layers"] = layers
    return out


def stacked(pure: dict, counts) -> dict:
    """Pure-dict parameters in either layout -> the stacked layout of runs of `counts` layers."""
    flat = per_layer(pure)
    layers = flat.pop("layers", {})
    if len(layers) != sum(counts):
        raise ValueError(f"{len(layers)} layers of parameters for runs of {tuple(counts)} layers")
    stacks, start = {}, 0
    for s, n in enumerate(counts):
        stacks[s] = {"layer": jax.tree.map(_stack, *[layers[start + j] for j in range(n)])}
        start += n
    flat["stacks"] = stacks
    return flat



def str_keys(tree):
    """A pure dict with every key a string (how Orbax names a checkpoint's entries)."""
    if not isinstance(tree, dict):
        return tree
    return {str(k): str_keys(v) for k, v in tree.items()}


def flatten(tree, prefix="") -> dict:
    """Nested dict (nnx.to_pure_dict) -> {'a.b.c': leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out
