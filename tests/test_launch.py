"""launch/tpu.py prints (and would run) the exact gcloud commands; launch/local_pod.sh runs a pod."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.py")


def _dry(*args):
    # --dry-run before any "--" (what follows "--" is the remote command)
    res = subprocess.run(
        [sys.executable, TPU, args[0], "--dry-run", *args[1:]], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_lifecycle_commands():
    z = ["--name", "fot3b", "--zone", "europe-west4-a", "--project", "proj"]
    (create,) = _dry("create", *z, "--type", "v3-128", "--spot")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "fot3b"]
    assert "--accelerator-type" in create and create[create.index("--accelerator-type") + 1] == "v3-128"
    assert "--spot" in create and create[create.index("--project") + 1] == "proj"
    (queued,) = _dry("create", *z, "--type", "v4-64", "--queued")
    assert queued[3:5] == ["queued-resources", "create"] and queued[queued.index("--node-id") + 1] == "fot3b"
    scp, unpack = _dry("install", *z)
    assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
    assert "--worker=all" in unpack and "pip install -q -e '.[tpu]'" in unpack[-1]
    (clone,) = _dry("install", *z, "--repo", "https://example.com/fot_jax.git", "--rev", "v1")
    assert "git clone https://example.com/fot_jax.git" in clone[-1] and "git checkout -q v1" in clone[-1]
    (run,) = _dry("run", *z, "--env", "XLA_FLAGS=--x", "--", "fot-jax", "train", "--config",
                  "configs/longllama_3b.py", "--workdir", "gs://b/run")
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fot3b"] and "--worker=all" in run
    remote = run[-1]
    assert "export XLA_FLAGS=--x" in remote and "nohup fot-jax train --config configs/longllama_3b.py " \
           "--workdir gs://b/run > ~/fot_jax_run.log" in remote
    (attached,) = _dry("run", *z, "--attach", "--", "fot-jax", "train", "--config", "c.py", "--workdir", "w")
    assert "nohup" not in attached[-1]
    (logs,) = _dry("logs", *z, "--follow")
    assert "--worker=0" in logs and "tail -n 100 -f ~/fot_jax_run.log" == logs[-1]
    (stop,) = _dry("stop", *z)
    assert "--worker=all" in stop and stop[-1].startswith("pkill -TERM -f")
    (delete,) = _dry("delete", *z, "--queued")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


def test_tpu_run_needs_a_command():
    res = subprocess.run([sys.executable, TPU, "run", "--name", "x", "--zone", "z", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "give the command after --" in res.stderr


def test_stop_pattern_matches_training_but_not_its_own_shell():
    import re
    pattern = re.compile(__import__("importlib").import_module("runpy").run_path(TPU)["PROCESS_PATTERN"])
    assert pattern.search("/usr/bin/python /home/u/.local/bin/fot-jax train --config c.py")
    assert pattern.search("python -m fot_jax.cli train --config c.py")
    assert not pattern.search("bash -c pkill -TERM -f '[f]ot-jax train|[f]ot_jax[.]cli train'")


def test_local_pod_script_usage():
    res = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local_pod.sh")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "usage" in res.stderr


def test_workdir_paths_keep_bucket_urls():
    from fot_jax import paths
    assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.join("gs://bucket/run/", "best") == "gs://bucket/run/best"
    assert paths.join("rel", "checkpoints") == os.path.abspath("rel/checkpoints")
    assert paths.is_url("s3://b/x") and not paths.is_url("/tmp/x")
