"""Forward + backward of crossbatch attention per backend, against `reference`, in one run:
peak temporary memory (compiled memory analysis: temporaries + outputs) and, where the backend
runs natively, time and achieved FLOP/s as a share of a matmul measured in the same run.

    python benchmarks/attention.py                       # T = 512, 2048, 8192; r = 0, 3, 7
    python benchmarks/attention.py --quick               # T = 512, 2048; r = 0, 3
    python benchmarks/attention.py --backends reference,splash --seq 2048 --ranges 7

On CPU, splash runs in Pallas interpret mode (a simulation of the TPU kernel): its memory
figures hold, its time is not the kernel's and is not measured. cuDNN needs a GPU. The tiled
reference at T = 8192, r = 7 is compiled (for its memory) but, like every T = 8192 case on CPU,
not timed unless --time-all.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from fot_jax.model import kernels
from fot_jax.model.attention import CrossbatchSpec, crossbatch_attention
from fot_jax.train import metrics as metrics_lib


def compile_case(backend, t, r, rows, heads, head_dim, dtype, interpret):
    spec = CrossbatchSpec(range_max=r, k_packing=rows, stepping=False)
    opts = kernels.KernelOptions(backend=backend, interpret=interpret)
    shape = jax.ShapeDtypeStruct((rows, t, heads, head_dim), dtype)

    def loss(q, k, v):
        return crossbatch_attention(q, k, k, v, spec=spec, kernel=opts).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()


def flops(t, r, rows, heads, head_dim):
    """Matmul FLOPs of forward + backward (causal own row counted in full, as kernels do)."""
    fwd = 2 * 2 * rows * heads * t * (r + 1) * t * head_dim
    return 3 * fwd


def time_case(compiled, rows, t, heads, head_dim, dtype, repeats=3):
    x = jnp.ones((rows, t, heads, head_dim), dtype) * 0.01
    jax.block_until_ready(compiled(x, x, x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, x, x))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="")
    p.add_argument("--seq", default="512,2048,8192")
    p.add_argument("--ranges", default="0,3,7")
    p.add_argument(
        "--rows", type=int, default=0, help="batch rows (default: r + 1, so every row sees r others)"
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--time-all", action="store_true", help="also time T = 8192 on CPU")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seq, args.ranges = "512,2048", "0,3"
    platform = kernels.platform_of()
    backends = args.backends.split(",") if args.backends else [
        b for b in kernels.PLATFORM_BACKENDS.get(platform, ("reference", "xla")) if b != "reference"]
    dtype = jnp.dtype(args.dtype)
    peak = metrics_lib.measure_matmul_flops(dtype=dtype)
    print(f"device: {jax.devices()[0].device_kind} ({platform}), {args.dtype} matmul measured now: "
          f"{peak / 1e9:,.1f} GFLOP/s; {args.heads} heads x {args.head_dim}, forward + backward")
    print(
        f"{'T':>6} {'r':>3} {'backend':>10} {'temp MiB':>10} {'x ref mem':>10} {'ms':>9} {'x ref time':>11} "
        f"{'of matmul':>10}"
    )
    for t in [int(x) for x in args.seq.split(",")]:
        for r in [int(x) for x in args.ranges.split(",")]:
            rows = args.rows or r + 1
            results = {}
            for backend in ["reference"] + backends:
                interpret = backend == "splash" and platform != "tpu"
                compiled = compile_case(backend, t, r, rows, args.heads, args.head_dim, dtype, interpret)
                mem = compiled.memory_analysis()
                mib = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2 ** 20
                timed = not interpret and (platform != "cpu" or t < 8192 or args.time_all)
                secs = time_case(compiled, rows, t, args.heads, args.head_dim, dtype) if timed else None
                results[backend] = (mib, secs)
                ref_mib, ref_s = results["reference"]
                share = (
                    f"{100 * flops(t, r, rows, args.heads, args.head_dim) / secs / peak:9.1f}%"
                    if secs
                    else ""
                )
                print(f"{t:>6} {r:>3} {backend:>10} {mib:>10.1f} {mib / ref_mib:>10.3f} "
                      f"{(f'{secs * 1e3:9.1f}' if secs else 'not timed'):>9} "
                      f"{(f'{ref_s / secs:11.2f}' if secs and ref_s else ''):>11} {share:>10}", flush=True)


if __name__ == "__main__":
    main()
