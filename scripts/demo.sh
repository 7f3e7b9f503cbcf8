#!/usr/bin/env bash
# Set up (idempotent), start and seed the embedded local stack (with the WAL receiver), back up,
# verify and apply retention for the current partition of every store, print what was backed
# up, then serve the Dagster UI on http://127.0.0.1:${PORT:-3000}.
# Ctrl-C stops the UI; `.venv/bin/python -m rag_backup.devstack down` stops the stores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/python -m rag_backup.devstack up
eval "$(.venv/bin/python -m rag_backup.devstack env)"
mkdir -p "$DAGSTER_HOME"
cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"
logs="$(dirname "$DAGSTER_HOME")/logs"
mkdir -p "$logs"

today="$(date -u +%Y-%m-%d)"
hour="$(date -u +%Y-%m-%d-%H):00"
# dg launch: Dagster's command to launch a run (each run's full event log goes to
# $logs/demo-<job>.log; a failure prints its end). Steps run in the run's process.
launch() {  # job partition
  local log="$logs/demo-$1.log" started=$SECONDS
  if .venv/bin/dg launch --job "$1" --partition "$2" >"$log" 2>&1; then
    echo "demo: $1 ($2) done in $((SECONDS - started)) s"
  else
    echo "demo: $1 ($2) FAILED; the end of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}
echo "demo: backing up, verifying and applying retention for every store (runs logged under $logs)"
cycle=$SECONDS
launch postgres_backup_job "$today"
launch postgres_pitr_job "$today"
launch redis_backup_job "$hour"
launch minio_backup_job "$today"
launch milvus_backup_job "$today"
echo "demo: the daily cycle of every store took $((SECONDS - cycle)) s"

echo
.venv/bin/rag-backup list
echo
echo "demo: serving the Dagster UI on http://127.0.0.1:${PORT:-3000} (Ctrl-C to stop)"
exec .venv/bin/dg dev -h 127.0.0.1 -p "${PORT:-3000}"
