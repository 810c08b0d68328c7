#!/usr/bin/env bash
# Installs libtorch for tch from the PyPI wheel torch==2.11.0 into a cached venv. Idempotent.
# The wheel is the CUDA 13.0 build; on CPU it needs only the two small runtime wheels below.
set -euo pipefail
source "$(dirname "$0")/env.sh"

if [ -f "$LIBTORCH/lib/libtorch_cpu.so" ] && [ -f "$FERRITE_TORCH_VENV/.ferrite-complete" ]; then
  exit 0
fi
echo "setup-torch: installing torch 2.11.0 into $FERRITE_TORCH_VENV (about 1.3 GB)"
python3 -m venv "$FERRITE_TORCH_VENV"
"$FERRITE_TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
  torch==2.11.0 "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
test -f "$LIBTORCH/lib/libtorch_cpu.so"
touch "$FERRITE_TORCH_VENV/.ferrite-complete"
