#!/usr/bin/env bash
# Pretrains the `small` preset (12.6M parameters) on data/corpus/corpus.txt for a fixed budget
# of optimizer steps on the CPU, then prints held-out loss against the unigram baseline of the
# same tokenizer and greedy and sampled continuations. Trains the tokenizer first (cached in
# the output folder). Extra arguments go to the example, e.g. `--steps 600 --threads 2`.
# Output: out/pretrain-small (a Hugging Face folder plus optimizer and trainer state).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"
threads=2
export OMP_NUM_THREADS="$threads"

corpus="$FERRITE_DATA/corpus/corpus.txt"
if [ ! -f "$corpus" ]; then
  echo "pretrain-small: $corpus is missing; run scripts/fetch-data.sh first" >&2
  exit 1
fi
cargo run --release --quiet -p ferrite-training --example pretrain -- \
  --corpus "$corpus" --out out/pretrain-small --preset small \
  --steps 250 --batch-size 8 --sequence-length 128 --lr 3e-3 --eval-interval 50 \
  --threads "$threads" "$@"
