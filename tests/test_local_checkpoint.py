"""Local (emergency) checkpoints: a crashed run resumes from the newest local step every host
holds, skipping corrupt and half-written steps; hosts that disagree use their newest common step; a
local checkpoint never restores onto another topology; bad settings are refused before step 0."""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

from fot_jax import checks, local_checkpoint
from fot_jax import config as config_lib
from fot_jax.parallel.local_pod import run_pod
from fot_jax.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# a constant learning rate after warmup: a resumed run follows the uninterrupted one step for step
COMMON = ["--config.train.schedule=constant", "--config.train.warmup_steps=3", "--config.train.log_every=1",
          "--config.train.learning_rate=3e-3", "--config.crossbatch.eval_ranges=[1]"]


def _losses(workdir, every=False):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    return rows if every else dict(rows)


def _cfg(data_dir, steps, *extra):
    return checks.load_config(TINY, COMMON + [f"--config.train.steps={steps}",
                                                  f"--config.data.data_dir={data_dir}", *extra])


def _local(base, every=2):
    return [f"--config.train.local_checkpoint_dir={base}", f"--config.train.local_checkpoint_every={every}"]


class Crash(RuntimeError):
    pass


def _crash_after(step):
    def hook(record):
        if record.step == step:
            raise Crash(f"crash after step {step}")
    return hook


def test_a_crashed_run_resumes_from_its_newest_readable_local_step(tmp_path, data_dir, capfd):
    ref = str(tmp_path / "ref")
    Trainer(_cfg(data_dir, 8), ref, quiet=True).run()
    base, wd = str(tmp_path / "local"), str(tmp_path / "w")
    cfg = _cfg(data_dir, 8, *_local(base))
    trainer = Trainer(cfg, wd, quiet=True)
    trainer.add_hook(_crash_after(5))
    with pytest.raises(Crash):
        trainer.run()                       # no persistent checkpoint: checkpoint_every = 0
    trainer.checkpoints.wait()              # the saves of steps 2 and 4 had long finished
    here = local_checkpoint.run_directory(base, wd)
    assert sorted(os.listdir(here)) == ["2", "4"]
    assert not os.path.isdir(os.path.join(wd, "checkpoints", "4"))

    resumed = Trainer(cfg, wd, quiet=True)
    steps = []
    resumed.add_hook(lambda r: steps.append(r.step))
    assert resumed.run()["steps"] == 8 and steps == [5, 6, 7, 8]      # from local step 4
    assert "resuming from the local checkpoint at step 4" in capfd.readouterr().out
    assert _losses(wd) == _losses(ref)                                  # exactly the same run

    # The resumed run saved local step 6 and its final persistent step 8. Without the persistent
    # step, with local step 6 corrupt and a half-written step 8 beside it, the run resumes from 4.
    shutil.rmtree(os.path.join(wd, "checkpoints"))
    assert sorted(os.listdir(here)) == ["4", "6"]
    with open(os.path.join(here, "6", "meta", "metadata"), "w") as f:
        f.write("{not json")
    os.makedirs(os.path.join(here, "8.orbax-checkpoint-tmp", "state"))
    with open(os.path.join(here, "8.orbax-checkpoint-tmp", "state", "_METADATA"), "w") as f:
        f.write("{}")
    capfd.readouterr()
    again = Trainer(cfg, wd, quiet=True)
    steps = []
    again.add_hook(lambda r: steps.append(r.step))
    again.run()
    out, err = capfd.readouterr()
    assert steps == [5, 6, 7, 8], out + err
    assert "local checkpoint step 6" in err and "unreadable" in err
    assert "resuming from the local checkpoint at step 4" in out
    assert not os.path.exists(os.path.join(here, "8.orbax-checkpoint-tmp"))   # cleaned, never read
    losses = _losses(wd, every=True)
    assert all(loss == _losses(ref)[step] for step, loss in losses)


def test_local_checkpoint_settings_and_disks_are_checked_before_step_0(tmp_path, data_dir, monkeypatch):
    for extra, field in [
        (["--config.train.local_checkpoint_dir=/tmp/x"], "train.local_checkpoint_dir"),
        (["--config.train.local_checkpoint_every=5"], "train.local_checkpoint_every"),
        (_local("gs://bucket/local"), "train.local_checkpoint_dir"),
        (["--config.train.local_checkpoint_dir=/tmp/x", "--config.train.local_checkpoint_minutes=-1"],
         "train.local_checkpoint_minutes"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=field):
            checks.validate(_cfg(data_dir, 4, *extra))
    # a directory that cannot be created (a file is in the way)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    wd = str(tmp_path / "w")
    with pytest.raises(local_checkpoint.LocalCheckpointError, match="is not writable"):
        Trainer(_cfg(data_dir, 4, *_local(str(blocker / "local"))), wd, quiet=True)
    # a disk without room for one save: the size needed is named
    monkeypatch.setattr(local_checkpoint.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(local_checkpoint.LocalCheckpointError,
                       match=r"has 0\.0 MB free, one local save .* needs 0\.\d MB"):
        Trainer(_cfg(data_dir, 4, *_local(str(tmp_path / "local"))), wd, quiet=True)
    assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))       # refused before step 0


