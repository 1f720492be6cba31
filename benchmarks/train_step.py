"""Train-step speed (tokens/s, MFU against a float32 matmul measured in the same run) and the
peak memory of crossbatch attention as r grows (compiled memory analysis).

    python benchmarks/train_step.py            # full run (a few minutes on 2 cores)
    python benchmarks/train_step.py --quick    # smaller, for a smoke test
    python benchmarks/train_step.py --backend reference,xla   # each attention backend, same run
    python benchmarks/train_step.py --config configs/smollm2_memory.py --batch 4 --steps 3 \
        --skip-memory-table            # a config's own model, data shape, range and trainable layers
                                       # (random parameters; train.init_from is not read)
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import config as config_lib
from fot_jax.model.attention import CrossbatchSpec, crossbatch_attention
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.train import metrics as metrics_lib
from fot_jax.train.loop import Trainer, to_global


def bench_config(args, backend="auto"):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size = 32000
    m.hidden_size = args.width
    m.intermediate_size = 4 * args.width
    m.num_layers = args.layers
    m.num_heads = args.width // 64
    m.num_kv_heads = args.width // 64
    m.max_position_embeddings = args.seq_len
    m.mem_layers = [int(i) for i in args.mem_layers.split(",")] if args.mem_layers else [args.layers // 2]
    m.dtype = args.dtype
    m.remat = args.remat
    m.attention_backend = backend
    m.scan_layers = bool(args.scan_layers)
    c.crossbatch.range = args.range
    c.crossbatch.k_packing = args.range + 1
    c.crossbatch.stepping = False
    c.crossbatch.eval_ranges = [0]
    c.crossbatch.implementation = args.implementation
    c.data.seq_len = args.seq_len
    c.data.doc_length = 2 * args.seq_len * (args.range + 1)
    c.data.query_length = args.seq_len
    c.data.batch_size = args.batch
    c.train.steps = 10
    c.mesh.data = 1
    return c


def file_config(args, backend="auto"):
    """The model, window, crossbatch range and trainable layers of a config file (its first
    stage's range when it has stages), with `--batch` rows, random parameters."""
    # the batches are random ids: any tokenizer passes validation (the shipped one stands in for
    # the pretrained model's, which train.init_from would supply)
    cfg = config_lib.load_config(args.config, ["--config.train.init_from=", "--config.stages=[]",
                                               "--config.data.tokenizer=open_llama_v2",
                                               f"--config.data.batch_size={args.batch}",
                                               f"--config.model.attention_backend={backend}"])
    args.range, args.seq_len = cfg.crossbatch.range, cfg.data.seq_len
    args.layers, args.width = cfg.model.num_layers, cfg.model.hidden_size
    return cfg


def step_speed(args, backend="auto"):
    cfg = file_config(args, backend) if args.config else bench_config(args, backend)
    trainer = Trainer(cfg, "/tmp/fot_bench", devices=jax.devices()[:1], quiet=True)
    B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, V, (B, T)).astype(np.int32),
             "targets": rng.integers(0, V, (B, T)).astype(np.int32),
             "loss_mask": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32)}
    with mesh_lib.use_mesh(trainer.mesh):
        fn = trainer.train_step_fn(args.range)
        gb = to_global(batch, trainer.mesh)
        r = jnp.int32(args.range)
        state, m = fn(trainer.state, gb, r)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = fn(state, gb, r)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    tokens = B * T
    flops = metrics_lib.model_flops_per_token(cfg.model, T, args.range,
                                              trainable=tuple(cfg.train.trainable)) * tokens
    return trainer.num_params, step, tokens / step, flops / step


def attention_memory(t, r, implementation, rows=2, heads=8, head_dim=64):
    """Peak bytes XLA allocates (temporaries + outputs) for forward+backward of crossbatch
    attention over `rows` rows of T tokens, each seeing r other rows."""
    b = rows
    spec = CrossbatchSpec(range_max=r, k_packing=b, stepping=False, implementation=implementation)
    shape = jax.ShapeDtypeStruct((b, t, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return crossbatch_attention(q, k, k, v, spec=spec).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--range", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="none")
    p.add_argument("--implementation", default="dense")
    p.add_argument("--backend", default="auto",
                   help="attention backend(s), comma-separated; several: each timed in this run, "
                        "the first is the baseline of the ratios (splash on CPU is interpreted: not a speed)")
    p.add_argument("--memory_seq_len", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--mem-layers", default="", help="memory layers, e.g. 4,8,12 (default: the middle layer)")
    p.add_argument(
        "--matmul-size", type=int, default=1024, help="side of the matmul that measures peak FLOP/s"
    )
    p.add_argument("--skip-memory-table", action="store_true")
    p.add_argument("--scan-layers", type=int, default=1, help="1: scanned layer runs (default), 0: unrolled")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", help="a config file's model instead of --layers/--width (see the module doc)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.width, args.seq_len, args.batch, args.steps = 2, 128, 128, 4, 2
        args.memory_seq_len = 256
    peak = metrics_lib.measure_matmul_flops(size=args.matmul_size, dtype=jnp.dtype(args.dtype))
    print(
        f"device: {jax.devices()[0].device_kind}, {args.dtype} matmul peak measured now: "
        f"{peak / 1e9:,.1f} GFLOP/s"
    )
    base = None
    for backend in args.backend.split(","):
        n, step, tps, fps = step_speed(args, backend)
        base = base or tps
        print(
            f"train step [{backend}]: {args.layers} layers x {args.width} wide ({n / 1e6:.1f}M params), "
            f"T={args.seq_len}, r={args.range}, batch {args.batch}: {step * 1e3:.0f} ms/step, "
            f"{tps:,.0f} tokens/s "
            f"({tps / base:.2f}x the first backend), {fps / 1e9:.1f} GFLOP/s, "
            f"MFU {100 * fps / peak:.1f}% of the measured matmul",
            flush=True,
        )
    if args.skip_memory_table:
        return
    print(f"crossbatch attention peak memory (compiled memory analysis), forward + backward, "
          f"2 rows x T={args.memory_seq_len}, 8 heads x 64; the keys of r other rows are visible:")
    print(f"{'r':>4} {'dense MiB':>10} {'MiB/(r+1)':>10} {'blockwise MiB':>14} {'MiB/(r+1)':>10}")
    for r in ([1, 7, 31] if not args.quick else [1, 3]):
        d = attention_memory(args.memory_seq_len, r, "dense") / 2 ** 20
        bw = attention_memory(args.memory_seq_len, r, "blockwise") / 2 ** 20
        print(f"{r:>4} {d:>10.1f} {d / (r + 1):>10.2f} {bw:>14.1f} {bw / (r + 1):>10.2f}")


if __name__ == "__main__":
    main()
