"""Exact kNN lookup speed: `fot_jax.memory.knn.topk` on a bfloat16 store (the default store
dtype) against faiss `IndexFlatIP` on its fastest exact path (the BLAS path,
`distance_compute_blas_threshold = 0`) over the same float32 keys, same thread count, measured in
the same run. Also reported: the lookup's achieved GFLOP/s (score matmul FLOPs / time) beside a
plain bfloat16 and float32 matmul of the tile shape measured in the same run, recall against
faiss's float32 result, and the compiled peak temporary memory against the store's size.

    python benchmarks/knn.py                      # one core: 256 and 2048 queries x 1M keys
    python benchmarks/knn.py --threads 2          # all of this machine's cores
    python benchmarks/knn.py --keys 65536 --queries 256   # smaller
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _pin(threads: int):
    """Restrict this process (JAX's thread pool included) to `threads` cores before JAX starts."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    if threads == 1:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=1 << 20)
    parser.add_argument("--queries", default="256,2048")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    _pin(args.threads)
    import faiss
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fot_jax.memory import knn, store

    faiss.omp_set_num_threads(args.threads)
    faiss.cvar.distance_compute_blas_threshold = 0   # faiss's BLAS path: its fastest exact search
    k = args.top_k
    print(f"{args.keys:,} keys, top-{k}, exact; {args.threads} core(s) for both; faiss on its BLAS path; "
          f"fot_jax store bfloat16 (selection scores bf16 x bf16 -> f32)")
    print(f"{'D':>4} {'queries':>7} {'faiss s':>8} {'fot_jax s':>9} {'speedup':>7} {'recall':>7} "
          f"{'GFLOP/s':>8} {'bf16 mm':>8} {'f32 mm':>7} {'store MiB':>9} {'temp MiB':>8}")
    rng = np.random.default_rng(0)
    for d in [int(x) for x in args.dims.split(",")]:
        keys = rng.standard_normal((args.keys, d), np.float32)
        index = faiss.IndexFlatIP(d)
        index.add(keys)
        bits = store.STORE_DTYPES["bfloat16"]
        kj = jax.lax.bitcast_convert_type(jnp.asarray(keys, bits), jnp.uint16)[None, None]
        valid = jnp.ones((1, args.keys), bool)
        fn = jax.jit(lambda q, keys, valid: knn.topk(q, keys, valid, k, dtype="bfloat16"))
        for nq in [int(x) for x in args.queries.split(",")]:
            queries = rng.standard_normal((nq, d), np.float32)
            qj = jnp.asarray(queries)[None, None]
            temp = fn.lower(qj, kj, valid).compile().memory_analysis().temp_size_in_bytes
            jax.block_until_ready(fn(qj, kj, valid))
            t_jax = best_of(lambda: jax.block_until_ready(fn(qj, kj, valid)), args.repeats)
            t_faiss = best_of(lambda: index.search(queries, k), args.repeats)
            _, ref = index.search(queries, k)
            got = np.asarray(fn(qj, kj, valid)[1])[0, 0]
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, ref)])
            flops = 2.0 * nq * args.keys * d
            mm = _matmul_rates(jax, jnp, nq, d, args.keys, args.repeats)
            print(f"{d:>4} {nq:>7} {t_faiss:>8.3f} {t_jax:>9.3f} {t_faiss / t_jax:>6.2f}x {recall:>7.4f} "
                  f"{flops / t_jax / 1e9:>8.0f} {mm['bfloat16']:>8.0f} {mm['float32']:>7.0f} "
                  f"{kj.nbytes / 2**20:>9.0f} {temp / 2**20:>8.1f}", flush=True)


def _matmul_rates(jax, jnp, nq, d, n, repeats):
    """GFLOP/s of a plain [rows, d] x [d, chunk] matmul in the lookup's tile shape, per dtype."""
    rows = min(nq, 256)
    chunk = 1 << 20 >> (rows.bit_length() - 1)
    out = {}
    for name in ("bfloat16", "float32"):
        dt = jnp.dtype(name)
        a = jnp.ones((rows, d), dt)
        b = jnp.ones((chunk, d), dt)
        mm = jax.jit(lambda a, b: jnp.einsum("qd,cd->qc", a, b, preferred_element_type=jnp.float32))
        jax.block_until_ready(mm(a, b))
        reps = max(1, (1 << 30) // (rows * chunk * d))
        t = best_of(lambda: [jax.block_until_ready(mm(a, b)) for _ in range(reps)], repeats) / reps
        out[name] = 2.0 * rows * chunk * d / t / 1e9
    return out


if __name__ == "__main__":
    sys.exit(main())
