"""PostgreSQL: ``pg_dump -Fc`` per database on one exported snapshot, streamed through zstd.

Why ``-Z0`` and a separate zstd stage: ``pg_dump``'s built-in gzip is single-threaded and caps
the dump at about 35 MB/s; an uncompressed custom-format stream compressed by zstd keeps
gzip-like sizes at several times the rate. The archive stays a custom-format archive, so
``pg_restore`` (including ``-j``) reads it once decompressed to a seekable file.
"""

from __future__ import annotations

import glob
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import zstandard
from psycopg2 import sql

from rag_backup import repository
from rag_backup.engines import pg_catalog, pg_roles
from rag_backup.engines.comparison import Comparison
from rag_backup.engines.zstream import compress_into, decompress_artifact
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    IntegrityError,
    InvalidRequest,
    RagBackupError,
    StoreUnreachable,
    ToolError,
)
from rag_backup.proc import StreamingProcess, run, tail
from rag_backup.repository import BackupRecord, BackupRepository, PendingBackup

STORE = "postgres"
DUMP_SUFFIX = ".dump.zst"
GLOBALS_ARTIFACT = pg_roles.GLOBALS_ARTIFACT
MAX_IDENTIFIER = 63
Log = Callable[[str], None]
AUTH_FAILURES = ("password authentication failed", "no password supplied",
                 "no pg_hba.conf entry", "role \"")
# libpq's and the server's words for a server that went away during a dump (restart, failover,
# a terminated backend, a cut connection): transient, so the backup is retried. A refused login,
# a permission error or a damaged table is not.
SERVER_WENT_AWAY = (
    "server closed the connection unexpectedly", "terminating connection due to",
    "could not connect to server", "Connection refused", "the database system is shutting down",
    "the database system is starting up", "the database system is in recovery mode",
    "could not receive data from server", "no connection to the server",
    "SSL connection has been closed unexpectedly", "lost synchronization with server",
    "Connection reset by peer", "connection timed out", "server conn crashed",
)


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class PostgresServer:
    """How to reach a PostgreSQL server. The password travels only in the environment."""

    host: str
    port: int
    user: str
    password: str = field(repr=False, default="")
    connect_timeout_s: int = 10
    bin_dir: str | None = None

    def describe(self) -> str:
        return f"PostgreSQL {self.user}@{self.host}:{self.port}"

    def dsn(self, database: str) -> str:
        """A libpq connection string without the password."""
        return psycopg2.extensions.make_dsn(
            host=self.host, port=self.port, user=self.user, dbname=database,
            connect_timeout=self.connect_timeout_s, application_name="rag-backup")

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}

    def tool(self, name: str) -> str:
        """The newest installed client binary (Debian keeps one per major version)."""
        if self.bin_dir:
            return str(Path(self.bin_dir) / name)
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                            key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                            else 0)
        found = candidates[-1] if candidates else shutil.which(name)
        if not found:
            raise ToolError(f"{name} is not installed (Debian package postgresql-client)")
        return found

    def connect(self, database: str) -> psycopg2.extensions.connection:
        try:
            return psycopg2.connect(self.dsn(database), password=self.password or None)
        except psycopg2.OperationalError as exc:
            text = tail(str(exc))
            if any(marker in text for marker in AUTH_FAILURES):
                raise CredentialsRejected(
                    f"{self.describe()} refused the login to database {database!r}: {text}; "
                    "check RAG_PG_USER / RAG_PG_PASSWORD") from exc
            if f'database "{database}" does not exist' in text:
                raise InvalidRequest(f"{self.describe()} has no database {database!r}") from exc
            raise StoreUnreachable(f"{self.describe()}, database {database!r}: {text}") from exc


@dataclass(frozen=True)
class DatabaseFingerprint:
    encoding: str
    lc_collate: str
    lc_ctype: str
    tables: dict[str, int]
    large_objects: int

    @property
    def rows(self) -> int:
        return sum(self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "lc_collate": self.lc_collate,
                "lc_ctype": self.lc_ctype, "tables": self.tables,
                "large_objects": self.large_objects, "rows": self.rows}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], database: str = "") -> DatabaseFingerprint:
        """The dict form back; ``ValueError`` saying what is wrong if it is not one."""
        what = f"database {database!r}" if database else "database"
        if not isinstance(doc, dict):
            raise ValueError(f"{what}: {doc!r} is not an object")
        for name in ("encoding", "lc_collate", "lc_ctype"):
            if not isinstance(doc.get(name), str):
                raise ValueError(f"{what}: {name} is {doc.get(name)!r}, not a string")
        tables = doc.get("tables")
        if not isinstance(tables, dict) or not all(
                isinstance(t, str) and _is_count(n) for t, n in tables.items()):
            raise ValueError(f"{what}: tables is not an object of table: row count")
        if not _is_count(doc.get("large_objects")):
            raise ValueError(f"{what}: large_objects is {doc.get('large_objects')!r}, not a "
                             "count")
        found = cls(doc["encoding"], doc["lc_collate"], doc["lc_ctype"], dict(tables),
                    doc["large_objects"])
        if "rows" in doc and doc["rows"] != found.rows:
            raise ValueError(f"{what}: rows {doc['rows']!r} is not the sum over its tables "
                             f"({found.rows})")
        return found


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


