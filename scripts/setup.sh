#!/usr/bin/env bash
# Installs and starts everything Ferrite needs on a fresh Debian machine. Idempotent: what is
# already installed is skipped, what is already running is left alone.
#
#   PostgreSQL 15 and RabbitMQ (Debian packages), s3s-fs (an S3-compatible server, from
#   crates.io), and libtorch from the PyPI torch wheel (see setup-torch.sh).
set -euo pipefail
source "$(dirname "$0")/env.sh"

log() { printf 'setup: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits for a TCP port by polling; a fixed sleep would be too short on a slow machine and too
# long on a fast one.
wait_for_port() {
  local port=$1 what=$2 seconds=${3:-60}
  local deadline=$((SECONDS + seconds))
  until port_open "$port"; do
    if ((SECONDS > deadline)); then log "$what did not open port $port within ${seconds}s"; return 1; fi
    sleep 0.2
  done
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_postgres() {
  apt_install postgresql
  if ! port_open 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for_port 5432 PostgreSQL 60
  fi
  # The default settings connect as `postgres` to database `ferrite`.
  if ! psql -h 127.0.0.1 -U postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = 'ferrite'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE ferrite" >/dev/null
  fi
}

start_rabbitmq() {
  apt_install rabbitmq-server
  if ! port_open 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_for_port 5672 RabbitMQ 90
  fi
}

install_s3s() {
  if [ ! -x "$FERRITE_CACHE/s3s/bin/s3s-fs" ]; then
    log "building s3s-fs 0.14.1 (an S3-compatible server; newer versions need a newer Rust)"
    cargo install s3s-fs --version 0.14.1 --features binary --locked \
      --root "$FERRITE_CACHE/s3s" --quiet
  fi
}

install_tools() {
  apt_install ca-certificates curl
}

main() {
  install_tools
  start_postgres
  start_rabbitmq
  install_s3s
  bash "$FERRITE_ROOT/scripts/setup-torch.sh"
  log "PostgreSQL, RabbitMQ, s3s-fs and libtorch are ready"
}

main "$@"
