#!/usr/bin/env bash
# Upgrade the pinned Python versions on purpose: resolve the newest versions pyproject.toml
# allows in a fresh virtual environment and write them to constraints.txt. Then re-run the test
# suite (scripts/test.sh) and the benchmarks (benchmarks/README.md) and commit the file with
# their figures. scripts/setup.sh, CI and the user-code image install exactly constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
python3 -m venv "$fresh"
timeout 1800 "$fresh/bin/python" -m pip install -q --upgrade pip
timeout 1800 "$fresh/bin/python" -m pip install -q -e '.[dev]'
{
  sed -n '1,/^# scripts\/update-constraints.sh/p' constraints.txt
  "$fresh/bin/python" -m pip freeze --exclude-editable | grep -v '^-e '
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated; now run scripts/test.sh and the benchmarks, and commit the figures"
