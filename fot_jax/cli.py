"""`fot-jax` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _split_overrides(argv):
    known, overrides = [], []
    for arg in argv:
        (overrides if arg.startswith("--config.") else known).append(arg)
    return known, overrides


def cmd_train(args, overrides):
    from fot_jax import config as config_lib
    from fot_jax.train.loop import train
    cfg = config_lib.load_config(args.config, overrides)
    summary = train(cfg, args.workdir)
    print(json.dumps(summary["eval"], indent=1))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    known, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="fot-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (and evaluate) a model from a config file")
    p.add_argument("--config", required=True, help="a config file in configs/")
    p.add_argument("--workdir", required=True, help="where metrics, plots and checkpoints go")
    args = parser.parse_args(known)
    from fot_jax.config import ConfigError
    try:
        if args.command == "train":
            return cmd_train(args, overrides)
    except ConfigError as e:
        print(f"fot-jax: config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
