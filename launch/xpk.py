#!/usr/bin/env python3
"""fot_jax on GKE TPU clusters: build the image, submit through xpk (or a JobSet manifest), list,
delete. Every action prints the exact commands it runs; `--dry-run` prints them and runs nothing.
Standard library only.

    python launch/xpk.py build    --image gcr.io/PROJ/fot-jax:v1                 # docker build + push
    python launch/xpk.py create   --cluster C --workload fot3b --image gcr.io/PROJ/fot-jax:v1 \\
        --tpu-type v5litepod-32 --num-slices 1 --max-restarts 3 -- \\
        fot-jax train --config configs/longllama_3b.py --workdir gs://BUCKET/fot3b
    python launch/xpk.py manifest ... (same flags as create)      # a JobSet for kubectl apply -f -
    python launch/xpk.py list     --cluster C
    python launch/xpk.py delete   --cluster C --workload fot3b

`create` runs `xpk workload create`: the same command in every host's container, the slices, and
`--max-restarts`: when a host fails (a SIGKILL, a node lost), JobSet restarts every host and the
run resumes from the newest checkpoint (local checkpoints on a ramdisk: `--ramdisk-gb`, see the
multi-host guide). Inside the containers fot_jax finds the other hosts by itself (GKE sets
TPU_WORKER_HOSTNAMES; fot_jax/parallel/distributed.py). The workdir must be a bucket (gs://): the
hosts share no disk.

`manifest` prints the JobSet that such a submission amounts to (JSON, which `kubectl apply -f -`
reads), for clusters without xpk: one replicated job per slice, one pod per TPU host, exclusive
node pools, `failurePolicy.maxRestarts`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

from tpu import run_commands  # launch/tpu.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = "launch/Dockerfile"
RAMDISK = "/local"          # where --ramdisk-gb mounts host memory in each container
CHIPS_PER_HOST = 4

# TPU type -> (GKE accelerator label, topology, chips): the multi-host slices of each generation
_V5E = {16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_V4 = {8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}  # chips: topology
TPU_TYPES = {
    **{f"v5litepod-{n}": ("tpu-v5-lite-podslice", t, n) for n, t in _V5E.items()},
    **{f"v6e-{n}": ("tpu-v6e-slice", t, n) for n, t in _V5E.items()},
    **{f"v4-{2 * n}": ("tpu-v4-podslice", t, n) for n, t in _V4.items()},      # v4-N: N cores, N/2 chips
    **{f"v5p-{2 * n}": ("tpu-v5p-slice", t, n) for n, t in _V4.items()},
}
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


class LaunchError(SystemExit):
    def __init__(self, message):
        super().__init__(f"launch/xpk.py: {message}")


def tpu_shape(tpu_type: str) -> tuple[str, str, int, int]:
    """(accelerator label, topology, chips, hosts) of a multi-host TPU type."""
    if tpu_type not in TPU_TYPES:
        known = sorted(TPU_TYPES, key=lambda t: (t.split("-")[0], int(t.split("-")[1])))
        raise LaunchError(f"--tpu-type {tpu_type!r} is not a multi-host slice this script knows; known: "
                          + ", ".join(known))
    label, topology, chips = TPU_TYPES[tpu_type]
    return label, topology, chips, chips // CHIPS_PER_HOST


def _check(args):
    if not NAME.match(args.workload or ""):
        raise LaunchError(f"--workload {args.workload!r}: lowercase letters, digits and '-', starting with a "
                          "letter, at most 40 characters (a Kubernetes name)")
    if args.num_slices < 1:
        raise LaunchError(f"--num-slices must be >= 1, got {args.num_slices}")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not args.image:
        raise LaunchError("--image is required (build one with `python launch/xpk.py build --image ...`)")
    if not args.command:
        raise LaunchError("give the command after --, e.g. -- fot-jax train --config ... --workdir gs://...")
    if "--workdir" in args.command:
        workdir = args.command[args.command.index("--workdir") + 1:][:1]
        if not workdir or "://" not in workdir[0]:
            raise LaunchError(f"--workdir {workdir[0] if workdir else ''!r} must be a bucket (gs://...): the "
                              "hosts of a slice share no disk, and checkpoints must outlive the pods")
    tpu_shape(args.tpu_type)


def container_command(args) -> str:
    """The shell command every container runs (local checkpoints on the ramdisk when asked)."""
    command = list(args.command)
    if args.ramdisk_gb and not any(c.startswith("--config.train.local_checkpoint_dir") for c in command):
        command += [f"--config.train.local_checkpoint_dir={RAMDISK}/fot_jax",
                    f"--config.train.local_checkpoint_minutes={args.local_minutes:g}"]
    return " ".join(shlex.quote(c) for c in command)


def _xpk_base(args) -> list[str]:
    out = ["--cluster", args.cluster]
    if args.project:
        out += ["--project", args.project]
    if args.zone:
        out += ["--zone", args.zone]
    return out


def create(args) -> list[list[str]]:
    _check(args)
    cmd = ["xpk", "workload", "create", *_xpk_base(args), "--workload", args.workload,
           "--docker-image", args.image, "--tpu-type", args.tpu_type, "--num-slices", str(args.num_slices),
           "--max-restarts", str(args.max_restarts), "--command", container_command(args)]
    if args.max_restarts:
        cmd.append("--restart-on-user-code-failure")   # a host's process that dies restarts the workload
    if args.priority:
        cmd += ["--priority", args.priority]
    if args.ramdisk_gb:      # the cluster's multi-tier-checkpointing ramdisk (cluster create --enable-mtc)
        cmd += ["--mtc-enabled", f"--ramdisk-directory={RAMDISK}"]
    return [cmd]


def jobset(args) -> dict:
    """The JobSet of a submission: one replicated job per slice, one pod per host."""
    _check(args)
    label, topology, chips, hosts = tpu_shape(args.tpu_type)
    container = {
        "name": "fot-jax",
        "image": args.image,
        "command": ["bash", "-c", container_command(args)],
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],   # TPU runtime, megascale
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": CHIPS_PER_HOST}},
        "env": [{"name": "FOT_JAX_DISTRIBUTED", "value": "auto"}],
    }
    pod = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
           "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": label,
                            "cloud.google.com/gke-tpu-topology": topology},
           "containers": [container]}
    if args.ramdisk_gb:
        memory = {"medium": "Memory", "sizeLimit": f"{args.ramdisk_gb}Gi"}
        pod["volumes"] = [{"name": "ramdisk", "emptyDir": memory}]
        container["volumeMounts"] = [{"name": "ramdisk", "mountPath": RAMDISK}]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": args.workload, "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "replicatedJobs": [{
                "name": "slice",
                "replicas": args.num_slices,
                "template": {"spec": {"parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                                      "template": {"spec": pod}}},
            }],
        },
    }


def manifest(args) -> list[list[str]]:
    print(json.dumps(jobset(args), indent=2))
    return []


def build(args) -> list[list[str]]:
    if not args.image:
        raise LaunchError("--image is required, e.g. gcr.io/PROJECT/fot-jax:TAG")
    return [["docker", "build", "-f", os.path.join(ROOT, DOCKERFILE), "-t", args.image, ROOT],
            ["docker", "push", args.image]]


def list_workloads(args) -> list[list[str]]:
    return [["xpk", "workload", "list", *_xpk_base(args)]]


def delete(args) -> list[list[str]]:
    if not NAME.match(args.workload or ""):
        raise LaunchError(f"--workload {args.workload!r} is not a workload name")
    return [["xpk", "workload", "delete", *_xpk_base(args), "--workload", args.workload]]


ACTIONS = {"build": build, "create": create, "manifest": manifest, "list": list_workloads, "delete": delete}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="launch/xpk.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=sorted(ACTIONS))
    p.add_argument("--cluster", help="GKE cluster (xpk cluster create ...)")
    p.add_argument("--workload", help="workload (JobSet) name")
    p.add_argument("--image", help="container image with fot_jax[tpu] (see `build`)")
    p.add_argument("--tpu-type", default="v5litepod-16", help="slice type, e.g. v5litepod-32, v4-64, v5p-128")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts of the whole workload after a host fails")
    p.add_argument("--priority", help="Kueue priority (low, medium, high, ...)")
    p.add_argument("--ramdisk-gb", type=int, default=0,
                   help="keep local checkpoints in host memory at /local: xpk mounts the cluster's "
                        "multi-tier-checkpointing ramdisk there; a manifest mounts an in-memory volume "
                        "of this size")
    p.add_argument("--local-minutes", type=float, default=5.0, help="minutes between local checkpoints")
    p.add_argument("--project")
    p.add_argument("--zone")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.command = command
    if args.action in ("create", "list", "delete") and not args.cluster:
        p.error(f"{args.action} needs --cluster")
    return run_commands(ACTIONS[args.action](args), args.dry_run, "launch/xpk.py")


if __name__ == "__main__":
    sys.exit(main())
