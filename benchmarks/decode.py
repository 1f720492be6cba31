"""Decode-step cost against tokens in memory: exact top-k and dense memory attention, one run.

A random model (default 8 layers x 512, memory layers 3 and 6, vocabulary 32,000) holds M tokens
in memory; each row of the table times a steady-state decode step two ways: one host call per
token (`MemoryRuntime.extend`, what an interactive loop pays) and the device decode loop
(`MemoryRuntime.generate`, 64 tokens a call). The top-k / dense ratios are the figures of merit:
top-k must cost about what dense costs at small M and less once the store is large.

    taskset -c 0 python benchmarks/decode.py                 # M = 8K, 64K, 256K on one core
    python benchmarks/decode.py --sizes 8192,65536 --top-k 32
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama


def make_model(args):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = 32000, args.width, 4 * args.width
    m.num_layers, m.num_heads, m.num_kv_heads = (
        args.layers,
        args.width // 64,
        args.kv_heads or args.width // 64,
    )
    m.max_position_embeddings, m.last_context_length = args.window, args.window
    m.mem_layers = [int(i) for i in args.mem_layers.split(",")]
    c.data.seq_len = args.window
    c.data.doc_length = 2 * args.window
    checks.validate(c)
    return c, llama.create(m, seed=0)


def per_token(fn, tokens, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / tokens


def measure(model, args, size, search):
    """(s per token with extend, s per token with generate) after reading `size` tokens: the
    prompt is read once; each timed run takes the row back to that point (`mark` / `rewind`)."""
    settings = MemorySettings(
        top_k=args.top_k,
        capacity=size + args.window,
        search=search,
        dtype="bfloat16",
        last_context_length=args.window,
    )
    rt = MemoryRuntime(model, 1, settings)
    prompt = np.random.default_rng(0).integers(3, 32000, size + args.window // 2).astype(np.int32)
    rt.ingest([prompt])
    mark = rt.mark()

    def extend_loop():
        rt.rewind(mark)
        for t in range(args.tokens):
            rt.extend([[7 + t]])

    def generate(n):
        rt.rewind(mark)
        rt.generate([[7]], n, stop_token=-1, continue_documents=True)

    extend_loop()                                      # compile the one-token program
    generate(2)                                        # and the decode loop
    t_extend = per_token(extend_loop, args.tokens, args.repeats)
    t_n = per_token(lambda: generate(args.tokens), 1, args.repeats)
    t_1 = per_token(lambda: generate(1), 1, args.repeats)
    return t_extend, (t_n - t_1) / (args.tokens - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8192,65536,262144")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--mem-layers", default="3,6")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    c, model = make_model(args)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"model: {args.layers} x {args.width} ({n / 1e6:.0f}M parameters), memory layers {args.mem_layers}, "
        f"window {args.window}, bfloat16 store, top-k {args.top_k}; ms per decoded token, best of "
        f"{args.repeats}; {len(os.sched_getaffinity(0))} core(s)"
    )
    print(
        "| tokens in memory | dense, extend | top-k, extend | top-k / dense | dense, device loop | "
        "top-k, device loop | top-k / dense |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in [int(s) for s in args.sizes.split(",")]:
        de, dg = measure(model, args, size, "dense")
        ke, kg = measure(model, args, size, "exact")
        print(
            f"| {size:,} | {de * 1e3:.2f} | {ke * 1e3:.2f} | {ke / de:.2f} | "
            f"{dg * 1e3:.2f} | {kg * 1e3:.2f} | {kg / dg:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
