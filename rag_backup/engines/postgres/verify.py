"""Verification of a PostgreSQL backup: every artifact's size and sha256, and every archive
decompressed and listed by ``pg_restore --list``, with data for every table of the fingerprint.
"""

from __future__ import annotations

import tempfile
from typing import Any

from rag_backup import progress
from rag_backup.engines.postgres.common import DUMP_SUFFIX, GLOBALS_ARTIFACT
from rag_backup.engines.postgres.fingerprint import fingerprint_of
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.engines.zstream import decompress_artifact
from rag_backup.errors import IntegrityError
from rag_backup.proc import StreamingProcess
from rag_backup.repository import BackupRecord, BackupRepository


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
    with progress.tracking(f"verifying postgres backup {manifest.partition_key}",
                           sum(a.size for a in manifest.artifacts)):
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
