#!/usr/bin/env bash
# Benchmarks serving: time to first token, inter-token latency, end-to-end latency (p50, p99)
# and output tokens/s at concurrency 1 and 8, through the gateway over HTTP and by calling the
# engine directly in the same run, and prints the ratios (gateway / direct). Never asserted;
# numbers depend on the machine. Serves SmolLM2-135M-Instruct when data/ has it.
# Usage: scripts/bench-serving.sh [requests per row]   (default 16)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
export FERRITE_BENCH_REQUESTS="${1:-16}"
# The release profile optimises the gateway's own code too, as a deployment would run it.
cargo run --release --quiet -p ferrite-inference-gateway --example bench_serving
