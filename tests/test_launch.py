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


XPK = os.path.join(ROOT, "launch", "xpk.py")


def _xpk(*args, ok=True):
    res = subprocess.run([sys.executable, XPK, *args], capture_output=True, text=True, timeout=60)
    assert (res.returncode == 0) == ok, res.stdout + res.stderr
    return res


def test_xpk_submission_commands_and_jobset_manifest_field_by_field():
    import json
    job = ["--cluster", "pods", "--workload", "fot3b", "--image", "gcr.io/proj/fot-jax:v1",
           "--tpu-type", "v5litepod-32", "--num-slices", "2", "--max-restarts", "5", "--project", "proj",
           "--zone", "us-west4-a"]
    train = ["--", "fot-jax", "train", "--config", "configs/longllama_3b.py", "--workdir", "gs://b/fot3b"]
    out = _xpk("create", "--dry-run", *job, "--priority", "high", *train).stdout
    (create,) = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert create[:3] == ["xpk", "workload", "create"]
    flags = {create[i]: create[i + 1] for i in range(3, len(create) - 1) if create[i].startswith("--")
             and not create[i + 1].startswith("--")}
    assert flags["--cluster"] == "pods" and flags["--workload"] == "fot3b"
    assert flags["--docker-image"] == "gcr.io/proj/fot-jax:v1" and flags["--tpu-type"] == "v5litepod-32"
    assert flags["--num-slices"] == "2" and flags["--max-restarts"] == "5" and flags["--priority"] == "high"
    assert flags["--project"] == "proj" and flags["--zone"] == "us-west4-a"
    assert flags["--command"] == "fot-jax train --config configs/longllama_3b.py --workdir gs://b/fot3b"
    assert "--restart-on-user-code-failure" in create and "--mtc-enabled" not in create
    # local checkpoints on the ramdisk: the command gains the local checkpoint flags
    out = _xpk("create", "--dry-run", *job, "--ramdisk-gb", "64", "--local-minutes", "3", *train).stdout
    create = shlex.split(out.splitlines()[0][2:])
    assert "--mtc-enabled" in create and "--ramdisk-directory=/local" in create
    command = create[create.index("--command") + 1]
    assert command.endswith("--config.train.local_checkpoint_dir=/local/fot_jax "
                            "--config.train.local_checkpoint_minutes=3")
    # the JobSet it amounts to
    manifest = json.loads(_xpk("manifest", *job, "--ramdisk-gb", "64", "--local-minutes", "3", *train).stdout)
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert manifest["metadata"]["name"] == "fot3b"
    spec = manifest["spec"]
    assert spec["failurePolicy"] == {"maxRestarts": 5}
    (rj,) = spec["replicatedJobs"]
    assert rj["replicas"] == 2                                        # slices
    job_spec = rj["template"]["spec"]
    assert job_spec["parallelism"] == job_spec["completions"] == 8    # 32 chips / 4 per host
    pod = job_spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x8"}
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/proj/fot-jax:v1"
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"][:2] == ["bash", "-c"] and container["command"][2] == command
    assert pod["volumes"] == [{"name": "ramdisk", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert container["volumeMounts"] == [{"name": "ramdisk", "mountPath": "/local"}]
    v4 = json.loads(_xpk("manifest", *job[:6], "--tpu-type", "v4-64", *train).stdout)
    v4_pod = v4["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert v4_pod["parallelism"] == 8 and \
        v4_pod["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4x4"
    out = _xpk("build", "--dry-run", "--image", "img:1").stdout
    build, push = [shlex.split(line[2:]) for line in out.splitlines()]
    assert build[:2] == ["docker", "build"] and build[build.index("-t") + 1] == "img:1"
    dockerfile = build[build.index("-f") + 1]
    assert dockerfile.endswith("launch/Dockerfile") and os.path.exists(dockerfile)
    assert push == ["docker", "push", "img:1"]
    assert 'pip install ".[tpu]"' in open(dockerfile).read()
    out = _xpk("delete", "--dry-run", "--cluster", "pods", "--workload", "fot3b").stdout
    (delete,) = [shlex.split(line[2:]) for line in out.splitlines()]
    assert delete == ["xpk", "workload", "delete", "--cluster", "pods", "--workload", "fot3b"]


def test_xpk_refuses_what_a_cluster_would_reject_later():
    job = ["--cluster", "pods", "--image", "img:1", "--dry-run"]
    train = ["--", "fot-jax", "train", "--workdir", "gs://b/r"]
    for args, message in [
        (["--workload", "Fot_3B", *train], "lowercase letters"),
        (["--workload", "fot3b", "--tpu-type", "v5litepod-8", *train], "not a multi-host slice"),
        (["--workload", "fot3b", "--", "fot-jax", "train", "--workdir", "/tmp/run"], "must be a bucket"),
        (["--workload", "fot3b"], "give the command after --"),
        (["--workload", "fot3b", "--num-slices", "0", *train], "--num-slices must be >= 1"),
    ]:
        res = _xpk("create", *job, *args, ok=False)
        assert message in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    assert "needs --cluster" in _xpk("create", "--workload", "w", "--image", "i", *train, ok=False).stderr


def test_the_cluster_a_process_runs_under_is_detected_without_flags():
    from fot_jax.parallel.distributed import DistributedSettings, detect_cluster
    assert detect_cluster({}) is None
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "h0"}) is None                   # one host
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "h0,h1"}) == "cloud-tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "h0,h1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) \
        == "gke-tpu"
    assert detect_cluster({"TPU_PROCESS_ADDRESSES": "a:1,b:1", "KUBERNETES_SERVICE_HOST": "x"}) == "gke-tpu"
    assert detect_cluster({"MEGASCALE_NUM_SLICES": "4"}) == "multislice"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detect_cluster(slurm) == "slurm" and detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    # the local pod's variables (and flags) stay explicit; FOT_JAX_DISTRIBUTED overrides detection
    for env, want in [({"FOT_JAX_COORDINATOR": "127.0.0.1:5", "FOT_JAX_NUM_PROCESSES": "2",
                        "FOT_JAX_PROCESS_ID": "1"}, "explicit"),
                      ({**slurm}, "auto"), ({**slurm, "FOT_JAX_DISTRIBUTED": "off"}, "off"), ({}, "off")]:
        keep = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("FOT_JAX", "SLURM", "TPU_"))}
        os.environ.update(env)
        try:
            assert DistributedSettings.from_env().wanted() == want, env
        finally:
            for k in env:
                os.environ.pop(k, None)
            os.environ.update(keep)
