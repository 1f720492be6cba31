"""Sweeps: a config file that also defines `get_sweep()` declares its ablation points.

`get_sweep()` returns either a list of points, each a dict of overrides with an optional "name":

    [{"name": "as_first", "model.mem_positionals": "as_first"}, {"name": "none", ...}]

or {"product": {field: [values], ...}} for the cartesian product of the listed values. `fot-jax
sweep --config F --workdir W` runs each point as its own `fot-jax train` process in `W/<point>`
(one after another; `--launcher "CMD"` prefixes each point's command, e.g. a pod launch), skips
points whose workdir already holds a finished run (`summary.json`), goes on when a point fails
(and reports it), and writes `W/sweep.md`, `W/sweep.json` and a plot `W/sweep.png` of the final
held-out metrics of every point.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from fot_jax import checks
from fot_jax import config as config_lib


def _value_text(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _short(field: str) -> str:
    return field.split(".")[-1]


def sweep_points(path: str) -> list[dict]:
    """[{"name": str, "overrides": {field: value}}] from the config file's get_sweep()."""
    module = config_lib.load_module(path)
    if not hasattr(module, "get_sweep"):
        raise config_lib.ConfigError(f"{path} declares no sweep: add a get_sweep() that returns a list of "
                                     "override dicts or {'product': {field: [values]}}")
    spec = module.get_sweep()
    if isinstance(spec, dict) and set(spec) == {"product"}:
        fields = list(spec["product"])
        values = [list(spec["product"][f]) for f in fields]
        if not fields or any(not v for v in values):
            raise config_lib.ConfigError(f"{path}: get_sweep()['product'] needs at least one value per field")
        raw = [dict(zip(fields, combo)) for combo in itertools.product(*values)]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(p, dict) for p in spec):
        raw = [dict(p) for p in spec]
    else:
        raise config_lib.ConfigError(f"{path}: get_sweep() must return a non-empty list of dicts or "
                                     "{'product': {field: [values]}}")
    points, names = [], set()
    for p in raw:
        name = p.pop("name", None) or "_".join(f"{_short(k)}={_value_text(v)}" for k, v in p.items())
        name = "".join(c if c.isalnum() or c in "=-_.," else "_" for c in name)
        if name in names:
            raise config_lib.ConfigError(f"{path}: two sweep points are both named {name!r}")
        names.add(name)
        points.append({"name": name, "overrides": p})
    # Every point must be a valid config before any of them runs.
    for point in points:
        try:
            checks.load_config(path, override_args(point["overrides"]))
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"sweep point {point['name']!r}: {e}") from None
    return points


def override_args(overrides: dict) -> list[str]:
    return [f"--config.{k}={_value_text(v)}" for k, v in overrides.items()]


def run_sweep(path: str, workdir: str, extra_overrides=(), launcher: str = "", log=print,
              python: str | None = None) -> list[dict]:
    """Runs every point (see module doc); returns one result row per point."""
    points = sweep_points(path)
    os.makedirs(workdir, exist_ok=True)
    results = []
    for i, point in enumerate(points):
        point_dir = os.path.join(workdir, point["name"])
        summary_path = os.path.join(point_dir, "summary.json")
        row = {"point": point["name"], "overrides": point["overrides"], "workdir": point_dir}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                row.update(status="done before (skipped)", summary=json.load(f))
            log(f"sweep [{i + 1}/{len(points)}] {point['name']}: finished before, skipped")
            results.append(row)
            continue
        cmd = [
            python or sys.executable,
            "-m",
            "fot_jax.cli",
            "train",
            "--config",
            path,
            "--workdir",
            point_dir,
            *override_args(point["overrides"]),
            *extra_overrides,
        ]
        if launcher:  # e.g. "python launch/tpu.py run --tpu NAME --": the same command on every worker
            cmd = shlex.split(launcher) + ["fot-jax"] + cmd[3:]
        log(f"sweep [{i + 1}/{len(points)}] {point['name']}: " + " ".join(shlex.quote(c) for c in cmd))
        os.makedirs(point_dir, exist_ok=True)
        t0 = time.perf_counter()
        with open(os.path.join(point_dir, "train.log"), "a") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
        row["seconds"] = time.perf_counter() - t0
        if rc == 0 and os.path.exists(summary_path):
            with open(summary_path) as f:
                row.update(status="ok", summary=json.load(f))
            log(f"sweep [{i + 1}/{len(points)}] {point['name']}: done in {row['seconds']:.0f} s")
        else:
            tail = ""
            try:
                with open(os.path.join(point_dir, "train.log")) as f:
                    tail = f.read()[-600:].strip().splitlines()[-1]
            except (OSError, IndexError):
                pass
            row.update(status=f"FAILED (exit {rc})", error=tail)
            log(f"sweep [{i + 1}/{len(points)}] {point['name']}: FAILED (exit {rc}): {tail}; going on")
        results.append(row)
    write_summary(results, workdir, os.path.basename(path))
    return results


def _metrics(row) -> dict:
    """{"acc r=R": x, "loss r=R": y} of a finished point's final evaluation."""
    out = {}
    for r, v in sorted((row.get("summary") or {}).get("eval", {}).items(), key=lambda kv: int(kv[0])):
        out[f"acc r={r}"] = v["accuracy"]
        out[f"loss r={r}"] = v["loss"]
    return out


def write_summary(results: list[dict], workdir: str, title: str) -> str:
    columns = []
    for row in results:
        for k in _metrics(row):
            if k not in columns:
                columns.append(k)
    columns.sort(key=lambda c: (c.split()[0] != "acc", int(c.split("=")[1]) if "=" in c else 0))
    lines = [f"# Sweep {title}", "", "| point | status | steps | " + " | ".join(columns) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in results:
        m = _metrics(row)
        steps = (row.get("summary") or {}).get("steps", "")
        cells = [f"{m[c]:.4f}" if c in m else "" for c in columns]
        lines.append(f"| {row['point']} | {row['status']} | {steps} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot(results, columns, os.path.join(workdir, "sweep.png"), title)
    return table


def _plot(results, columns, path, title):
    acc_cols = [c for c in columns if c.startswith("acc")]
    if not acc_cols:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(results)), 3.8))
    width = 0.8 / len(acc_cols)
    xs = np.arange(len(results))
    for j, c in enumerate(acc_cols):
        vals = [_metrics(r).get(c, np.nan) for r in results]
        ax.bar(xs + j * width - 0.4 + width / 2, vals, width, label=f"held-out {c.replace('acc ', '')}")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["point"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_command(path: str, workdir: str, overrides=(), launcher: str = "", list_only: bool = False) -> int:
    """`fot-jax sweep`: lists the points, or runs them and prints the summary table; exit status 1
    when a point failed (its train.log says why)."""
    if list_only:
        for p in sweep_points(path):
            print(p["name"], json.dumps(p["overrides"]))
        return 0
    results = run_sweep(path, workdir, overrides, launcher=launcher or "")
    with open(os.path.join(workdir, "sweep.md")) as f:
        print(f.read())
    failed = [r["point"] for r in results if r["status"].startswith("FAILED")]
    if failed:
        print(f"fot-jax sweep: {len(failed)} point(s) failed: {', '.join(failed)} (see <point>/train.log)",
              file=sys.stderr)
        return 1
    return 0
