#!/usr/bin/env bash
# Installs what building (and, with "test", testing) llm-relay needs, from Debian packages, when
# it is missing; starts the Redis and PostgreSQL servers the tests use when they are not running.
# Stops with a message naming the package when it cannot install it.
set -euo pipefail
mode="${1:-build}"

have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
apt_updated=""
install() {
  if ! have apt-get; then
    echo "missing: $* (install these packages, then run again)" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq || true
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null || {
    echo "could not install: $* (install these Debian packages, then run again)" >&2
    exit 1
  }
}

have cargo || { echo "cargo is missing: install the Rust toolchain (rustup) first" >&2; exit 1; }
have cmake || install cmake
have cc || install build-essential
have pkg-config || install pkg-config

# The admin UI is built with Node.js 18 or newer (Debian 12's nodejs package) and npm.
node_ok() { have node && have npm && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; }
if ! node_ok; then
  have node || install nodejs npm
  have npm || install npm
  node_ok || { echo "Node.js 18 or newer is needed to build the admin UI (found $(node --version 2>/dev/null || echo none)): install a newer nodejs package" >&2; exit 1; }
fi

[ "$mode" = "test" ] || exit 0

# The admin UI's tests drive Debian's Chromium.
[ -x /usr/bin/chromium ] || [ -n "${CHROMIUM:-}" ] || install chromium

have redis-server || install redis-server
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/llm-relay-redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

if ! have pg_ctlcluster || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then install postgresql; fi
pg_ok() { PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }
if ! pg_ok; then
  ver="$(ls /etc/postgresql | sort -V | tail -n 1)"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 || true
  for _ in $(seq 100); do
    runuser -u postgres -- psql -tAc 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  # A fresh install authenticates TCP logins by password: give the test superuser one.
  pg_ok || runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
fi
pg_ok || { echo "PostgreSQL on 127.0.0.1:5432 does not accept user postgres" >&2; exit 1; }
have nginx || true
