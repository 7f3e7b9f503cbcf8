"""What a PostgreSQL backup holds, typed (``DatabaseFingerprint``, ``PostgresFingerprint``,
``fingerprint_of``), and how it is read from the server: exact row counts of every user table,
counted in parallel connections, on an exported snapshot when a dump runs on one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from rag_backup import repository
from rag_backup.engines.postgres.common import STORE
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import InvalidRequest
from rag_backup.repository import BackupRecord


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


def _expected(record: BackupRecord, source_database: str) -> dict[str, Any]:
    """The fingerprint of ``source_database`` in the backup, in the dict form ``compare``
    compares with."""
    fingerprints = fingerprint_of(record).databases
    if source_database not in fingerprints:
        raise InvalidRequest(f"postgres backup {record.partition_key} has no database "
                             f"{source_database!r}; it has: {', '.join(sorted(fingerprints))}")
    return fingerprints[source_database].to_dict()
