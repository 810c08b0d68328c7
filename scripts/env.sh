# Sourced by every Ferrite script: where caches live and how tch finds libtorch.
# Safe to source twice; sets variables only.

FERRITE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRITE_ROOT
export FERRITE_CACHE="${FERRITE_CACHE:-$HOME/.cache/ferrite}"
export FERRITE_DATA="${FERRITE_DATA:-$FERRITE_ROOT/data}"

# libtorch comes from the PyPI torch wheel (see scripts/setup-torch.sh). The version check is
# bypassed because torch-sys cannot read a wheel's version; both sides are pinned instead.
export FERRITE_TORCH_VENV="$FERRITE_CACHE/torch-venv"
export LIBTORCH="$FERRITE_TORCH_VENV/lib/python3.11/site-packages/torch"
export LIBTORCH_BYPASS_VERSION_CHECK=1
# The full Python stack (transformers, peft, openai) used by interoperability tests.
export FERRITE_PY_VENV="$FERRITE_CACHE/py-venv"

# One thread per torch op keeps tests reproducible and fair on two cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PATH="$FERRITE_CACHE/s3s/bin:$PATH"