@dataclass(frozen=True)
class PostgresFingerprint:
    """What a PostgreSQL backup holds: each database's fingerprint (encoding, locale, exact row
    count per table, large objects), and whether its globals carry role passwords. ``to_dict``
    is what the manifest stores (``{"databases": {name: DatabaseFingerprint.to_dict()},
    "tables", "rows", "globals_include_role_passwords"}``)."""

    databases: dict[str, DatabaseFingerprint]
    globals_include_role_passwords: bool = True

    @property
    def tables(self) -> int:
        return sum(len(d.tables) for d in self.databases.values())

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.databases.values())

    def to_dict(self) -> dict[str, Any]:
        return {"databases": {name: fp.to_dict() for name, fp in self.databases.items()},
                "tables": self.tables, "rows": self.rows,
                "globals_include_role_passwords": self.globals_include_role_passwords}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PostgresFingerprint:
        """The dict form back; ``ValueError`` saying what is wrong if it is not one."""
        if not isinstance(doc, dict) or not isinstance(doc.get("databases"), dict):
            raise ValueError("it has no 'databases' object")
        passwords = doc.get("globals_include_role_passwords", True)
        if not isinstance(passwords, bool):
            raise ValueError(f"globals_include_role_passwords is {passwords!r}, not a boolean")
        found = cls({name: DatabaseFingerprint.from_dict(fp, name)
                     for name, fp in doc["databases"].items()}, passwords)
        repository.check_totals(doc, found, ("tables", "rows"), "databases")
        return found


def fingerprint_of(source: BackupRecord | repository.Manifest | repository.BackupOutcome
                   ) -> PostgresFingerprint:
    """The typed fingerprint of a backup (its record or manifest) or of a backup's outcome;
    an invalid one raises ``DamagedBackup`` naming the backup."""
    return repository.typed_fingerprint(source, STORE, PostgresFingerprint.from_dict)


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    @property
    def tables(self) -> int:
        return fingerprint_of(self).tables

    @property
    def rows(self) -> int:
        return fingerprint_of(self).rows


# -- reading the server ------------------------------------------------------------------

TABLES_SQL = """
SELECT n.nspname, c.relname, c.relpages
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY 1, 2
"""


def _count(cur, table: tuple[str, str]) -> int:
    cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(*map(sql.Identifier, table)))
    return cur.fetchone()[0]


def _balanced(tables: list[tuple[str, str, int]], bins: int) -> list[list[tuple[str, str]]]:
    """Tables spread over ``bins`` workers, largest first onto the least loaded."""
    loads = [[0, []] for _ in range(max(1, bins))]
    for schema, name, pages in sorted(tables, key=lambda t: -t[2]):
        target = min(loads, key=lambda load: load[0])
        target[0] += max(pages, 1)
        target[1].append((schema, name))
    return [items for _, items in loads if items]


def fingerprint_database(server: PostgresServer, database: str, *, jobs: int = 1,
                         snapshot: str | None = None) -> DatabaseFingerprint:
    """Exact row counts of every user table, counted by ``jobs`` connections in parallel; with
    ``snapshot`` (an exported snapshot) every connection reads that same snapshot."""
    def connect():
        conn = server.connect(database)
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        cur = conn.cursor()
        if snapshot:
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
        return conn, cur

    conn, cur = connect()
    try:
        cur.execute("SELECT pg_encoding_to_char(encoding), datcollate, datctype "
                    "FROM pg_database WHERE datname = current_database()")
        encoding, collate, ctype = cur.fetchone()
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        large_objects = cur.fetchone()[0]
        cur.execute(TABLES_SQL)
        batches = _balanced(cur.fetchall(), jobs)
    finally:
        conn.close()

    def count_batch(batch: list[tuple[str, str]]) -> dict[str, int]:
        conn, cur = connect()
        try:
            return {f"{schema}.{name}": _count(cur, (schema, name)) for schema, name in batch}
        finally:
            conn.close()

    tables: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(batches))) as pool:
        for counted in pool.map(count_batch, batches):
            tables.update(counted)
    return DatabaseFingerprint(encoding, collate, ctype, dict(sorted(tables.items())),
                               large_objects)


