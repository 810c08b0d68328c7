#!/usr/bin/env bash
# The end-to-end test (CI runs every scripts/test-*.sh): `ferrite demo --quick` on the real
# data, against a `ferrite up` of its own (a fresh database, exchange, store folder and port),
# then a check that every stage of the report succeeded.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$FERRITE_ROOT"

suffix="$(date +%s)_$$"
database="ferrite_demo_quick_$suffix"
scratch="$(mktemp -d)"
cleanup() {
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $database" >/dev/null

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export FERRITE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database"
# TODO: the services' queues under this exchange stay on the shared broker after the run;
# harmless on a CI machine that is thrown away, clutter on a long-lived one.
export FERRITE_AMQP_EXCHANGE="ferrite.demo-quick.$suffix"
export FERRITE_STORE="$scratch/store"
export FERRITE_LOG_FORMAT=pretty FERRITE_LOG_FILTER=warn
unset FERRITE_TOKEN

# The debug build is the one the tests just built; the heavy work runs in libtorch either way.
cargo build --quiet -p ferrite-cli
start=$(date +%s)
cargo run --quiet -p ferrite-cli -- demo --quick --url "http://127.0.0.1:$port" --runs-dir "$scratch/runs"
echo "test-demo-quick: the quick demo took $(( $(date +%s) - start )) s" >&2

report="$scratch/runs/demo-quick/report.md"
stages=$(grep -c '^  - name: ' <(sed -n '/^stages:/,$p' examples/demo-quick.yaml))
succeeded=$(sed -n '/^## Summary/,/^## Datasets/p' "$report" | grep -c '| succeeded |' || true)
if [ "$succeeded" -ne "$stages" ]; then
  echo "test-demo-quick: $succeeded of $stages stages succeeded" >&2
  cat "$report" >&2
  exit 1
fi
grep -q 'Sample generations' "$report" || { echo "test-demo-quick: no chat answer in the report" >&2; exit 1; }
echo "test-demo-quick: all $stages stages succeeded and the gateway answered" >&2
