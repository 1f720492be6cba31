"""Meshes, shardings and multi-process runs. This module itself imports nothing heavy: what it
holds must run before JAX starts its backends."""
from __future__ import annotations

import os


def simulate_host_devices(count: int, replace: bool = False) -> None:
    """`count` CPU devices simulated on this host (kept as XLA_FLAGS has it, unless `replace`);
    effective while JAX's backends have not started (accelerators are unaffected)."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(f.startswith(flag) for f in flags) and not replace:
        return
    os.environ["XLA_FLAGS"] = " ".join([f for f in flags if not f.startswith(flag)] + [f"{flag}={count}"])