def list_databases(server: PostgresServer) -> list[str]:
    """Every database that accepts connections, except templates."""
    conn = server.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE NOT datistemplate "
                        "AND datallowconn ORDER BY datname")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def server_version(server: PostgresServer) -> str:
    conn = server.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return cur.fetchone()[0]
    finally:
        conn.close()


def tool_version(server: PostgresServer, name: str) -> str:
    return run([server.tool(name), "--version"], what=f"{name} --version",
               timeout=30).stdout.decode().strip()


# -- backup ------------------------------------------------------------------------------

def dump_database(server: PostgresServer, database: str, pending: PendingBackup, *,
                  timeout_s: float, zstd_level: int = 3) -> DatabaseFingerprint:
    """``pg_dump -Fc`` of ``database`` on an exported snapshot; row counts in the same snapshot."""
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
            compress_into(pending, f"{database}{DUMP_SUFFIX}", dump.proc.stdout, zstd_level)
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


# -- verify ------------------------------------------------------------------------------

def _has_table_data(listing: str, table: str) -> bool:
    """Whether ``pg_restore --list`` output has a TABLE DATA entry for ``schema.table``."""
    schema, _, name = table.partition(".")
    return f" TABLE DATA {schema} {name} " in listing


def verify(repo: BackupRepository, record: BackupRecord, *, timeout_s: float = 3600,
           server: PostgresServer | None = None) -> dict[str, Any]:
    """Every artifact's size and sha256; every archive decompresses and ``pg_restore --list``
    parses it and lists data for every table of the fingerprint. Raises ``IntegrityError``."""
    manifest = record.manifest
    tool = (server or PostgresServer("", 0, "")).tool("pg_restore")
    databases = fingerprint_of(record).databases
    checks: dict[str, Any] = {"artifacts": len(manifest.artifacts), "archives_listed": 0}
    expected = {f"{db}{DUMP_SUFFIX}" for db in databases} | {GLOBALS_ARTIFACT}
    present = {a.path for a in manifest.artifacts}
    if expected - present:
        raise IntegrityError(f"postgres backup {manifest.partition_key}: manifest lacks "
                             f"artifacts {sorted(expected - present)}")
    for artifact in manifest.artifacts:
        with tempfile.TemporaryFile() as listing:
            lister = None
            if artifact.path.endswith(DUMP_SUFFIX):
                lister = StreamingProcess([tool, "--list"], what=f"pg_restore --list of "
                                          f"{record.location}/{artifact.path}",
                                          timeout=timeout_s, stdin=True, stdout=listing)
            try:
                decompress_artifact(repo, record, artifact, consumer=lister)
                if lister is not None:
                    lister.wait()
            except BaseException:
                if lister is not None:
                    lister.abort()
                raise
            if lister is None:
                continue
            listing.seek(0)
            toc = listing.read().decode("utf-8", errors="replace")
        db = artifact.path[: -len(DUMP_SUFFIX)]
        absent = sorted(t for t, n in databases[db].tables.items()
                        if n > 0 and not _has_table_data(toc, t))
        if absent:
            raise IntegrityError(f"postgres backup {manifest.partition_key}: archive "
                                 f"{artifact.path} has no data for tables {absent[:10]}")
        checks["archives_listed"] += 1
    return checks


# -- restore ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreReport:
    source_database: str
    target_database: str
    replaced_existing: bool
    tables: int
    rows: int
    large_objects: int
    comparison: Comparison
    duration_s: float
    roles_created: list[str] = field(default_factory=list)
    roles_updated: list[str] = field(default_factory=list)

    @property
    def matches_manifest(self) -> bool:
        """Everything compared and nothing differs (see ``comparison``)."""
        return self.comparison.matches


def _database_exists(admin, name: str) -> bool:
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None


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


def _expected(record: BackupRecord, source_database: str) -> dict[str, Any]:
    """The fingerprint of ``source_database`` in the backup, in the dict form ``pg_catalog``
    compares with."""
    fingerprints = fingerprint_of(record).databases
    if source_database not in fingerprints:
        raise InvalidRequest(f"postgres backup {record.partition_key} has no database "
                             f"{source_database!r}; it has: {', '.join(sorted(fingerprints))}")
    return fingerprints[source_database].to_dict()


