#!/usr/bin/env python3
"""Cloud TPU pods for fot_jax: create, install, run on every worker, logs, stop, delete.

Every action prints the exact `gcloud` commands it runs; `--dry-run` prints them and runs nothing.
A pod is one program on every worker (`--worker=all`); fot_jax's multi-host runtime finds the other
workers by itself on a TPU VM (see fot_jax/parallel/distributed.py). Standard library only.

    python launch/tpu.py create  --name fot3b --zone europe-west4-a --type v3-128 [--queued] [--spot]
    python launch/tpu.py install --name fot3b --zone europe-west4-a            # this checkout
    python launch/tpu.py run     --name fot3b --zone europe-west4-a -- \\
        fot-jax train --config configs/longllama_3b.py --workdir gs://BUCKET/fot3b
    python launch/tpu.py logs    --name fot3b --zone europe-west4-a [--worker 0]
    python launch/tpu.py stop    --name fot3b --zone europe-west4-a            # SIGTERM: checkpoint, exit
    python launch/tpu.py delete  --name fot3b --zone europe-west4-a [--queued]

`run` starts the command detached on every worker (logs in ~/fot_jax_run.log on each) unless
`--attach`, which streams every worker's output until it ends. Run the same `run` again after a
preemption: training resumes from the last checkpoint in the workdir (use a gs:// workdir, which
every worker sees).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile

REMOTE_DIR = "fot_jax"
LOG = "~/fot_jax_run.log"
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
PROCESS_PATTERN = "[f]ot-jax train|[f]ot_jax[.]cli train"   # [f]: never matches the ssh shell itself


def _base(args) -> list[str]:
    out = []
    if args.project:
        out += ["--project", args.project]
    out += ["--zone", args.zone]
    return out


def _ssh(args, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_base(args), f"--worker={worker}",
            "--command", command]


def create(args) -> list[list[str]]:
    if args.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, "--node-id", args.name,
               *_base(args), "--accelerator-type", args.type, "--runtime-version", args.runtime]
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_base(args),
           "--accelerator-type", args.type, "--version", args.runtime]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def _source_tarball(root: str) -> str:
    """The checkout's tracked files (git ls-files) as a tarball to copy to every worker."""
    files = subprocess.run(
        ["git", "-C", root, "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    path = os.path.join(tempfile.mkdtemp(), "fot_jax_src.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(root, f), arcname=os.path.join(REMOTE_DIR, f))
    return path


def install(args) -> list[list[str]]:
    extras = args.extras
    if args.repo:
        fetch = (f"(test -d {REMOTE_DIR} || git clone {shlex.quote(args.repo)} {REMOTE_DIR}) && "
                 f"cd {REMOTE_DIR} && git fetch -q && git checkout -q {shlex.quote(args.rev)}")
        return [_ssh(args, f"set -e; {fetch} && pip install -q -e '.[{extras}]'")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tarball = "<tarball of this checkout>" if args.dry_run else _source_tarball(root)
    return [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:~/fot_jax_src.tar.gz",
             *_base(args), "--worker=all"],
            _ssh(args, f"set -e; rm -rf {REMOTE_DIR}; tar xzf ~/fot_jax_src.tar.gz; "
                       f"cd {REMOTE_DIR} && pip install -q -e '.[{extras}]'")]


def run(args) -> list[list[str]]:
    if not args.command:
        raise SystemExit("launch/tpu.py run: give the command after --, e.g. -- fot-jax train --config ...")
    command = " ".join(shlex.quote(c) for c in args.command)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in args.env or []))
    prefix = f"cd {REMOTE_DIR} && " + (f"export {env} && " if env else "")
    if args.attach:
        return [_ssh(args, prefix + command)]
    # Detached: survives the ssh session; the same command on every worker, logs per worker.
    return [_ssh(args, prefix + f"nohup {command} > {LOG} 2>&1 < /dev/null &")]


def logs(args) -> list[list[str]]:
    return [_ssh(args, f"tail -n {args.lines} {'-f ' if args.follow else ''}{LOG}", worker=args.worker)]


def stop(args) -> list[list[str]]:
    # SIGTERM: fot-jax train saves a checkpoint at the step boundary and exits 143 on every worker.
    return [_ssh(args, f"pkill -TERM -f {shlex.quote(PROCESS_PATTERN)} || true")]


def delete(args) -> list[list[str]]:
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_base(args),
                 "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_base(args), "--quiet"]]


ACTIONS = {"create": create, "install": install, "run": run, "logs": logs, "stop": stop, "delete": delete}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=sorted(ACTIONS))
    p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="default: gcloud's configured project")
    p.add_argument("--type", default="v3-8", help="accelerator type, e.g. v3-128, v4-64, v5p-128")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, help="TPU VM software version")
    p.add_argument("--queued", action="store_true", help="create/delete through a queued resource")
    p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    p.add_argument("--repo", help="install: git URL to clone on every worker (default: copy this checkout)")
    p.add_argument("--rev", default="main", help="install: git revision with --repo")
    p.add_argument("--extras", default="tpu", help="install: pip extras")
    p.add_argument("--env", action="append", help="run: KEY=VALUE exported on every worker (repeat)")
    p.add_argument("--attach", action="store_true", help="run: stream all workers' output until the end")
    p.add_argument("--worker", default="0", help="logs: worker index or 'all'")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="logs: keep streaming")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    args = p.parse_args(argv)
    args.command = command
    return run_commands(ACTIONS[args.action](args), args.dry_run, "launch/tpu.py")


def run_commands(cmds: list[list[str]], dry_run: bool, prog: str) -> int:
    """Prints each command (`+ ...`) and runs it unless `dry_run`; stops at the first that fails."""
    for cmd in cmds:
        print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"{prog}: command failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
