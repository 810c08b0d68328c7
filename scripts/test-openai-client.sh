#!/usr/bin/env bash
# Runs the official `openai` Python package against a running gateway (chat, completions,
# streaming, n, error cases), serving SmolLM2 when data/ has it. Sets up the venv first
# (cached, idempotent).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
"$(dirname "$0")/setup-python.sh"
cargo test -p ferrite-inference-gateway --test openai_client -- --ignored --nocapture
