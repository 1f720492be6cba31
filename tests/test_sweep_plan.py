"""`fot-jax sweep` (ablation points in their own workdirs, skip finished, a failing point reported)
and `fot-jax plan` (compile-time memory and shardings on a simulated pod mesh)."""
import json
import os
import subprocess
import sys

import pytest

from fot_jax import checks, cli
from fot_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The dictionary ablations shrunk to seconds a point: the tiny model, short documents, 3 steps.
TINY = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=2",
        "--config.model.mem_layers=[1]", "--config.model.max_position_embeddings=64",
        "--config.model.last_context_length=64", "--config.data.seq_len=64", "--config.data.doc_length=128",
        "--config.data.query_length=64", "--config.stages=[]", "--config.data.num_train_docs=128",
        "--config.data.num_eval_docs=32", "--config.train.steps=3", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", "--config.train.log_every=1"]


@pytest.mark.slow
def test_sweep_runs_the_d_ablation_and_skips_finished_points(tmp_path, data_dir, capsys):
    work = str(tmp_path / "sweep")
    args = ["sweep", "--config", os.path.join(ROOT, "configs/ablations/crossbatch_d.py"), "--workdir", work,
            *TINY, f"--config.data.data_dir={data_dir}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for d in (1, 2, 4, 8):
        assert f"| d={d} | ok | 3 |" in out
        with open(os.path.join(work, f"d={d}", "summary.json")) as f:
            assert json.load(f)["steps"] == 3
        with open(os.path.join(work, f"d={d}", "checkpoints", "3", "config", "metadata")) as f:
            assert json.load(f)["crossbatch"]["range"] == d
    assert "acc r=31" in out and os.path.exists(os.path.join(work, "sweep.png"))
    rows = json.load(open(os.path.join(work, "sweep.json")))
    assert [r["point"] for r in rows] == ["d=1", "d=2", "d=4", "d=8"]
    # a second run finds every point finished
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("done before (skipped)") == 4


@pytest.mark.slow
def test_a_failing_point_is_reported_and_the_sweep_goes_on(tmp_path, data_dir, capsys):
    cfg = tmp_path / "sweep_cfg.py"
    cfg.write_text(
        "import os\n"
        "from fot_jax.config import load_config\n"
        f"def get_config():\n    return load_config({os.path.join(ROOT, 'configs/tiny.py')!r})\n"
        "def get_sweep():\n"
        "    return [{'name': 'diverges', 'train.learning_rate': 1e30, 'train.grad_clip': 0.0},\n"
        "            {'name': 'fine', 'train.learning_rate': 1e-3}]\n")
    work = str(tmp_path / "w")
    rc = cli.main(["sweep", "--config", str(cfg), "--workdir", work, "--config.train.steps=4",
                   f"--config.data.data_dir={data_dir}"])
    assert rc == 1
    captured = capsys.readouterr()
    # a TrainingError: one line, exit 2
    assert "| diverges | FAILED (exit 2) |" in captured.out and "| fine | ok | 4 |" in captured.out
    assert "1 point(s) failed: diverges" in captured.err
    row = json.load(open(os.path.join(work, "sweep.json")))[0]
    assert "loss is nan" in row["error"] or "loss is inf" in row["error"]


def test_sweep_declarations_are_checked(tmp_path):
    from fot_jax.sweep import sweep_points
    bad = tmp_path / "bad.py"
    bad.write_text("from fot_jax.config import base_config\ndef get_config():\n    return base_config()\n")
    with pytest.raises(config_lib.ConfigError, match="declares no sweep"):
        sweep_points(str(bad))
    bad.write_text(bad.read_text() + "def get_sweep():\n    return [{'model.hidden_sise': 3}]\n")
    with pytest.raises(config_lib.ConfigError, match="model.hidden_sise|hidden_sise"):
        sweep_points(str(bad))
    bad.write_text(bad.read_text().replace("[{'model.hidden_sise': 3}]", "{'product': {'train.seed': [0, 1], "
                                            "'crossbatch.range': [0, 1]}}"))
    names = [p["name"] for p in sweep_points(str(bad))]
    assert names == ["seed=0_range=0", "seed=0_range=1", "seed=1_range=0", "seed=1_range=1"]
    for name in ("positionals", "gating", "crossbatch_d"):
        assert len(sweep_points(os.path.join(ROOT, f"configs/ablations/{name}.py"))) >= 2


def _plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    res = subprocess.run(
        [sys.executable, "-m", "fot_jax.cli", "plan", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    return res, (json.load(open(out)) if out.exists() else None)


@pytest.mark.slow
def test_plan_matches_the_arithmetic_on_a_32_device_fsdp_mesh(tmp_path):
    """A 3B-shaped model shrunk in depth and batch (the compile is what costs; parameter memory per
    layer is the 3B's): parameters + Adam state per device = parameter count x 4 B x 3 / 32."""
    res, plan = _plan(
        tmp_path,
        "--config",
        os.path.join(ROOT, "configs/longllama_3b.py"),
        "--mesh",
        "fsdp=32",
        "--config.model.num_layers=2",
        "--config.model.mem_layers=[1]",
        "--config.data.batch_size=32",
        "--config.data.seq_len=256",
        "--config.model.max_position_embeddings=256",
        "--config.data.doc_length=1024",
        "--tokens-per-s",
        "1000",
        "--chip",
        "v5e",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attention backend: splash" in res.stdout      # the plan is for TPU: auto means splash there
    n = plan["num_params"]
    cfg = checks.load_config(
        os.path.join(ROOT, "configs/longllama_3b.py"),
        ["--config.model.num_layers=2", "--config.model.mem_layers=[1]"],
    )
    m = cfg.model
    expect_n = (
        2 * config_lib.padded_vocab(m) * m.hidden_size
        + m.hidden_size
        + m.num_layers * (4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size)
    )
    assert n == expect_n
    arithmetic = n * 4 * 3 / 32                                   # f32 params + Adam mu, nu over 32 chips
    assert abs(plan["param_bytes"] + plan["opt_bytes"] - arithmetic) / arithmetic < 0.05
    # XLA's own count of the step's arguments: the state plus the batch
    assert abs(plan["argument_bytes"] - (arithmetic + plan["batch_bytes"])) / arithmetic < 0.05
    assert plan["temp_bytes"] > 0 and plan["mesh"] == {"data": 1, "fsdp": 32, "tensor": 1}
    assert "parameter shardings" in res.stdout and "('fsdp'" in res.stdout
    # FLOPs a token: 6 x (matmul weights) + attention over T keys (4T for the memory layer at r = 3),
    # x 3 for forward + backward; the MFU the throughput target needs on 32 v5e chips (197 TFLOP/s).
    e, t, h, d = m.hidden_size, 256, m.num_heads, m.hidden_size // m.num_heads
    weights = 2 * (4 * e * e + 3 * e * m.intermediate_size) + config_lib.padded_vocab(m) * e
    flops = 3 * (2 * weights + 4 * h * d * t * (1 + 4))
    assert plan["flops_per_token"] == pytest.approx(flops, rel=1e-9)
    assert f"needs MFU {100 * 1000 * flops / (32 * 197e12):.1f}%" in res.stdout


@pytest.mark.slow
def test_shipped_3b_plan_fits_16_gib_chips(tmp_path):
    """The shipped 3B config on 32 chips (v4-32 / v5e-32 shape): splash attention, scanned layers,
    full remat and 8 microbatches keep a chip under 14 GiB."""
    res, plan = _plan(
        tmp_path,
        "--config",
        os.path.join(ROOT, "configs/longllama_3b.py"),
        "--mesh",
        "fsdp=32",
        "--device-memory",
        "16",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert plan["peak_bytes"] <= 14 * 2 ** 30, plan["peak_bytes"] / 2 ** 30


def test_plan_refuses_a_mesh_that_does_not_divide_the_model(tmp_path):
    # a hidden size that 8 does not divide: fsdp could not shard the big matrices
    res, plan = _plan(tmp_path, "--config", os.path.join(ROOT, "configs/tiny.py"), "--mesh", "fsdp=8",
                      "--config.model.hidden_size=1036", "--config.model.num_heads=2",
                      "--config.model.num_kv_heads=2", "--config.model.intermediate_size=1032",
                      "--config.model.vocab_size=1000", "--config.model.vocab_multiple=8")
    assert res.returncode == 2 and plan is None, res.stderr[-3000:]
    assert "'model.hidden_size'" in res.stderr and "(1036)" in res.stderr and "'fsdp' of size 8" in res.stderr
    res, _ = _plan(tmp_path, "--config", os.path.join(ROOT, "configs/tiny.py"), "--mesh", "tensor=8",
                   "--config.model.num_kv_heads=4", "--config.model.num_heads=4")
    assert res.returncode == 2 and "'model.num_heads'" in res.stderr and "'tensor' of size 8" in res.stderr


def test_plan_memory_that_does_not_fit_exits_1(tmp_path):
    res, plan = _plan(tmp_path, "--config", os.path.join(ROOT, "configs/tiny.py"), "--mesh", "fsdp=8",
                      "--device-memory", "0.001")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "does not fit in 0.001 GiB" in res.stderr and "DOES NOT FIT" in res.stdout
    assert plan["peak_bytes"] > 0.001 * 2 ** 30


def test_plan_bad_mesh():
    from fot_jax.plan import parse_mesh
    assert parse_mesh("fsdp=32") == {"data": 1, "fsdp": 32, "tensor": 1}
    for bad, msg in (
        ("fsdp", "AXIS=SIZE"),
        ("pipe=2", "unknown axis"),
        ("fsdp=x", "integer"),
        ("data=0", ">= 1"),
    ):
        with pytest.raises(config_lib.ConfigError, match=msg):
            parse_mesh(bad)
