"""A compile-time plan: lower and compile the train step of a big config on a simulated mesh of the
pod's shape, with abstract parameters (nothing is materialised), and report per-device memory and
the sharding of every parameter.

    fot-jax plan --config configs/longllama_3b.py --mesh fsdp=32

The CLI sets `--xla_force_host_platform_device_count` to the mesh size before JAX starts, so a
laptop stands in for a v3-32 (or any shape). XLA's own memory analysis of the compiled SPMD
program gives arguments (parameters, optimizer state, batch), outputs (aliased with the donated
state), and temporaries (activations, gradients, collectives' buffers); parameters and optimizer
state are also counted from their shard shapes. A large parameter left replicated is a warning; a
total over `--device-memory` GiB is an error before anyone pays for a pod. XLA:CPU's temporaries
are an estimate of TPU's (different fusion and layouts; TPU pads small minor dimensions).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fot_jax import checks
from fot_jax import config as config_lib
from fot_jax.model import kernels, layout
from fot_jax.parallel import mesh as mesh_lib
from fot_jax.parallel import simulate_host_devices
from fot_jax.train import metrics as metrics_lib
from fot_jax.train.compile import batch_shardings, check_batch_divides, jit_train_step
from fot_jax.train.state import abstract_train_state

GiB = 1024 ** 3
# A parameter this large (elements) left fully replicated on a multi-device mesh is a warning.
REPLICATED_WARN_ELEMENTS = 1 << 20


def parse_mesh(text: str) -> dict:
    """'fsdp=32' or 'data=2,fsdp=16,tensor=1' -> {axis: size} (unnamed axes: 1)."""
    out = {a: 1 for a in mesh_lib.MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise config_lib.ConfigError(
                f"--mesh: {part!r} is not AXIS=SIZE (axes: {', '.join(mesh_lib.MESH_AXES)})"
            )
        axis, size = part.split("=", 1)
        if axis not in out:
            raise config_lib.ConfigError(
                f"--mesh: unknown axis {axis!r} (axes: {', '.join(mesh_lib.MESH_AXES)})"
            )
        try:
            out[axis] = int(size)
        except ValueError:
            raise config_lib.ConfigError(f"--mesh: size of {axis!r} must be an integer, got {size!r}")
        if out[axis] < 1:
            raise config_lib.ConfigError(f"--mesh: size of {axis!r} must be >= 1, got {out[axis]}")
    return out


@dataclasses.dataclass
class ParamRow:
    path: str
    shape: tuple
    dtype: str
    spec: str
    device_bytes: int
    replicated_large: bool


@dataclasses.dataclass
class Plan:
    mesh: dict
    num_devices: int
    attention_backend: str
    num_params: int
    param_bytes: int            # per device, from shard shapes
    opt_bytes: int              # per device, from shard shapes
    batch_bytes: int            # per device
    argument_bytes: int         # XLA: all inputs of the step, per device
    output_bytes: int
    alias_bytes: int            # outputs written in place of donated inputs
    temp_bytes: int             # XLA: activations, gradients, temporaries
    compile_s: float
    flops_per_token: float      # training matmul FLOPs per token (forward + backward, r = crossbatch.range)
    tokens_per_step: int
    params: list
    warnings: list

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs not aliased with (donated) arguments."""
        return self.argument_bytes + self.temp_bytes + max(self.output_bytes - self.alias_bytes, 0)


