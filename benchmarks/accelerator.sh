#!/usr/bin/env bash
# The training step of a ~1.2B-parameter FoT model (OpenLLaMA-like: 2048 wide, 8192 MLP, 32 heads x 64,
# 16 layers, memory layers 4, 8, 12; T = 2048, r = 3, k = 4; bfloat16 compute, full remat) with the
# cuDNN and reference attention backends, timed in one run: tokens/s and MFU against a large bfloat16
# matmul measured in the same run. Under 8 minutes on one GPU; needs jax with CUDA
# (pip install -e . "jax[cuda12]").
#
#   bash benchmarks/accelerator.sh            # on a GPU
#   SIZE=tiny bash benchmarks/accelerator.sh  # a smoke test on CPU (xla stands in for cudnn)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${SIZE:-full}" = tiny ]; then
  exec "$PY" benchmarks/train_step.py --layers 4 --width 128 --seq_len 128 --range 3 --batch 8 --steps 2 \
    --dtype bfloat16 --mem-layers 1,2 --remat full --backend xla,reference --skip-memory-table
fi
"$PY" - <<'PYEOF'
import jax
assert jax.default_backend() == "gpu", f"benchmarks/accelerator.sh needs a GPU; JAX sees {jax.default_backend()}"
print(jax.devices())
PYEOF
exec "$PY" benchmarks/train_step.py --layers 16 --width 2048 --seq_len 2048 --range 3 --batch 8 --steps 5 \
  --dtype bfloat16 --mem-layers 4,8,12 --remat full --matmul-size 8192 --backend cudnn,reference --skip-memory-table
