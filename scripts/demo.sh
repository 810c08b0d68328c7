#!/usr/bin/env bash
# The main job (README): installs and starts what is missing, builds Ferrite, then runs
# `ferrite demo`: examples/demo.yaml on the real data (tokenizer, pretraining, SFT, LoRA,
# QLoRA, registration, deployment), a chat answer through the gateway, and the report under
# .ferrite/runs/demo/. Arguments go to `ferrite demo` (`--quick` for the five-minute version).
# The demo starts `ferrite up` itself when nothing answers on port 8080; artifacts go to a
# local s3s-fs server, as they would to S3.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"

bash scripts/setup.sh
bash scripts/fetch-data.sh

echo "demo: building ferrite (release; the first build takes 10-15 minutes on two cores)" >&2
cargo build --release --quiet -p ferrite-cli

# A local S3-compatible store for artifacts, kept between runs under .ferrite/.
S3_PORT="${FERRITE_DEMO_S3_PORT:-9100}"
S3_DIR="$FERRITE_ROOT/.ferrite/s3"
mkdir -p "$S3_DIR/ferrite"
s3_pid=""
if ! (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null; then
  s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key ferrite --secret-key ferrite-secret \
    "$S3_DIR" >"$FERRITE_ROOT/.ferrite/s3s-fs.log" 2>&1 &
  s3_pid=$!
  # Ctrl-C reaches s3s-fs too, so it may be gone already; that is not a failure.
  trap 'kill "$s3_pid" 2>/dev/null || true' EXIT
fi

export FERRITE_STORE="s3://ferrite"
export FERRITE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export FERRITE_S3_ACCESS_KEY=ferrite
export FERRITE_S3_SECRET_KEY=ferrite-secret
export FERRITE_LOG_FORMAT="${FERRITE_LOG_FORMAT:-pretty}"
export FERRITE_LOG_FILTER="${FERRITE_LOG_FILTER:-warn}"

# `cargo run` finds the binary wherever the target folder is (CARGO_TARGET_DIR included).
cargo run --release --quiet -p ferrite-cli -- demo "$@"
