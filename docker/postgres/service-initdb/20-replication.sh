#!/bin/bash
# Run once by the postgres image on a new data directory: let the superuser stream WAL over the
# compose network (the wal-receiver service: pg_receivewal through a replication slot). The
# image's own pg_hba.conf lets "all" databases in, which does not include replication.
set -euo pipefail
echo "host replication ${POSTGRES_USER} all scram-sha-256" >> "${PGDATA}/pg_hba.conf"