def test_a_checkpoint_resumes_on_fewer_devices_or_refuses_in_one_line(tmp_path, data_dir):
    """The same global batch on half the devices (two rows each instead of one): the same steps.
    On 6 devices the batch of 8 cannot be split: one line naming why, before anything runs."""
    import jax
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "w")
    Trainer(_cfg(data_dir, 6), ref, quiet=True).run()
    Trainer(_cfg(data_dir, 3), wd, quiet=True).run()                    # 8 devices, steps 1-3
    Trainer(_cfg(data_dir, 6), wd, devices=jax.devices()[:4], quiet=True).run()   # 4 devices, 4-6
    np.testing.assert_allclose([_losses(wd)[s] for s in range(1, 7)], [_losses(ref)[s] for s in range(1, 7)],
                               rtol=2e-6)
    message = r"8 rows do not divide over the mesh's data-parallel size 6 .* on 6 devices\). A run keeps"
    with pytest.raises(config_lib.ConfigError, match=message):
        Trainer(_cfg(data_dir, 8), wd, devices=jax.devices()[:6], quiet=True)


def _fot_jax(*args):
    return [sys.executable, "-m", "fot_jax.cli", *args]


def _pod(workdir, data_dir, steps, *extra, processes=2, devices=4, **kw):
    sink = io.StringIO()
    codes = run_pod(_fot_jax("train", "--config", TINY, "--workdir", workdir, *COMMON,
                             f"--config.train.steps={steps}", f"--config.data.data_dir={data_dir}",
                             "--heartbeat-timeout", "10", *extra),
                    processes, devices, sink=sink, timeout=500, **kw)
    return codes, sink.getvalue()


@pytest.mark.slow
def test_a_pod_killed_mid_run_restarts_from_the_newest_common_local_step(tmp_path, data_dir):
    """SIGKILL (not SIGTERM) of one process; hosts that disagree about their newest local step;
    the launcher's restart policy; then the same run on half the hosts (a new topology: local
    checkpoints are skipped, the persistent one restores onto 1 process)."""
    ref = str(tmp_path / "ref")
    Trainer(_cfg(data_dir, 16), ref, quiet=True).run()        # 1 process x 8 devices
    ref = _losses(ref)
    base, wd = str(tmp_path / "local"), str(tmp_path / "w")
    # 1. process 1 is SIGKILLed once step 7 is logged; no restart: the pod goes down
    codes, log = _pod(wd, data_dir, 12, *_local(base), kill_on=(1, "[p0] step      7"), grace=60)
    assert codes[1] == -9 and codes[0] != 0, log[-3000:]
    p0, p1 = (local_checkpoint.run_directory(base, wd, i) for i in (0, 1))
    assert sorted(os.listdir(p0)) == sorted(os.listdir(p1)) == ["4", "6"], log[-3000:]
    # host 1 lost its newest step (its save had not finished): the hosts disagree
    shutil.rmtree(os.path.join(p1, "6"))
    # 2. the pod again, with a restart policy; process 1 is killed again once step 9 is logged
    codes, log = _pod(wd, data_dir, 12, *_local(base), kill_on=(1, "[p0] step      9"), max_restarts=1)
    assert codes == [0, 0], log[-3000:]
    assert ("hosts hold different newest local checkpoints (process 0: step 6, process 1: step 4); "
            "using step 4") in log, log[-3000:]
    first, second = log.split("restarting the pod (restart 1 of 1)")
    assert "resuming from the local checkpoint at step 4" in first
    assert "local_pod: process 1 exited with -9" in first
    # the restart resumes within the local interval (2 steps) of the last step logged before the kill
    killed_at = max(int(line.split()[2].split("/")[0]) for line in first.splitlines()
                    if line.startswith("[p0] step "))
    resumed_at = int(second.split("resuming from the local checkpoint at step ")[1].split()[0])
    assert killed_at - resumed_at <= 2 and resumed_at >= 8, (killed_at, resumed_at)
    # every step logged, before and after each kill, equals the uninterrupted run's
    for step, loss in _losses(wd, every=True):
        np.testing.assert_allclose(loss, ref[step], rtol=2e-6, err_msg=f"step {step}")
    assert sorted(_losses(wd)) == list(range(1, 13))
    # 3. two more steps on 1 process x 4 devices: the local steps (written by 2 processes) are
    # skipped, the persistent step 12 restores onto the new mesh, with the same global batch
    codes, log = _pod(wd, data_dir, 14, *_local(base), processes=1, devices=4)
    assert codes == [0], log[-3000:]
    assert "written on another topology" in log and "resuming from the local checkpoint" not in log
    assert "steps 12->14" in log
    # 4. and back to 2 processes x 4 devices for two more: 1 -> 2 hosts
    codes, log = _pod(wd, data_dir, 16, *_local(base))
    assert codes == [0, 0] and "steps 14->16" in log, log[-3000:]
    # the same global batch on every topology (more rows per device on fewer devices), and the data
    # position carried across: every step equals the uninterrupted run's
    losses = _losses(wd)
    assert sorted(losses) == list(range(1, 17))
    for step in range(13, 17):
        np.testing.assert_allclose(losses[step], ref[step], rtol=2e-6, err_msg=f"step {step}")
