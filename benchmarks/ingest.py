"""Long-input ingest throughput with memory (`fot_jax.infer.runtime.MemoryRuntime.ingest`).

A small model (4 layers, width 256, window 512, memory layers 1 and 3, so that the first memory
layer's lookups are on the path to what the second writes) reads one document of L tokens, for L
from 8K to 64K, with top-k 128 and with dense memory attention (every entry). Baseline in the same
run: the same windows through the plain model with no memory at all (a batch of independent
windows). Printed: tokens/s, time relative to the baseline, and time growth against L.

    python benchmarks/ingest.py
    python benchmarks/ingest.py --lengths 8192,16384 --repeats 1     # quick
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fot_jax import config as config_lib
from fot_jax.infer.runtime import MemoryRuntime, MemorySettings
from fot_jax.model import llama


def model_config(args):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size = 1024               # small, so that the baseline's logits do not dominate
    m.hidden_size = args.width
    m.intermediate_size = 4 * args.width
    m.num_layers = 4
    m.num_heads = args.width // 64
    m.num_kv_heads = args.width // 64
    m.max_position_embeddings = args.window
    m.mem_layers = [1, 3]
    m.last_context_length = args.window
    return m


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="8192,16384,32768,65536")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    m = model_config(args)
    model = llama.create(m, seed=0)
    lengths = [int(x) for x in args.lengths.split(",")]
    capacity = max(lengths)
    rng = np.random.default_rng(0)
    graphdef, params = nnx.split(model)
    plain = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)

    warmed = set()

    def timed(fn, key):
        if key not in warmed:  # compile once per program (shapes do not change with L)
            fn()
            warmed.add(key)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    runtimes = {mode: MemoryRuntime(model, 1, MemorySettings(
        top_k=args.top_k, capacity=capacity, search=mode, dtype="float32",
        last_context_length=args.window)) for mode in ("exact", "dense")}
    print(f"model: 4 layers, width {args.width}, window {args.window}, memory layers {list(m.mem_layers)}; "
          f"store float32, capacity {capacity:,}; best of {args.repeats}")
    print(
        f"{'L':>7} {'plain tok/s':>12} {'top-k tok/s':>12} {'dense tok/s':>12} "
        f"{'top-k/plain':>12} {'dense/plain':>12}"
    )
    rows = []
    for length in lengths:
        doc = rng.integers(3, m.vocab_size, length).astype(np.int32)
        windows = jnp.asarray(doc.reshape(-1, args.window))
        t_plain = timed(lambda: jax.block_until_ready(plain(params, windows)), ("plain", length))
        t = {mode: timed(lambda rt=rt: rt.ingest([doc]), mode) for mode, rt in runtimes.items()}
        rows.append((length, t_plain, t["exact"], t["dense"]))
        print(
            f"{length:>7} {length / t_plain:>12,.0f} {length / t['exact']:>12,.0f} "
            f"{length / t['dense']:>12,.0f} "
            f"{t['exact'] / t_plain:>11.2f}x {t['dense'] / t_plain:>11.2f}x"
        )
    first = rows[0]
    print(f"growth from {first[0]:,} to {rows[-1][0]:,} tokens ({rows[-1][0] / first[0]:.0f}x the tokens): "
          f"plain {rows[-1][1] / first[1]:.1f}x, top-k {rows[-1][2] / first[2]:.1f}x, "
          f"dense {rows[-1][3] / first[3]:.1f}x the time")


if __name__ == "__main__":
    main()
