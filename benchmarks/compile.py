"""Inference compile time against depth: SmolLM2-135M's shape at 30 layers and at 4, in one run.

Each model (random weights; memory layers 17, 18, 20 of 30, or 2 of 4, as in
configs/smollm2_memory.py) gets a `MemoryRuntime`, and three of its programs are lowered and
compiled (seconds, best of `--repeats`, each a fresh compile): reading a window into memory,
appending one token (`extend`), and the device decode loop (`generate`); the same models without
memory layers (an import) have the last two. Runs of layers of one
structure are stacked, and a window without a cache scans them (a program that does not grow with
depth); the cached programs (extend, decode) run layer by layer on parameters sliced once, which
decodes faster on CPU and compiles every layer. Printed: the 30-layer / 4-layer ratio per program.

    python benchmarks/compile.py                 # window 256, as the SmolLM2 memory recipe
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama


def make_model(layers: int, mem_layers, window: int):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 49152, 576, 1536
    m.num_layers, m.num_heads, m.num_kv_heads = layers, 9, 3
    m.tie_embeddings = True
    m.max_position_embeddings, m.last_context_length = window, window // 2
    m.mem_layers = list(mem_layers)
    c.data.seq_len = window
    c.data.doc_length = 2 * window
    checks.validate(c)
    return llama.create(m, seed=0)


def compile_seconds(jitted, *args) -> float:
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - start


def measure(model, window: int, repeats: int) -> dict:
    rt = MemoryRuntime(model, 1, MemorySettings(top_k=32, capacity=16 * window, dtype="bfloat16",
                                                last_context_length=window // 2))
    b = rt.batch
    tokens = jnp.zeros((b, window), jnp.int32)
    one = jnp.zeros((b, 1), jnp.int32)
    n = jnp.ones((b,), jnp.int32)
    logits = jnp.zeros((b, model.config.vocab_size), jnp.float32)
    both = (rt.params, rt.layer_params)
    programs = {} if not model.config.mem_layers else {
        "window -> memory": lambda: compile_seconds(rt._window_fn, rt.params, rt.state, tokens, n * window,
                                                    False)}
    programs |= {
        "extend (1 token)": lambda: compile_seconds(rt._extend_fn, both, rt.state, one, n, 64),
        "decode loop": lambda: compile_seconds(rt._decode_fn, both, rt.state, logits, jax.random.key(0),
                                               jnp.zeros((b,), bool), jnp.int32(16), jnp.int32(-1), 0.0, 1.0,
                                               64),
    }
    out = {}
    for name, fn in programs.items():
        best = float("inf")
        for _ in range(repeats):
            jax.clear_caches()
            best = min(best, fn())
        out[name] = best
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(f"SmolLM2-135M shape (576 wide, 9/3 heads), window {args.window}; compile seconds, best of "
          f"{args.repeats}; jax {jax.__version__}, {len(os.sched_getaffinity(0))} core(s)")
    print("| model | program | 4 layers | 30 layers | 30 / 4 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, deep_mem, shallow_mem in (("memory layers 17, 18, 20 (2 of 4)", [17, 18, 20], [2]),
                                         ("no memory layers (the import)", [], [])):
        deep = measure(make_model(30, deep_mem, args.window), args.window, args.repeats)
        shallow = measure(make_model(4, shallow_mem, args.window), args.window, args.repeats)
        for name in deep:
            print(f"| {kind} | {name} | {shallow[name]:.2f} | {deep[name]:.2f} | "
                  f"{deep[name] / shallow[name]:.2f} |", flush=True)
        total = (sum(deep.values()), sum(shallow.values()))
        print(f"| {kind} | all | {total[1]:.2f} | {total[0]:.2f} | {total[0] / total[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
