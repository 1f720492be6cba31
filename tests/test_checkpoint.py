"""Checkpoints: exact resume (data and range sampling included), restore onto another mesh, a process
killed mid-save, SIGTERM, keep-best, and the errors for corrupt checkpoints and config changes."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fot_jax import checks
from fot_jax.checkpoint import CheckpointError, Checkpoints, load_model
from fot_jax.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def tiny(*overrides):
    # one eval range and batch: these tests are about checkpoints, and each eval program costs a compile
    return checks.load_config(
        TINY, ["--config.crossbatch.eval_ranges=[1]", "--config.train.eval_batches=1", *overrides]
    )


def _train_losses(workdir):
    return [
        (json.loads(l)["step"], json.loads(l)["loss"])
        for l in open(os.path.join(workdir, "metrics.jsonl"))
        if json.loads(l)["split"] == "train"
    ]


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


RESUME = ("--config.train.steps=8", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
          "--config.crossbatch.sample_range=true", "--config.crossbatch.range=3",
          "--config.train.eval_every=0")


def test_resume_is_bit_exact(tmp_path, data_dir):
    """8 steps straight == 4 steps + stop + restore + 4 steps: losses, params and optimizer state
    bit for bit (data position and per-step range draws included)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = Trainer(tiny(*RESUME), a, quiet=True)
    full.run()
    first = Trainer(tiny(*RESUME), b, quiet=True)
    out = first.run(until=4)
    assert out["steps"] == 4 and not out["preempted"]
    second = Trainer(tiny(*RESUME), b, quiet=True)
    second.run()
    la, lb = _train_losses(a), _train_losses(b)
    assert [s for s, _ in la] == list(range(1, 9)) and [s for s, _ in lb] == list(range(1, 9))
    assert [l for _, l in la] == [l for _, l in lb]
    ra = [json.loads(l)["range"] for l in open(os.path.join(a, "metrics.jsonl")) if '"train"' in l]
    assert len(set(ra)) > 1  # the sampled ranges really vary
    for x, y in zip(_host(full.state), _host(second.state)):
        np.testing.assert_array_equal(x, y)


def test_restore_onto_another_mesh(tmp_path, data_dir):
    wd = str(tmp_path)
    src = Trainer(tiny("--config.train.steps=2", "--config.mesh.data=8"), wd, quiet=True)
    src.run()
    saved = _host(src.state)
    dst = Trainer(tiny("--config.train.steps=2", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                       "--config.mesh.tensor=2"), wd, quiet=True)
    state, data = dst.checkpoints.restore(dst.state, dst.state_shardings)
    q = state["params"]["stacks"][0]["layer"]["self_attn"]["q_proj"][...]     # [layers, E, H, D]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    for x, y in zip(saved, _host(state)):
        np.testing.assert_array_equal(x, y)
    assert data["stage"] == 0 and "batcher" in data


@pytest.mark.parametrize("saved_scanned", [True, False])
def test_scanned_and_unrolled_runs_share_checkpoints(tmp_path, data_dir, saved_scanned):
    """Scanning changes how the layers run, not how parameters are stored: a checkpoint written by
    a scanned run restores into an unrolled one and the reverse, bit for bit."""
    wd = str(tmp_path)
    over = ["--config.train.steps=2", "--config.model.num_layers=4", "--config.model.mem_layers=[3]"]
    src = Trainer(tiny(*over, f"--config.model.scan_layers={saved_scanned}"), wd, quiet=True)
    src.run()
    dst = Trainer(tiny(*over, f"--config.model.scan_layers={not saved_scanned}"), wd, quiet=True)
    state, _ = dst.checkpoints.restore(dst.state, dst.state_shardings)
    for x, y in zip(_host(src.state), _host(state)):
        np.testing.assert_array_equal(x, y)


def test_model_config_change_is_refused_with_the_fields(tmp_path, data_dir):
    wd = str(tmp_path)
    Trainer(tiny("--config.train.steps=1"), wd, quiet=True).run()
    with pytest.raises(
        CheckpointError, match=r"model.hidden_size: checkpoint 32, run 64.*model.intermediate_size"
    ):
        Trainer(tiny("--config.train.steps=2", "--config.model.hidden_size=64",
                     "--config.model.intermediate_size=128"), wd, quiet=True).run()
    # inference-only fields and training settings may change on resume
    out = Trainer(tiny("--config.train.steps=2", "--config.model.last_context_length=32",
                       "--config.train.learning_rate=0.01"), wd, quiet=True).run()
    assert out["steps"] == 2


