#!/usr/bin/env bash
# Runs mailgate's whole test suite on Debian/Ubuntu, installing the test peers when missing:
# Dovecot (IMAP + POP3) as the real upstream, curl, mbsync (isync), fetchmail, openssl (and
# libssl-dev with pkg-config, which the build links against), python3,
# Prometheus (with promtool) to scrape mailgate's metrics, Chromium to render the support view
# of an account headless (tests/insight_view.rs), and redis-server for the limits a
# fleet of mailgate instances shares, with redis-cli (redis-tools) to join a Redis Cluster
# (tests/support/redis_cluster.rs); Courier IMAP/POP3 as a second upstream
# (tests/install-courier.sh).
# Also systemd-analyze (package systemd) and, in the venv target/deploy-venv, the validators
# of the files in deploy/ (tests/deploy.rs, tests/deploy/requirements.txt).
#
#   tests/run.sh              # everything: format check, clippy, unit + integration tests
#   tests/run.sh -E 'test(starttls)'   # extra arguments go to cargo nextest (filters etc.)
#
# With CI=true nothing is optional: a peer that cannot be installed fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
[ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-imapd)
[ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
have mbsync || missing+=(isync)
have fetchmail || missing+=(fetchmail)
have curl || missing+=(curl)
have openssl || missing+=(openssl)
have python3 || missing+=(python3)
have prometheus || missing+=(prometheus)
have chromium || missing+=(chromium)
have redis-server || missing+=(redis-server)
# Debian's redis-server depends on redis-tools; a redis-server from elsewhere may lack it.
have redis-cli || missing+=(redis-tools)
have useradd || missing+=(passwd)
have systemd-analyze || missing+=(systemd)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The build links the system's OpenSSL (legacy TLS 1.0/1.1 listeners and upstreams).
have pkg-config || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)

if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # Dovecot's package scripts try to start the system service; there may be no init system.
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
fi
# --- Courier IMAP/POP3 (tests/courier.rs) ---------------------------------------------------
# The second real upstream. Debian's courier-imap/courier-pop conflict with dovecot-imapd/
# dovecot-pop3d (installing one removes the other), so tests/install-courier.sh unpacks
# them next to Dovecot instead (idempotent; see there). Dovecot is checked after it below.
if ! tests/install-courier.sh --check; then
  if ! tests/install-courier.sh; then
    if [ "${CI:-}" = "true" ]; then
      echo "tests/run.sh: Courier IMAP/POP3 could not be installed" >&2
      exit 1
    fi
    echo "tests/run.sh: WARNING: Courier IMAP/POP3 could not be installed; tests/courier.rs will fail" >&2
  fi
fi
# --- end Courier -----------------------------------------------------------------------------
for tool in /usr/lib/dovecot/imap /usr/lib/dovecot/pop3 /usr/sbin/dovecot; do
  [ -x "$tool" ] || { echo "tests/run.sh: $tool is missing after install" >&2; exit 1; }
done
for tool in mbsync fetchmail curl openssl python3 prometheus promtool chromium redis-server redis-cli systemd-analyze pkg-config; do
  have "$tool" || { echo "tests/run.sh: $tool is missing after install" >&2; exit 1; }
done
pkg-config --exists openssl || { echo "tests/run.sh: libssl-dev is missing after install" >&2; exit 1; }

# Validators for deploy/ (tests/deploy.rs): Kubernetes JSON schemas and the compose-spec,
# pinned in tests/deploy/requirements.txt, in a venv rebuilt when that file changes.
deploy_venv=target/deploy-venv
if ! cmp -s tests/deploy/requirements.txt "$deploy_venv/requirements.txt"; then
  echo "tests/run.sh: installing the deploy validators into $deploy_venv" >&2
  rm -rf "$deploy_venv"
  python3 -m venv "$deploy_venv"
  "$deploy_venv/bin/pip" install -q --disable-pip-version-check -r tests/deploy/requirements.txt
  cp tests/deploy/requirements.txt "$deploy_venv/requirements.txt"
fi
for tool in python kubernetes-validate check-jsonschema; do
  [ -x "$deploy_venv/bin/$tool" ] || { echo "tests/run.sh: $deploy_venv/bin/$tool is missing after install" >&2; exit 1; }
done

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast "$@"
fi
