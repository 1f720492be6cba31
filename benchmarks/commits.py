"""A benchmark at two commits of this repository, run alternately in one session: the way to show
that a change costs no speed. Each commit gets a git worktree (detached, in a temporary folder);
the benchmark command runs there in turn, `--rounds` times each (A B A B ...), and every number the
`--metric` regular expression captures (its first group) in the command's output is collected per
commit. Printed: each round's numbers, then the median per commit and the ratio new / base
(< 1: the new commit is faster when the metric is a time).

    python benchmarks/commits.py --base HEAD~1 --rounds 3 --metric '\\| 8,192 \\| [\\d.]+ \\| ([\\d.]+)' -- \\
        python benchmarks/decode.py --sizes 8192 --tokens 16 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile


def worktree(repo: str, commit: str, where: str) -> str:
    path = os.path.join(where, commit.replace("/", "_").replace("~", "-").replace("^", "-"))
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "-q", path, commit], check=True)
    return path


def run(path: str, command: list[str], metric: re.Pattern) -> list[float]:
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the benchmark failed in {path} (exit {out.returncode}):\n"
                 f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
    found = [float(m.group(1)) for m in metric.finditer(out.stdout)]
    if not found:
        sys.exit(f"--metric matched nothing in the output of {path}:\n{out.stdout[-2000:]}")
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--new", default="HEAD", help="the commit measured (default HEAD)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--metric", required=True, help="regular expression; its first group is the number")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the benchmark command after --")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    metric = re.compile(args.metric)
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    where = tempfile.mkdtemp(prefix="fot_commits_")
    trees = {}
    try:
        for name in (args.base, args.new):
            trees[name] = worktree(repo, name, where)
        values = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, path in trees.items():
                got = run(path, command, metric)
                values[name] += got
                print(f"round {r + 1}, {name}: {got}", flush=True)
        base, new = (statistics.median(values[n]) for n in (args.base, args.new))
        print(f"median {args.base}: {base:.4g}; {args.new}: {new:.4g}; "
              f"{args.new} / {args.base} = {new / base:.3f}")
    finally:
        for path in trees.values():
            subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path], check=False)
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
