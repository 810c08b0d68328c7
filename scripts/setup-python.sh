#!/usr/bin/env bash
# Installs the Python stack used by interoperability tests and benchmarks (torch, transformers,
# peft, safetensors, openai, tokenizers) into a cached venv at $FERRITE_PY_VENV. Idempotent:
# a stamp naming the pinned set marks a complete install; change the pins, bump the stamp.
#
# torch is the default PyPI wheel, the same 2.11.0 build libtorch comes from, so Python and
# Ferrite run identical kernels. It pulls CUDA runtime wheels (about 2.8 GB in all) that stay
# unused on CPU; without them `import torch` fails, as libtorch_python links cuDNN.
set -euo pipefail
source "$(dirname "$0")/env.sh"

stamp="$FERRITE_PY_VENV/.ferrite-complete-v1"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup-python: installing torch, transformers and peft into $FERRITE_PY_VENV (about 2.8 GB)"
python3 -m venv "$FERRITE_PY_VENV"
"$FERRITE_PY_VENV/bin/pip" install --quiet --disable-pip-version-check \
  "torch==2.11.0" "transformers==5.25.0" "tokenizers==0.23.3" "safetensors==0.8.0" \
  "peft==0.21.2" "accelerate==1.16.0" "openai==3.60.0" "numpy==2.4.6"
"$FERRITE_PY_VENV/bin/python" -c "import torch, transformers, peft, safetensors, openai, tokenizers"
touch "$stamp"
