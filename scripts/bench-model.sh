#!/usr/bin/env bash
# Benchmarks Ferrite's model against PyTorch on the same weights, threads and shapes, and
# prints ratios measured in this run (never asserted; numbers depend on the machine):
#   - training tokens/s of `small`: Ferrite vs LlamaForCausalLM in PyTorch eager
#   - single-stream greedy decode tokens/s: Ferrite vs transformers' generate (KV cache)
#   - batched decode of 8 left-padded sequences vs Ferrite's single stream
#   - peak resident memory of training `small` on each side
# Usage: scripts/bench-model.sh [threads]   (default 2)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
threads="${1:-2}"
export OMP_NUM_THREADS="$threads"

"$(dirname "$0")/setup-python.sh"
cargo build --release --quiet -p ferrite-training --example bench
bench="$FERRITE_ROOT/target/release/examples/bench"
python="$FERRITE_PY_VENV/bin/python"
reference="$FERRITE_ROOT/crates/training/benches/reference.py"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bench" init "$work/small" --preset small
ferrite_train="$("$bench" train "$work/small" --threads "$threads")"
torch_train="$("$python" "$reference" train "$work/small" --threads "$threads")"
ferrite_decode="$("$bench" decode "$work/small" --threads "$threads")"
torch_decode="$("$python" "$reference" decode "$work/small" --threads "$threads")"

python3 - "$ferrite_train" "$torch_train" "$ferrite_decode" "$torch_decode" "$threads" <<'PY'
import json, sys
ft, pt, fd, pd = (json.loads(a) for a in sys.argv[1:5])
threads = sys.argv[5]
print(f"small preset, {threads} thread(s), f32 on CPU")
print(f"training tokens/s    ferrite {ft['tokens_per_second']:8.0f}   pytorch eager {pt['tokens_per_second']:8.0f}   ratio {ft['tokens_per_second'] / pt['tokens_per_second']:.2f}x")
print(f"decode tokens/s      ferrite {fd['single_tokens_per_second']:8.1f}   transformers  {pd['single_tokens_per_second']:8.1f}   ratio {fd['single_tokens_per_second'] / pd['single_tokens_per_second']:.2f}x")
print(f"batched decode (x{fd['batch']})  {fd['batched_tokens_per_second']:8.1f} tokens/s vs single {fd['single_tokens_per_second']:.1f}   ratio {fd['batched_tokens_per_second'] / fd['single_tokens_per_second']:.2f}x")
print(f"training peak RSS    ferrite {ft['peak_rss_mib']:8.0f} MiB   pytorch eager {pt['peak_rss_mib']:8.0f} MiB")
PY
