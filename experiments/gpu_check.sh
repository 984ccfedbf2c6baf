#!/usr/bin/env bash
# One prepared GPU check (the device image already has jax with CUDA; nothing is installed):
#   bash experiments/gpu_check.sh OUT_DIR            # on a GPU machine, within ~8 minutes
#   bash experiments/gpu_check.sh OUT_DIR --dry_run  # CPU, tiny sizes: checks the script itself
# Writes OUT_DIR/devices.txt, tests.txt, fit.jsonl, render.jsonl.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--dry_run]}
dry=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [[ $dry == --dry_run ]]; then
  export JAX_PLATFORMS=cpu
  tests=(tests/test_losses.py)
  fit_args=(--config=tiny --batch_sizes=1 --repeats=1 --iterations=10)
  render_args=(--cases=sfm-224 --repeats=1)
  budget=(timeout 300)
else
  tests=(tests/test_render.py tests/test_fitting.py tests/test_losses.py tests/test_identity.py)
  fit_args=(--config=paper --batch_sizes=1,8,32 --repeats=5 --iterations=300)
  render_args=(--repeats=10)
  budget=(timeout 420)
fi
python -c "import jax; print(jax.devices()); print(jax.default_backend())" | tee "$out/devices.txt"
status=0
"${budget[@]}" python -m pytest -x "${tests[@]}" > "$out/tests.txt" 2>&1 || status=1
tail -1 "$out/tests.txt"
"${budget[@]}" python -m experiments.benchmark fit --json "${fit_args[@]}" > "$out/fit.jsonl" || status=1
"${budget[@]}" python -m experiments.benchmark render --json "${render_args[@]}" > "$out/render.jsonl" || status=1
cat "$out/fit.jsonl" "$out/render.jsonl"
exit $status