def _bytes_per_device(x, sharding) -> int:
    return int(np.prod(sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def check_mesh_divides(cfg, mesh) -> None:
    """Every model dimension that the logical rules shard divides over its mesh axes; otherwise
    those parameters would silently stay whole on every chip. The error names both."""
    m = cfg.model
    dims = {"embed": ("model.hidden_size", m.hidden_size),
            "mlp": ("model.intermediate_size", m.intermediate_size),
            "heads": ("model.num_heads", m.num_heads),
            "kv_heads": ("model.num_kv_heads", m.num_kv_heads),
            "vocab": ("model.vocab_size", config_lib.padded_vocab(m))}
    rules = dict(mesh_lib.DEFAULT_RULES)
    for name, (field, size) in dims.items():
        for axis in rules[name]:
            n = mesh.shape.get(axis, 1)
            if n > 1 and size % n:
                what = "padded vocabulary" if name == "vocab" else f"'{name}' dimension"
                raise config_lib.ConfigError(
                    f"config field '{field}': the {what} ({size}) does not divide over mesh axis '{axis}' of "
                    f"size {n}; its parameters would be whole on every chip. Use a mesh whose '{axis}' size "
                    f"divides {size}, or a model dimension that {n} divides")


def _param_rows(abstract_params, mesh):
    """One row per parameter (shape, dtype, spec, bytes per device) and a warning for each large
    parameter that no mesh axis divides."""
    rows, warnings = [], []
    multi = mesh.size > 1
    for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        spec = x.sharding.spec
        large = multi and all(s is None for s in spec) and x.size >= REPLICATED_WARN_ELEMENTS
        rows.append(ParamRow(layout.dotted(p), tuple(x.shape), str(x.dtype), str(tuple(spec)),
                             _bytes_per_device(x, x.sharding), large))
        if large:
            warnings.append(f"parameter {layout.dotted(p)} {tuple(x.shape)} ({x.size / 1e6:.1f}M elements) "
                            f"is replicated on all {mesh.size} devices (no mesh axis divides it)")
    return rows, warnings


def make_plan(cfg, devices=None, platform: str = "tpu") -> Plan:
    """Compiles the train step of `cfg` on `devices` (default: all) with abstract inputs, with the
    attention backend the config would use on `platform` (`auto` on tpu: splash, compiled here in
    Pallas interpret mode, whose buffers are the kernel's blocks as on the chip)."""
    cfg = checks.from_dict(cfg.to_dict(), platform=platform)   # a copy, checked for `platform`
    # the stage with the largest crossbatch attention: (r + 1) contexts of rows x T tokens
    cfg = max((s.cfg for s in config_lib.build_stages(cfg)),
              key=lambda c: ((c.crossbatch.range + 1) * c.data.batch_size * c.data.seq_len,
                             c.data.batch_size))
    cfg.model.attention_backend = kernels.resolve(cfg.model.attention_backend, platform)
    if platform != "cpu" and cfg.model.scan_unroll == 0:
        cfg.model.scan_unroll = 1            # what `auto` means on the pod's chips
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    check_batch_divides(cfg, mesh)
    check_mesh_divides(cfg, mesh)
    with mesh_lib.use_mesh(mesh):
        graphdef, tx, _, abstract, shardings = abstract_train_state(cfg, mesh)
        abstract_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   abstract, shardings)
        b, t = cfg.data.batch_size, cfg.data.seq_len
        dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
                  "segment_ids": jnp.int32}
        batch = {k: jax.ShapeDtypeStruct((b, t), dtypes[k], sharding=s)
                 for k, s in batch_shardings(mesh).items()}
        jitted = jit_train_step(cfg, graphdef, tx, mesh, shardings, cfg.crossbatch.range)
        t0 = time.perf_counter()
        compiled = jitted.lower(abstract_in, batch, jax.ShapeDtypeStruct((), jnp.int32)).compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    rows, warnings = _param_rows(abstract_in["params"], mesh)
    mb_rows = cfg.data.batch_size // cfg.train.microbatches
    dp = mesh_lib.data_parallel_size(mesh)
    if mb_rows % dp:
        warnings.append(
            f"a microbatch of {mb_rows} rows does not divide over the data-parallel size {dp}: chips "
            f"repeat each other's work; use at most {cfg.data.batch_size // dp} microbatches "
            "(train.microbatches, a divisor of it)"
        )
    param_bytes = sum(r.device_bytes for r in rows)
    opt_bytes = sum(_bytes_per_device(x, x.sharding) for x in jax.tree.leaves(abstract_in["opt_state"]))
    batch_bytes = sum(_bytes_per_device(x, x.sharding) for x in batch.values())
    return Plan(
        mesh=dict(mesh.shape), num_devices=mesh.size, attention_backend=cfg.model.attention_backend,
        num_params=sum(int(math.prod(r.shape)) for r in rows), param_bytes=param_bytes, opt_bytes=opt_bytes,
        batch_bytes=batch_bytes, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), compile_s=compile_s,
        flops_per_token=metrics_lib.model_flops_per_token(cfg.model, cfg.data.seq_len, cfg.crossbatch.range),
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len, params=rows, warnings=warnings)


def _gib(x) -> str:
    return f"{x / GiB:8.3f} GiB"


def required_mfu(plan: Plan, tokens_per_s: float, chip: str) -> float:
    """The MFU every chip of the plan's mesh must reach for `tokens_per_s` (global) on `chip`."""
    peak = metrics_lib.chip_peak_flops(chip)
    if peak is None:
        known = ", ".join(k for k, _ in metrics_lib.CHIP_PEAK_BF16)
        raise config_lib.ConfigError(f"--chip: unknown chip {chip!r} (known: {known})")
    return tokens_per_s * plan.flops_per_token / (plan.num_devices * peak)


