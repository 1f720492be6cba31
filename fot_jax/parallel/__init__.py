"""Meshes, shardings and multi-process runs. This module itself imports nothing heavy: what it
holds must run before JAX starts its backends."""
from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_host_devices(xla_flags: str, count: int) -> str:
    """XLA_FLAGS text with the simulated CPU device count set to `count` (other flags kept)."""
    return " ".join([f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
                    + [f"{DEVICE_COUNT_FLAG}={count}"])


def simulate_host_devices(count: int, replace: bool = False) -> None:
    """`count` CPU devices simulated on this host (kept as XLA_FLAGS has it, unless `replace`);
    effective while JAX's backends have not started (accelerators are unaffected)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags and not replace:
        return
    os.environ["XLA_FLAGS"] = with_host_devices(flags, count)
