#!/usr/bin/env bash
# Set up rag-backup on a fresh Debian/Ubuntu machine with Python 3.11+. Idempotent: a second run
# installs nothing that is already there.
#   system packages: PostgreSQL server and client tools, Redis server and tools, zstd, age
#   (decrypting a backup by hand; the tests check the format with it), chromium
#   Python: a virtual environment in .venv with the project and its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# chromium: the test suite opens the Dagster UI in a real headless browser.
APT_PACKAGES=(postgresql postgresql-contrib postgresql-client redis-server redis-tools zstd age
              python3-venv ca-certificates chromium)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  # The project runs its own PostgreSQL instances; don't let the package create a system cluster.
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive timeout 1800 \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); rag-backup needs Python 3.11 or newer" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.rag-backup-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  timeout 1800 .venv/bin/python -m pip install -q --upgrade pip
  # The pinned versions (constraints.txt): what the tests and benchmarks ran with.
  timeout 1800 .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  echo "$want" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), $(.venv/bin/dagster --version 2>/dev/null | head -1))"