def format_plan(plan: Plan, name: str, device_memory_gib: float | None = None, all_params: bool = False,
                tokens_per_s: float | None = None, chip: str | None = None) -> str:
    lines = [
        f"plan for {name}: {plan.num_params / 1e6:,.1f}M parameters on mesh {plan.mesh} "
        f"({plan.num_devices} devices), compiled in {plan.compile_s:.0f} s",
        f"attention backend: {plan.attention_backend}",
        "",
        "per device:",
        f"  parameters          {_gib(plan.param_bytes)}",
        f"  optimizer state     {_gib(plan.opt_bytes)}",
        f"  batch               {_gib(plan.batch_bytes)}",
        f"  step arguments      {_gib(plan.argument_bytes)}   (XLA; parameters + optimizer state + batch)",
        f"  temporaries         {_gib(plan.temp_bytes)}   (XLA; activations, gradients, buffers)",
        f"  outputs not aliased {_gib(max(plan.output_bytes - plan.alias_bytes, 0))}"
        "   (the state is donated)",
        f"  peak                {_gib(plan.peak_bytes)}",
    ]
    if device_memory_gib:
        lines.append(f"  device memory       {device_memory_gib:8.3f} GiB: "
                     + ("fits" if plan.peak_bytes <= device_memory_gib * GiB else "DOES NOT FIT"))
    lines += ["", f"step: {plan.tokens_per_step:,} tokens, {plan.flops_per_token / 1e9:,.2f} GFLOP a token "
              f"(training matmuls, forward + backward; remat recomputation not counted)"]
    if tokens_per_s and chip:
        need = required_mfu(plan, tokens_per_s, chip)
        step_s = plan.tokens_per_step / tokens_per_s
        lines.append(
            f"  {tokens_per_s:,.0f} tokens/s on {plan.num_devices} x {chip} ({step_s:.2f} s a step) needs "
            f"MFU {100 * need:.1f}% on every chip" + ("  (more than the chips' peak)" if need > 1 else "")
        )
    lines += [
        "",
        "parameter shardings" + ("" if all_params else " (one row per distinct shape and sharding)") + ":",
    ]
    seen = set()
    width = max(len(r.path) for r in plan.params)
    for r in plan.params:
        key = (r.shape, r.spec, r.path.split(".")[-1])
        if not all_params and key in seen:
            continue
        seen.add(key)
        lines.append(
            f"  {r.path:<{width}}  {str(r.shape):<18} {r.dtype:<9} {r.spec:<28} "
            f"{r.device_bytes / 2**20:10.2f} MiB/device" + ("  REPLICATED" if r.replicated_large else "")
        )
    for w in plan.warnings:
        lines.append("warning: " + w)
    return "\n".join(lines)


def plan_command(config_path: str, overrides=(), *, mesh: str | None = None, devices: int | None = None,
                 platform: str = "tpu", device_memory: float | None = None, all_params: bool = False,
                 tokens_per_s: float | None = None, chip: str | None = None,
                 json_path: str | None = None) -> int:
    """`fot-jax plan`: prints the plan of a config on a simulated mesh (and writes it as JSON to
    `json_path`); exit status 1 when it does not fit in `device_memory` GiB. Must run before JAX
    starts its backends in this process (it sets the number of simulated CPU devices)."""
    cfg = checks.load_config(config_path, overrides, platform=platform)
    if mesh:
        for axis, size in parse_mesh(mesh).items():
            cfg.mesh[axis] = size
    # Per-device memory does not depend on which links an axis crosses: a multi-slice mesh is planned
    # as one slice with the same axis sizes (simulated CPU devices have no slices).
    for a in ("data", "fsdp", "tensor"):
        dcn = cfg.mesh[f"dcn_{a}"]
        if dcn > 1:
            cfg.mesh[a] = -1 if cfg.mesh[a] == -1 else cfg.mesh[a] * dcn
            cfg.mesh[f"dcn_{a}"] = 1
    sizes = [cfg.mesh[a] for a in ("data", "fsdp", "tensor")]
    devices = devices or (0 if -1 in sizes else sizes[0] * sizes[1] * sizes[2])
    if not devices:
        raise config_lib.ConfigError(
            "config field 'mesh' has a -1 axis: give --devices N (the pod's chip count) or a full --mesh"
        )
    simulate_host_devices(devices, replace=True)
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    if len(jax.devices()) < devices:
        raise config_lib.ConfigError(f"the plan needs {devices} devices, JAX already started with "
                                     f"{len(jax.devices())}; run `fot-jax plan` in a fresh process")
    if tokens_per_s and chip and metrics_lib.chip_peak_flops(chip) is None:
        raise config_lib.ConfigError(f"--chip: unknown chip {chip!r} (v4, v5e, v5p, v6e, a100, h100, h200)")
    plan = make_plan(cfg, jax.devices()[:devices], platform=platform)
    print(format_plan(plan, os.path.basename(config_path), device_memory, all_params, tokens_per_s, chip))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dataclasses.asdict(plan) | {"peak_bytes": plan.peak_bytes}, f, indent=1, default=str)
    if device_memory and plan.peak_bytes > device_memory * 2 ** 30:
        print(f"fot-jax plan: {plan.peak_bytes / 2**30:.2f} GiB per device does not fit in "
              f"{device_memory} GiB", file=sys.stderr)
        return 1
    return 0
