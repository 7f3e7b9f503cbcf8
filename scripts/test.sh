#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite against real local stores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, a test module each at a time (module fixtures are never split): the suite waits
# on servers more than it computes. RAG_TEST_WORKERS=0 runs it in one process.
workers="${RAG_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
