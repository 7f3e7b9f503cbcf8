#!/usr/bin/env bash
# Runs once, when the dagster-postgres container initialises an empty data directory (the
# official image runs /docker-entrypoint-initdb.d/* then). Creates Dagster's own role and
# database on that server, which holds nothing else (its superuser $POSTGRES_USER, database
# $POSTGRES_DB = "postgres"):
#   - role $DAGSTER_PG_USER: LOGIN, no superuser, no CREATEDB, no CREATEROLE;
#   - database $DAGSTER_PG_DB owned by that role (so it can create Dagster's tables in "public");
#   - neither database accepts connections from PUBLIC: the dagster role cannot open
#     $POSTGRES_DB (superusers still can).
# The same script fits any other PostgreSQL (it is what docs/deployment.md points to for a
# server you run yourself): run it with PGHOST/PGPORT/PGUSER of a superuser and the
# DAGSTER_PG_* variables in the environment.
# The password never reaches a command line: psql reads it from the environment with \getenv
# (psql 15) and sends it inside the SQL text on stdin. Names are quoted with format('%I').
#
# The image sources this file when it is not executable and executes it when it is, so it sets no
# shell options and calls no `exit` on success.

dagster_storage_fail() {
  echo "10-dagster-storage.sh: $*" >&2
  return 1
}

dagster_storage_init() {
  local missing=""
  for name in DAGSTER_PG_USER DAGSTER_PG_PASSWORD DAGSTER_PG_DB POSTGRES_USER; do
    if [ -z "${!name:-}" ]; then missing="$missing $name"; fi
  done
  if [ -n "$missing" ]; then
    dagster_storage_fail "set$missing in .env (see .env.example)" || return 1
  fi
  if [ "$DAGSTER_PG_USER" = "$POSTGRES_USER" ]; then
    dagster_storage_fail "DAGSTER_PG_USER must differ from the server's superuser (POSTGRES_USER)" || return 1
  fi
  export POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
  if [ "$DAGSTER_PG_DB" = "$POSTGRES_DB" ]; then
    dagster_storage_fail "DAGSTER_PG_DB must differ from the server's own database (POSTGRES_DB)" || return 1
  fi

  psql -X -v ON_ERROR_STOP=1 --no-password --username "$POSTGRES_USER" \
       --dbname "$POSTGRES_DB" <<'EOSQL'
\getenv dagster_user DAGSTER_PG_USER
\getenv dagster_password DAGSTER_PG_PASSWORD
\getenv dagster_db DAGSTER_PG_DB
\getenv service_db POSTGRES_DB
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'dagster_user', :'dagster_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'dagster_user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'dagster_db', :'dagster_user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dagster_db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'dagster_db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', datname)
  FROM pg_database WHERE datname = :'service_db' \gexec
EOSQL
}

dagster_storage_init
