"""Dropping a scratch database on a PostgreSQL server (the target of a restore or a drill, a
restore's staging copy); the maintenance databases are refused.
"""

from __future__ import annotations

import psycopg2
from psycopg2 import sql

from rag_backup.engines.postgres.common import STORE
from rag_backup.engines.postgres.server import PostgresServer, _database_exists
from rag_backup.errors import InvalidRequest, StoreUnreachable
from rag_backup.proc import tail


def _drop_database(admin, name: str) -> None:
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


MAINTENANCE_DATABASES = frozenset({"postgres", "template0", "template1"})


def drop_database(server: PostgresServer, name: str) -> bool:
    """Drop database ``name`` on ``server`` if it exists, ending its sessions (a scratch
    target of a restore or a drill); True if it was there. The maintenance databases
    (``postgres``, ``template0``, ``template1``) are refused."""
    if not name or name in MAINTENANCE_DATABASES:
        raise InvalidRequest(f"{STORE}: refusing to drop database {name!r} on "
                             f"{server.describe()}: only scratch targets are dropped")
    admin = server.connect("postgres")
    admin.autocommit = True
    try:
        existed = _database_exists(admin, name)
        if existed:
            _drop_database(admin, name)
        return existed
    except psycopg2.Error as exc:
        raise StoreUnreachable(f"dropping database {name!r} on {server.describe()} failed: "
                               f"{tail(str(exc))}") from exc
    finally:
        admin.close()
