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
bench="${CARGO_TARGET_DIR:-$FERRITE_ROOT/target}/release/examples/bench"
python="$FERRITE_PY_VENV/bin/python"
reference="$FERRITE_ROOT/crates/training/benches/reference.py"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bench" init "$work/small" --preset small
# Other work on a shared machine slows whichever side happens to run beside it, so each side
# runs several times, alternating, and the best run of each is compared.
rounds="${FERRITE_BENCH_ROUNDS:-3}"
results="$work/results.jsonl"
for _ in $(seq "$rounds"); do
  "$bench" train "$work/small" --threads "$threads" >>"$results"
  "$python" "$reference" train "$work/small" --threads "$threads" 2>/dev/null >>"$results"
  "$bench" decode "$work/small" --threads "$threads" >>"$results"
  "$python" "$reference" decode "$work/small" --threads "$threads" 2>/dev/null >>"$results"
done

python3 - "$results" "$threads" "$rounds" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
threads, rounds = sys.argv[2], sys.argv[3]
def best(bench, impl, key):
    return max(r[key] for r in rows if r["bench"] == bench and r["impl"] == impl)
def least(bench, impl, key):
    return min(r[key] for r in rows if r["bench"] == bench and r["impl"] == impl)
ft, pt = best("train", "ferrite", "tokens_per_second"), best("train", "pytorch", "tokens_per_second")
fd, pd = best("decode", "ferrite", "single_tokens_per_second"), best("decode", "transformers", "single_tokens_per_second")
fb = best("decode", "ferrite", "batched_tokens_per_second")
batch = rows[0].get("batch", 8) if rows[0]["bench"] == "decode" else next(r["batch"] for r in rows if r["bench"] == "decode" and r["impl"] == "ferrite")
fm, pm = least("train", "ferrite", "peak_rss_mib"), least("train", "pytorch", "peak_rss_mib")
print(f"small preset, {threads} thread(s), f32 on CPU, best of {rounds} alternating runs")
print(f"training tokens/s    ferrite {ft:8.0f}   pytorch eager {pt:8.0f}   ratio {ft / pt:.2f}x")
print(f"decode tokens/s      ferrite {fd:8.1f}   transformers  {pd:8.1f}   ratio {fd / pd:.2f}x")
print(f"batched decode (x{batch})  {fb:8.1f} tokens/s vs single {fd:.1f}   ratio {fb / fd:.2f}x")
print(f"training peak RSS    ferrite {fm:8.0f} MiB   pytorch eager {pm:8.0f} MiB")
PY