def test_a_field_added_to_the_schema_reads_as_its_default_on_resume():
    from fot_jax.checkpoint import _check_model_config
    cfg = tiny()
    stored = json.loads(cfg.to_json())
    del stored["model"]["trained_context"]  # a checkpoint written before the field existed
    _check_model_config(stored, cfg, "old")
    with pytest.raises(CheckpointError, match=r"model.trained_context: checkpoint 0, run 512"):
        _check_model_config(stored, tiny("--config.model.trained_context=512"), "old")


def _listing(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = open(p, "rb").read()
    return out


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, data_dir):
    wd = str(tmp_path)
    Trainer(tiny("--config.train.steps=1"), wd, quiet=True).run()
    step_dir = tmp_path / "checkpoints" / "1" / "state"
    data_files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    saved = {p: p.read_bytes() for p in data_files}
    for p in data_files:  # a missing file (a lost shard of the array data)
        p.unlink()
    before = _listing(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="(?s)checkpoint step 1 .* cannot be restored.*corrupt"):
        Trainer(tiny("--config.train.steps=2"), wd, quiet=True).run()
    assert _listing(tmp_path / "checkpoints") == before  # nothing on disk was touched
    for p, data in saved.items():  # damaged (truncated) files
        p.write_bytes(data[: len(data) // 3])
    before = _listing(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="(?s)checkpoint step 1 .* cannot be restored.*corrupt"):
        Trainer(tiny("--config.train.steps=2"), wd, quiet=True).run()
    assert _listing(tmp_path / "checkpoints") == before
    with pytest.raises(CheckpointError, match="step 7 not found"):
        Trainer(tiny("--config.train.steps=2", "--config.train.resume_step=7"), wd, quiet=True).run()
    with pytest.raises(CheckpointError, match="cannot be restored"):
        load_model(wd)


def test_keep_best_by_eval_accuracy(tmp_path, data_dir):
    wd = str(tmp_path)
    cfg = tiny(
        "--config.train.steps=6",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_best=accuracy",
        "--config.train.checkpoint_keep=1",
        "--config.train.learning_rate=0.01",
    )
    Trainer(cfg, wd, quiet=True).run()
    evals = [
        (json.loads(l)["step"], json.loads(l)["accuracy"])
        for l in open(os.path.join(wd, "metrics.jsonl"))
        if json.loads(l)["split"] == "eval_r1"
    ]
    best_step = max(evals, key=lambda e: (e[1], -e[0]))[0]
    assert sorted(int(p) for p in os.listdir(os.path.join(wd, "best")) if p.isdigit()) == [best_step]
    assert sorted(int(p) for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit()) == [6]
    _, model = load_model(wd, best=True)
    assert model is not None


KILL_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # as in the test process
from fot_jax import checks
from fot_jax.train.loop import Trainer
cfg = checks.load_config(sys.argv[1], ["--config.crossbatch.eval_ranges=[1]",
                             "--config.train.eval_batches=1"] + sys.argv[3:])
summary = Trainer(cfg, sys.argv[2], quiet=True).run()
print("SUMMARY", summary.get("steps"), summary.get("preempted"), flush=True)
"""

BIG = ("--config.model.hidden_size=128", "--config.model.intermediate_size=512",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_keep=2")


def _spawn(tmp_path, wd, *overrides):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(script), TINY, wd, *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_during_async_save_loses_nothing(tmp_path, data_dir):
    """A real process is killed with SIGKILL while an asynchronous save is in flight (its temporary
    directory exists). The next start ignores the partial step, restores the last complete one and
    finishes with exactly the parameters of an uninterrupted run."""
    wd = str(tmp_path / "killed")
    over = BIG + ("--config.train.steps=8", "--config.train.checkpoint_every=1")
    proc = _spawn(tmp_path, wd, *over)
    ckdir = os.path.join(wd, "checkpoints")
    partial = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckdir):
            tmp = [n for n in os.listdir(ckdir) if "tmp" in n]
            done = [n for n in os.listdir(ckdir) if n.isdigit()]
            if tmp and done:
                partial = tmp[0]
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert partial is not None, "never caught a save in flight: " + (
        proc.stdout.read() if proc.stdout else ""
    )
    assert proc.returncode == -signal.SIGKILL
    partial_step = int(partial.split(".")[0])
    cfg = tiny(*over)
    ck = Checkpoints(wd, cfg)
    complete = sorted(ck.manager.all_steps())
    ck.close()
    assert complete and partial_step not in complete and max(complete) < cfg.train.steps
    resumed = Trainer(cfg, wd, quiet=True)
    resumed.run()
    straight = Trainer(cfg, str(tmp_path / "straight"), quiet=True)
    straight.run()
    for x, y in zip(_host(straight.state), _host(resumed.state)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_dir):
    wd = str(tmp_path / "term")
    over = BIG + ("--config.train.steps=400",)
    proc = _spawn(tmp_path, wd, *over)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    line = [l for l in out.splitlines() if l.startswith("SUMMARY")][0]
    _, steps, preempted = line.split()
    assert preempted == "True" and 0 < int(steps) < 400
    ck = Checkpoints(wd, tiny(*over))
    assert ck.manager.latest_step() == int(steps)
    ck.close()


def test_checkpoint_with_layers_stored_one_by_one_loads_into_stacked_runs(tmp_path):
    """tests/data/per_layer_checkpoint was written by the code that stored each layer on its own
    (`params.layers.{i}`, commit 2d764f0: 4 layers, memory layer 2 with q/k normalisation,
    layers 2-3 trainable), with the logits that code gave for fixed tokens. It loads into the
    stacked runs of today's model, split as its config says or as an override says, with the
    same logits; a config that needs parameters the checkpoint lacks names the first of them."""
    import shutil

    import jax.numpy as jnp

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "per_layer_checkpoint")
    work = tmp_path / "old"
    shutil.copytree(src, work)
    expected = np.load(work / "logits.npy")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 12)), jnp.int32)
    _, model = load_model(str(work))
    assert model.run_counts == (2, 1, 1)         # layers 0-1 (frozen), 2 (memory), 3
    np.testing.assert_allclose(np.asarray(model(tokens).logits[..., :200]), expected, atol=1e-5)
    _, model = load_model(str(work), overrides=["--config.train.trainable=['^layers\\\\.1\\\\.']"])
    assert model.run_counts == (1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(model(tokens).logits[..., :200]), expected, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"no parameter layers\.1\.self_attn\.qk_temperature"):
        load_model(str(work), overrides=["--config.model.mem_layers=[1,2]"])


def test_train_state_with_layers_stored_one_by_one_resumes_into_stacked_runs(tmp_path, data_dir):
    """tests/data/per_layer_train_state: step 4 of a run of the code that stored each layer on its
    own (commit 2d764f0: 4 layers, memory layer 2, layers 0-2 trained, so its optimizer moments
    are per layer and masked), with the losses of steps 5-8 and the parameters at step 8 that the
    same code gave when it went on. Today's trainer resumes it into stacked runs (parameters and
    Adam moments regrouped) and trains steps 5-8 to the same losses and parameters. Resuming
    with layers trained that the checkpoint's run froze names the missing optimizer state."""
    import shutil

    src = os.path.join(ROOT, "tests", "data", "per_layer_train_state")
    expected = json.load(open(os.path.join(src, "expected.json")))
    wd = tmp_path / "old"
    shutil.copytree(os.path.join(src, "checkpoints"), wd / "checkpoints")
    over = expected["overrides"]          # on the 8 test devices (the fixture ran on 1)
    trainer = Trainer(checks.load_config(TINY, over), str(wd), quiet=True)
    from fot_jax.model import layout
    # layers 0-1 (trained), 2 (memory), 3 (frozen)
    assert layout.run_counts(trainer.state["params"]) == (2, 1, 1)
    out = trainer.run()
    assert out["steps"] == 8
    losses = dict(_train_losses(str(wd)))
    assert sorted(losses) == [5, 6, 7, 8]
    np.testing.assert_allclose([losses[s] for s in range(5, 9)],
                               [expected["losses"][str(s)] for s in range(5, 9)], rtol=1e-5)
    final = np.load(os.path.join(src, "params_step8.npz"))      # per-layer dotted names
    mine = layout.unstack_flat({layout.dotted(p): np.asarray(x) for p, x in
                                jax.tree_util.tree_flatten_with_path(jax.device_get(trainer.state["params"]))[0]})
    assert sorted(mine) == sorted(final.files)
    for name in final.files:
        value = final[name]
        np.testing.assert_allclose(mine[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    again = tmp_path / "again"
    shutil.copytree(os.path.join(src, "checkpoints"), again / "checkpoints")
    wider = [*over, "--config.train.trainable=['^layers\\\\.[0-3]\\\\.']"]
    with pytest.raises(CheckpointError, match=r"no parameter opt_state\..*mu\.layers\.3\..*train\.trainable"):
        Trainer(checks.load_config(TINY, wider), str(again), quiet=True).run()
