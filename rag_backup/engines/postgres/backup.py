"""PostgreSQL: ``pg_dump -Fc`` per database on one exported snapshot, streamed through zstd.

Why ``-Z0`` and a separate zstd stage: ``pg_dump``'s built-in gzip is single-threaded and caps
the dump at about 35 MB/s; an uncompressed custom-format stream compressed by zstd keeps
gzip-like sizes at several times the rate. The archive stays a custom-format archive, so
``pg_restore`` (including ``-j``) reads it once decompressed to a seekable file.

The globals (roles, tablespaces) are ``pg_dumpall --globals-only``, without role passwords when
the user may not read them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import zstandard

from rag_backup import progress, repository
from rag_backup.engines.postgres.common import (
    DUMP_SUFFIX,
    GLOBALS_ARTIFACT,
    Log,
    _quiet,
)
from rag_backup.engines.postgres.fingerprint import (
    DatabaseFingerprint,
    PostgresFingerprint,
    fingerprint_database,
    fingerprint_of,
)
from rag_backup.engines.postgres.server import (
    SERVER_WENT_AWAY,
    PostgresServer,
    list_databases,
    server_version,
    tool_version,
)
from rag_backup.engines.zstream import compress_into
from rag_backup.errors import InvalidRequest, RagBackupError, StoreUnreachable, ToolError
from rag_backup.proc import StreamingProcess
from rag_backup.repository import PendingBackup


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    @property
    def tables(self) -> int:
        return fingerprint_of(self).tables

    @property
    def rows(self) -> int:
        return fingerprint_of(self).rows


# The tables' heap and TOAST (user tables, materialized views, large objects): what pg_dump
# writes, about. Indexes are rebuilt on restore, not dumped; the catalogs are mostly not dumped.
DUMP_ESTIMATE_SQL = """
SELECT coalesce(sum(pg_table_size(c.oid)), 0)::bigint FROM pg_class c
WHERE c.relkind IN ('r', 'm')
  AND (c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
       OR c.oid = 'pg_largeobject'::regclass)
"""


def estimate_dump_bytes(server: PostgresServer, database: str) -> int | None:
    """About the size of ``database``'s dump (for progress; None if it cannot be read)."""
    try:
        conn = server.connect(database)
    except RagBackupError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute(DUMP_ESTIMATE_SQL)
            return int(cur.fetchone()[0]) or None
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def dump_database(server: PostgresServer, database: str, pending: PendingBackup, *,
                  timeout_s: float, zstd_level: int = 3) -> DatabaseFingerprint:
    """``pg_dump -Fc`` of ``database`` on an exported snapshot; row counts in the same snapshot.
    Its progress is tracked against the estimate of ``estimate_dump_bytes``."""
    estimate = estimate_dump_bytes(server, database)
    snap = server.connect(database)
    try:
        snap.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with snap.cursor() as cur:
            cur.execute("SELECT pg_export_snapshot()")
            snapshot = cur.fetchone()[0]
        dump = StreamingProcess(
            [server.tool("pg_dump"), "--format=custom", "--compress=0", "--no-password",
             f"--snapshot={snapshot}", f"--dbname={server.dsn(database)}"],
            what=f"pg_dump of database {database!r} on {server.describe()}",
            timeout=timeout_s, env=server.env(), transient=SERVER_WENT_AWAY)
        counted: dict[str, Any] = {}

        def count() -> None:
            try:
                counted["fp"] = fingerprint_database(server, database, snapshot=snapshot)
            except Exception as exc:  # reported after the dump, with the dump's own error first
                counted["error"] = exc

        counter = threading.Thread(target=count, name=f"count-{database}", daemon=True)
        counter.start()
        try:
            with progress.tracking(f"pg_dump of {database}", estimate, estimated=True):
                compress_into(pending, f"{database}{DUMP_SUFFIX}", dump.proc.stdout,
                              zstd_level)
                dump.wait()
        except BaseException:
            dump.abort()
            raise
        finally:
            counter.join(timeout=timeout_s)
        if "error" in counted:
            raise StoreUnreachable(f"counting rows of database {database!r} on "
                                   f"{server.describe()} failed: {counted['error']}")
        return counted["fp"]
    finally:
        snap.close()


def dump_globals(server: PostgresServer, pending: PendingBackup, *, timeout_s: float,
                 zstd_level: int = 3) -> bool:
    """Roles and tablespaces; without role passwords when the user may not read them."""
    def attempt(extra: list[str]) -> None:
        proc = StreamingProcess(
            [server.tool("pg_dumpall"), "--globals-only", "--no-password", *extra,
             f"--dbname={server.dsn('postgres')}"],
            what=f"pg_dumpall --globals-only on {server.describe()}", timeout=timeout_s,
            env=server.env(), transient=SERVER_WENT_AWAY)
        try:
            compress_into(pending, GLOBALS_ARTIFACT, proc.proc.stdout, zstd_level)
            proc.wait()
        except BaseException:
            proc.abort()
            raise

    try:
        attempt([])
        return True
    except ToolError as exc:
        if "permission denied" not in str(exc):
            raise
        attempt(["--no-role-passwords"])
        return False


def backup(server: PostgresServer, pending: PendingBackup, *,
           databases: Sequence[str] | None = None, timeout_s: float = 6 * 3600,
           zstd_level: int = 3, log: Log = _quiet) -> BackupOutcome:
    """Dump every database (default: all non-template ones) and the globals into ``pending``."""
    version = server_version(server)
    available = list_databases(server)
    chosen = list(databases) if databases else available
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise InvalidRequest(f"{server.describe()} has no database(s) {', '.join(missing)}; "
                             f"it has: {', '.join(available)}")
    per_db: dict[str, DatabaseFingerprint] = {}
    for name in chosen:
        started = time.monotonic()
        fp = dump_database(server, name, pending, timeout_s=timeout_s, zstd_level=zstd_level)
        per_db[name] = fp
        log(f"pg_dump {name}: {len(fp.tables)} tables, {fp.rows} rows, "
            f"{fp.large_objects} large objects in {time.monotonic() - started:.1f} s")
    with_passwords = dump_globals(server, pending, timeout_s=timeout_s, zstd_level=zstd_level)
    fingerprint = PostgresFingerprint(per_db, with_passwords)
    versions = {"pg_dump": tool_version(server, "pg_dump"),
                "zstd": f"python-zstandard {zstandard.__version__}"}
    return BackupOutcome(fingerprint.to_dict(), versions, version)
