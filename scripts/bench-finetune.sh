#!/usr/bin/env bash
# Fine-tuning benchmarks, printed (never asserted; numbers depend on the machine):
#   1. peak resident memory (VmHWM) and training tokens/s of full fine-tuning, LoRA (r=8 on
#      q/k/v/o) and QLoRA (NF4 base, same adapter) of the `gpt2` preset on random tokens, each
#      method in a process of its own that loads the base from a model folder as a job does;
#      the QLoRA/full and LoRA/full peak ratios; LoRA's trainable fraction. QLoRA runs with
#      gradient checkpointing, as the paper does; full fine-tuning is shown both without it
#      (the reference for the ratios) and with it.
#   2. held-out loss after the same SFT steps on data/sft/alpaca_en_demo.json with full, LoRA
#      and QLoRA over a `tiny` base pretrained here first on data/corpus/corpus.txt.
# Usage: scripts/bench-finetune.sh [threads] (default 1). FERRITE_BENCH_QUALITY_STEPS and
# FERRITE_BENCH_PRETRAIN_STEPS shorten or lengthen part 2.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
threads="${1:-1}"
export OMP_NUM_THREADS="$threads"

cargo build --release --quiet -p ferrite-training --example finetune_bench --example pretrain
examples="${CARGO_TARGET_DIR:-$FERRITE_ROOT/target}/release/examples"
bench="$examples/finetune_bench"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bench" base --preset gpt2 --out "$work/gpt2"
for run in "full false" "full true" "lora false" "qlora true"; do
  set -- $run
  "$bench" memory --method "$1" --gradient-checkpointing "$2" --base "$work/gpt2" --steps 2 \
    --batch-size 1 --sequence-length 128 --threads "$threads" | tee -a "$work/memory.jsonl"
done
python3 - "$work/memory.jsonl" <<'PY'
import json, sys
rows = list(map(json.loads, open(sys.argv[1])))
full = next(row for row in rows if row["method"] == "full" and not row["gradient_checkpointing"])
for row in rows:
    name = row["method"] + (" +ckpt" if row["gradient_checkpointing"] else "")
    print(f"{name:11} peak {row['peak_rss_mib']:8.0f} MiB ({row['peak_rss_mib'] / full['peak_rss_mib']:.2f} of full)"
          f"  {row['tokens_per_second']:8.1f} tokens/s ({row['tokens_per_second'] / full['tokens_per_second']:.2f}x full)"
          f"  trainable {100 * row['trainable_fraction']:.3f}%")
PY

base="$work/base"
"$examples/pretrain" --corpus "$FERRITE_DATA/corpus/corpus.txt" \
  --out "$base" --preset tiny --vocab-size 2048 --max-bytes 4000000 \
  --steps "${FERRITE_BENCH_PRETRAIN_STEPS:-300}" --batch-size 16 --sequence-length 128 \
  --lr 3e-3 --eval-interval 100 --threads "$threads" | tail -n 3
"$bench" quality --base "$base" --data "$FERRITE_DATA/sft/alpaca_en_demo.json" \
  --steps "${FERRITE_BENCH_QUALITY_STEPS:-60}" --batch-size 8 --max-length 256 --threads "$threads"
