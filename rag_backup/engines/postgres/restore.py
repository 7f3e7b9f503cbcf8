"""Restore of one database of a PostgreSQL backup: the backup's roles first when asked, then
``pg_restore`` into a staging database, which gets the archive's database properties and is
compared with the archive and the manifest (``compare``); only then is it swapped into the
target's place (an existing target renamed away, then dropped).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql

from rag_backup import progress
from rag_backup.engines.comparison import Comparison
from rag_backup.engines.postgres import roles as pg_roles
from rag_backup.engines.postgres.archive import (
    _unpack,
    create_database_sql,
    database_properties,
    read_archive,
)
from rag_backup.engines.postgres.common import MAX_IDENTIFIER, Log, _quiet
from rag_backup.engines.postgres.compare import _compare
from rag_backup.engines.postgres.fingerprint import _expected, fingerprint_of
from rag_backup.engines.postgres.scratch import _drop_database
from rag_backup.engines.postgres.server import PostgresServer, _database_exists
from rag_backup.errors import (
    ConfirmationRequired,
    IntegrityError,
    InvalidRequest,
    StoreUnreachable,
)
from rag_backup.proc import StreamingProcess, tail
from rag_backup.repository import BackupRecord, BackupRepository


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
            contents = read_archive(server.tool("pg_restore"), str(archive), tmp,
                                    timeout_s=timeout_s)
            if restore_roles:
                roles = pg_roles.restore_roles(
                    admin, pg_roles.read_globals(repo, record), connecting_user=server.user,
                    with_passwords=fingerprint_of(record).globals_include_role_passwords,
                    update_existing=update_existing_roles, log=log)
            with admin.cursor() as cur:
                cur.execute(create_database_sql(
                    staging, database_properties(contents), expected))
            try:
                argv = [server.tool("pg_restore"), f"--jobs={max(1, jobs)}", "--exit-on-error",
                        "--no-password", f"--dbname={server.dsn(staging)}"]
                if no_owner:
                    argv.append("--no-owner")
                _pg_restore([*argv, str(archive)], admin, staging, archive.stat().st_size,
                            what=f"pg_restore into {staging!r} on {server.describe()}",
                            label=f"pg_restore of {source_database} into {target_database}",
                            timeout_s=timeout_s, env=server.env())
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


def _pg_restore(argv: list[str], admin, staging: str, archive_bytes: int, *, what: str,
                label: str, timeout_s: float, env: dict[str, str]) -> None:
    """Run ``pg_restore`` (``what`` names it in errors), its progress (``label``) followed as
    the staging database's growth, since pg_restore reports none: about the archive's size in
    all, more with the indexes, hence an estimate."""
    def size() -> int:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_database_size(%s)", (staging,))
            return int(cur.fetchone()[0])

    empty = size()  # the new database's own catalogs: not restored data
    proc = StreamingProcess(argv, what=what, timeout=timeout_s, env=env, stdout=False)
    try:
        with progress.tracking(label, archive_bytes, estimated=True):
            progress.follow(proc.proc, lambda: size() - empty)
            proc.wait()
    except BaseException:
        proc.abort()
        raise


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
