"""kNN lookup speed and memory: `fot_jax.memory.knn.topk` (chunked exact top-k, float32 store)
against `faiss.IndexFlatIP` (exact inner-product search) on the same data, same thread count,
measured in the same run; and the compiled peak temporary memory against the store's size.

    python benchmarks/knn.py                 # 256 queries x 1M keys, D in {64, 128}, k in {32, 128}
    python benchmarks/knn.py --keys 65536    # smaller
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax.memory import knn


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1 << 20)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--top-k", default="32,128")
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    import faiss
    faiss.omp_set_num_threads(args.threads)
    print(f"{args.queries} queries x {args.keys:,} keys, float32, {args.threads} thread(s) for faiss; "
          f"jax devices: {jax.devices()[0].platform}")
    print(f"{'D':>4} {'k':>4} {'faiss s':>9} {'fot_jax s':>10} {'speedup':>8} {'recall':>7} "
          f"{'store MiB':>10} {'temp MiB':>9}")
    rng = np.random.default_rng(0)
    for d in [int(x) for x in args.dims.split(",")]:
        keys = rng.standard_normal((args.keys, d), np.float32)
        queries = rng.standard_normal((args.queries, d), np.float32)
        index = faiss.IndexFlatIP(d)
        index.add(keys)
        kj = jnp.asarray(keys)[None, None]
        qj = jnp.asarray(queries)[None, None]
        valid = jnp.ones((1, args.keys), bool)
        for k in [int(x) for x in args.top_k.split(",")]:
            fn = jax.jit(lambda q, keys, valid, k=k: knn.topk(q, keys, valid, k, chunk=args.chunk))
            compiled = fn.lower(qj, kj, valid).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(fn(qj, kj, valid))
            t_jax = best_of(lambda: jax.block_until_ready(fn(qj, kj, valid)), args.repeats)
            t_faiss = best_of(lambda: index.search(queries, k), args.repeats)
            _, ref = index.search(queries, k)
            _, got = fn(qj, kj, valid)
            got = np.asarray(got)[0, 0]
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, ref)])
            print(f"{d:>4} {k:>4} {t_faiss:>9.3f} {t_jax:>10.3f} {t_faiss / t_jax:>7.2f}x {recall:>7.4f} "
                  f"{keys.nbytes / 2**20:>10.0f} {temp / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