def _unpack(repo: BackupRepository, record: BackupRecord, source_database: str, tmp: str,
            log: Log) -> Path:
    """The database's archive, checked (sha256, zstd) and decompressed into ``tmp``."""
    artifact = next(a for a in record.manifest.artifacts
                    if a.path == f"{source_database}{DUMP_SUFFIX}")
    archive = Path(tmp) / "archive.dump"
    with open(archive, "wb") as out:
        decompress_artifact(repo, record, artifact, out=out)
    log(f"archive {artifact.path} checked and unpacked: {archive.stat().st_size} bytes")
    return archive


def _compare(server: PostgresServer, admin, archive: pg_catalog.SqlDump,
             expected: dict[str, Any], database: str, *, name: str, no_owner: bool, jobs: int,
             timeout_s: float, apply: bool, log: Log
             ) -> tuple[Comparison, DatabaseFingerprint]:
    """``database`` against the archive and the manifest. The object list (``pg_dump
    --schema-only``), the catalog-only entries (sequence values, large objects) and the row
    counts run in parallel; then, with ``apply``, the archive's database properties are applied
    (after counting, so a database-level ``statement_timeout`` cannot cut the counts short) and
    compared. ``name`` is the database's name in the differences (the target of a restore)."""
    props = pg_catalog.database_properties(archive)
    owner = server.user if no_owner else None

    def objects() -> Comparison:
        restored = pg_catalog.dump_schema(server, database, timeout_s=timeout_s)
        found = Comparison()
        pg_catalog.compare_objects(archive, restored, found, expected_owner=owner,
                                   definitions_why_not=pg_catalog.definitions_comparable(
                                       archive, restored))
        return found

    def catalog() -> Comparison:
        conn = server.connect(database)
        try:
            conn.set_session(readonly=True, autocommit=True)
            found = Comparison()
            pg_catalog.compare_catalog_entries(archive, conn, found, expected_owner=owner)
            return found
        finally:
            conn.close()

    comparison = Comparison()
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="pg-compare") as pool:
        rows = pool.submit(fingerprint_database, server, database, jobs=jobs)
        parts = [pool.submit(objects), pool.submit(catalog)]
        restored = rows.result()
        for part in parts:
            comparison.merge(part.result())
    pg_catalog.compare_rows(expected, restored.tables, restored.large_objects, comparison)
    if apply and props is not None:
        pg_catalog.apply_database_properties(admin, props, database, apply_owner=not no_owner,
                                             log=log)
    pg_catalog.compare_database_properties(
        props, expected, pg_catalog.read_database_state(admin, database), comparison,
        database=name, expected_owner=owner)
    return comparison, restored


def compare_database(repo: BackupRepository, record: BackupRecord, server: PostgresServer,
                     source_database: str, database: str, *, no_owner: bool = False,
                     jobs: int = 2, workdir: str | None = None, timeout_s: float = 3600,
                     log: Log = _quiet) -> Comparison:
    """Compare an existing ``database`` on ``server`` with ``source_database`` of a backup, as a
    restore does: the archive's object list, sequence values, large objects, row counts and
    database properties. Changes nothing. ``no_owner``: expect everything owned by the
    connecting user (a restore made with ``no_owner``)."""
    expected = _expected(record, source_database)
    admin = server.connect("postgres")
    admin.autocommit = True
    try:
        if not _database_exists(admin, database):
            raise InvalidRequest(f"{server.describe()} has no database {database!r}")
        with tempfile.TemporaryDirectory(prefix="rag-backup-pg-", dir=workdir) as tmp:
            archive = _unpack(repo, record, source_database, tmp, log)
            contents = pg_catalog.read_archive(server.tool("pg_restore"), str(archive), tmp,
                                               timeout_s=timeout_s)
            comparison, _ = _compare(server, admin, contents, expected, database,
                                     name=database, no_owner=no_owner, jobs=jobs,
                                     timeout_s=timeout_s, apply=False, log=log)
        return comparison
    except psycopg2.Error as exc:
        raise StoreUnreachable(f"comparing {database!r} on {server.describe()} failed: "
                               f"{tail(str(exc))}") from exc
    finally:
        admin.close()


