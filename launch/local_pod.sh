#!/usr/bin/env bash
# A pod on this machine: N processes x M simulated CPU devices run the same command.
#   launch/local_pod.sh 2 4 fot-jax train --config configs/tiny.py --workdir /tmp/pod
#   MAX_RESTARTS=3 launch/local_pod.sh 2 4 ...   # restart the whole pod when a process dies
# (see fot_jax/parallel/local_pod.py; the multi-host tests use it)
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n="$1"; m="$2"; shift 2
exec python -m fot_jax.parallel.local_pod --processes "$n" --devices "$m" \
  --max-restarts "${MAX_RESTARTS:-0}" -- "$@"
