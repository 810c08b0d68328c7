#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, then formatting, lints and every test against real
# PostgreSQL, RabbitMQ and an S3-compatible server. Torch runs with one thread.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"

bash scripts/setup.sh
[ -x scripts/setup-python.sh ] && bash scripts/setup-python.sh

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace --quiet

for script in scripts/test-*.sh; do
  [ -e "$script" ] || continue
  step "$script"
  bash "$script"
done

step "all tests passed"