def restore(repo: BackupRepository, record: BackupRecord, server: PostgresServer, *,
            source_database: str, target_database: str, confirm: str = "", jobs: int = 2,
            no_owner: bool = False, workdir: str | None = None, timeout_s: float = 6 * 3600,
            log: Log = _quiet, restore_roles: bool = False, update_existing_roles: bool = False,
            accept_differences: bool = False) -> RestoreReport:
    """Restore one database of a backup into ``target_database`` on ``server``.

    With ``restore_roles`` the backup's roles that the server lacks are created first (existing
    ones are altered only with ``update_existing_roles``), so ownership works on a new server.
    The archive is restored into a staging database, the archive's database properties
    (comment, settings, role-in-database settings, ACL, owner) are applied to it, and it is
    compared with the archive and the manifest (see ``compare_database``). The target is touched
    only if nothing differs, or ``accept_differences`` is set; otherwise the staging copy is
    dropped. An existing target is replaced (by rename, then drop) only when ``confirm`` equals
    its name.
    """
    started = time.monotonic()
    expected = _expected(record, source_database)
    if update_existing_roles and not restore_roles:
        raise InvalidRequest("update_existing_roles applies to the roles of restore_roles: set "
                             "restore_roles too, or leave update_existing_roles off")
    suffix = f"__restore_{uuid.uuid4().hex[:8]}"
    if not target_database or len(target_database.encode()) > MAX_IDENTIFIER - len(suffix):
        raise InvalidRequest(f"target database name {target_database!r} must be 1 to "
                             f"{MAX_IDENTIFIER - len(suffix)} bytes long")
    admin = server.connect("postgres")
    admin.autocommit = True
    staging = target_database + suffix
    roles = pg_roles.RolesOutcome()
    try:
        exists = _database_exists(admin, target_database)
        if exists and confirm != target_database:
            raise ConfirmationRequired(
                f"database {target_database!r} exists on {server.describe()}; restoring over it "
                f"replaces it: set confirm to {target_database!r} to proceed, or choose another "
                "target database")
        with tempfile.TemporaryDirectory(prefix="rag-backup-pg-", dir=workdir) as tmp:
            archive = _unpack(repo, record, source_database, tmp, log)
            contents = pg_catalog.read_archive(server.tool("pg_restore"), str(archive), tmp,
                                               timeout_s=timeout_s)
            if restore_roles:
                roles = pg_roles.restore_roles(
                    admin, pg_roles.read_globals(repo, record), connecting_user=server.user,
                    with_passwords=fingerprint_of(record).globals_include_role_passwords,
                    update_existing=update_existing_roles, log=log)
            with admin.cursor() as cur:
                cur.execute(pg_catalog.create_database_sql(
                    staging, pg_catalog.database_properties(contents), expected))
            try:
                argv = [server.tool("pg_restore"), f"--jobs={max(1, jobs)}", "--exit-on-error",
                        "--no-password", f"--dbname={server.dsn(staging)}"]
                if no_owner:
                    argv.append("--no-owner")
                run([*argv, str(archive)], what=f"pg_restore into {staging!r} on "
                    f"{server.describe()}", timeout=timeout_s, env=server.env())
                comparison, restored = _compare(
                    server, admin, contents, expected, staging, name=target_database,
                    no_owner=no_owner, jobs=jobs, timeout_s=timeout_s, apply=True, log=log)
                log(f"compared {dict(comparison.compared)}: {comparison.summary()}")
                if comparison.differences and not accept_differences:
                    raise IntegrityError(
                        f"restored copy of {source_database!r} differs from backup "
                        f"{record.partition_key}: {comparison.summary()}; target "
                        f"{target_database!r} was not touched (set accept_differences to "
                        "restore it anyway)")
                _swap_in(admin, staging, target_database, exists)
            except BaseException:
                _drop_database(admin, staging)
                raise
    except psycopg2.Error as exc:
        raise StoreUnreachable(f"restore into {target_database!r} on {server.describe()} "
                               f"failed: {tail(str(exc))}") from exc
    finally:
        admin.close()
    return RestoreReport(source_database, target_database, exists, len(restored.tables),
                         restored.rows, restored.large_objects, comparison,
                         time.monotonic() - started, roles.created, roles.updated)


def _swap_in(admin, staging: str, target: str, replace: bool) -> None:
    """Put the staging database in the target's place; the old one is dropped afterwards."""
    with admin.cursor() as cur:
        if replace:
            retired = f"{target[:40]}__replaced_{uuid.uuid4().hex[:8]}"
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (target,))
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(target), sql.Identifier(retired)))
        cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(staging), sql.Identifier(target)))
        if replace:
            cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(retired)))


def check_credentials(server: PostgresServer) -> None:
    """Fail early with a clear error when the server is unreachable or refuses the login."""
    server.connect("postgres").close()


__all__ = [
    "STORE", "BackupOutcome", "DatabaseFingerprint", "PostgresFingerprint", "PostgresServer",
    "RagBackupError", "RestoreReport", "backup", "check_credentials", "compare_database",
    "fingerprint_of", "list_databases", "restore", "verify",
]
