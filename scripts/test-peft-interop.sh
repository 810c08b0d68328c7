#!/usr/bin/env bash
# Runs the test that checks Ferrite's LoRA adapters against Python peft: peft loads a Ferrite
# adapter over Ferrite's exported base with logits equal within 1e-5 in f32, a merged-then-saved
# model matches the adapter within 1e-5, and Ferrite loads an adapter peft made (rsLoRA, all
# linear layers) with the same logits. Sets up the Python venv first (cached, idempotent).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
"$(dirname "$0")/setup-python.sh"
cargo test -p ferrite-model --test peft_interop -- --nocapture
