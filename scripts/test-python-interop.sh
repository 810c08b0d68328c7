#!/usr/bin/env bash
# Runs the tests that check Ferrite against Hugging Face transformers: logits of saved
# checkpoints within 1e-4 in f32, identical greedy continuations, and the SmolLM2 GGUF import
# answering like transformers does. Sets up the Python venv first (cached, idempotent).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
"$(dirname "$0")/setup-python.sh"
cargo test -p ferrite-model --test python_interop --test smollm2 -- --nocapture
