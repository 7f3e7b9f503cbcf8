#!/usr/bin/env bash
# Set up (idempotent), start and seed the embedded local stack, back up, verify and apply
# retention for today's partition, then serve the Dagster UI on http://127.0.0.1:${PORT:-3000}.
# Ctrl-C stops the UI; `.venv/bin/python -m rag_backup.devstack down` stops the stores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/python -m rag_backup.devstack up
eval "$(.venv/bin/python -m rag_backup.devstack env)"
mkdir -p "$DAGSTER_HOME"
cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"

today="$(date -u +%Y-%m-%d)"
hour="$(date -u +%Y-%m-%d-%H):00"
echo "demo: backing up, verifying and applying retention for PostgreSQL, Milvus and MinIO ($today), Redis ($hour)"
.venv/bin/dagster asset materialize -m rag_backup.definitions \
  --select 'group:postgres' --partition "$today"
.venv/bin/dagster asset materialize -m rag_backup.definitions \
  --select 'group:redis' --partition "$hour"
.venv/bin/dagster asset materialize -m rag_backup.definitions \
  --select 'group:minio' --partition "$today"
.venv/bin/dagster asset materialize -m rag_backup.definitions \
  --select 'group:milvus' --partition "$today"

echo "demo: serving the Dagster UI on http://127.0.0.1:${PORT:-3000} (Ctrl-C to stop)"
exec .venv/bin/dagster dev -m rag_backup.definitions -h 127.0.0.1 -p "${PORT:-3000}"
