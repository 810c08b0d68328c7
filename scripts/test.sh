#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, then formatting, lints and every test against real
# PostgreSQL, RabbitMQ and an S3-compatible server. Torch runs with one thread.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"

bash scripts/setup.sh
bash scripts/fetch-data.sh
bash scripts/setup-python.sh

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Tests that need the fetched data or the Python stack are `#[ignore]`d for a bare `cargo test`;
# both are installed above, so they run here.
step "cargo test"
cargo test --workspace --quiet -- --include-ignored

for script in scripts/test-*.sh; do
  [ -e "$script" ] || continue
  step "$script"
  bash "$script"
done

step "all tests passed"
