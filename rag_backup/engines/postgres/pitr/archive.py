"""The WAL archive's health and upkeep: a base backup verified with its WAL, an hour of WAL
checked for continuity, the lag (RPO) measured against the server, and WAL retention that
keeps every retained base backup recoverable.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg2

from rag_backup.engines.postgres.common import Log, _quiet
from rag_backup.engines.postgres.pitr.basebackup import (
    BASE_STORE,
    fingerprint_of,
    verify_base_backup,
)
from rag_backup.engines.postgres.pitr.wal import (
    ArchiveStatus,
    WalIndex,
    archive_status,
    fetch_segments,
    format_lsn,
    parse_lsn,
    segno_of,
)
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import IntegrityError, StoreUnreachable, ToolError
from rag_backup.proc import tail
from rag_backup.repository import BackupRecord, BackupRepository, WalSegment


def wait_for_wal(repo: BackupRepository, names: list[str], timeout_s: float,
                 poll_s: float = 2.0) -> None:
    """Wait until the archive holds every segment of ``names`` (the receiver archives a base
    backup's last segment within seconds: the backup's end switches segments); ``ToolError``
    naming those still missing, and the receiver's status, when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [name for name in names if repo.wal.get(name) is None]
        if not missing:
            return
        if time.monotonic() > deadline:
            status = repo.wal.read_status()
            said = (f"the receiver last reported at {status.get('updated_at')}: archived up to "
                    f"{status.get('archived_lsn')}, last error {status.get('last_error')}"
                    if status else "no WAL receiver has ever reported to this repository")
            raise ToolError(f"the WAL archive at {repo.wal.location()} still lacks "
                            f"{', '.join(missing[:10])} after {timeout_s:.0f} s: is the WAL "
                            f"receiver (python -m rag_backup wal-receiver) running? {said}")
        time.sleep(poll_s)


def verify_with_wal(repo: BackupRepository, record: BackupRecord, *, timeout_s: float,
                    wal_wait_s: float = 600.0, work_root: Path | None = None,
                    log: Log = _quiet) -> dict[str, Any]:
    """A base backup verified the full way: its artifact's sha256, every file against its
    ``backup_manifest`` and the WAL that makes it consistent parsed (``pg_verifybackup``), that
    WAL taken from the archive with its digests checked."""
    fp = fingerprint_of(record)
    names = fp.wal_segments()
    wait_for_wal(repo, names, wal_wait_s)
    work = Path(tempfile.mkdtemp(prefix="rag-verify-base-", dir=work_root))
    try:
        fetch_segments(repo, names, work / "wal")
        return verify_base_backup(repo, record, wal_dir=work / "wal", work_dir=work,
                                  timeout_s=timeout_s, log=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- an hour of WAL ------------------------------------------------------------------------
@dataclass
class HourCheck:
    """The segments archived in one hour, checked: present, digests right, and no gap from the
    segment before the hour to the one after it."""

    start: datetime
    end: datetime
    segments: list[str] = field(default_factory=list)
    bytes: int = 0
    stored_bytes: int = 0
    commits: int = 0
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    previous: str | None = None
    following: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged

    def problems(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} segment(s) missing (a gap): "
                         f"{', '.join(self.missing[:20])}")
        if self.damaged:
            parts.append(f"{len(self.damaged)} damaged: {'; '.join(self.damaged[:10])}")
        return "; ".join(parts)


def check_hour(repo: BackupRepository, start: datetime, end: datetime,
               timeline: int | None = None) -> HourCheck:
    """Check the WAL archived in [``start``, ``end``) (by archive time), and the continuity
    from the newest segment archived before it to the first archived after it."""
    index = WalIndex.read(repo)
    path = index.path(timeline)
    ordered = index.on_path(path)
    result = HourCheck(start, end)
    result.damaged = [exc.args[0] if exc.args else str(exc) for exc in index.damaged]
    inside = [s for s in ordered if start <= s.archived_at < end]
    before = [s for s in ordered if s.archived_at < start]
    after = [s for s in ordered if s.archived_at >= end]
    result.previous = before[-1].name if before else None
    result.following = after[0].name if after else None
    for segment in inside:
        problem = repo.wal.check(segment)
        if problem:
            result.damaged.append(f"{segment.name}: {problem}")
        result.segments.append(segment.name)
        result.bytes += segment.size
        result.stored_bytes += segment.stored_size
        result.commits += segment.commits or 0
    span = ([before[-1]] if before else []) + inside + ([after[0]] if after else [])
    if len(span) >= 2:
        first = segno_of(span[0].name, index.seg_size)
        last = segno_of(span[-1].name, index.seg_size)
        result.missing = index.chain(first, last, path)[1]
    return result


# -- the lag -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lag:
    """The archive's lag against the server now: ``seconds`` of written WAL not archived
    (``None``: unknown, e.g. no receiver ever reported), and what it was measured from."""

    seconds: float | None
    server_lsn: str | None
    archived_lsn: str | None
    status_age_s: float | None
    slot: dict | None
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, problems=list(self.problems))


def current_lag(repo: BackupRepository, server: PostgresServer, *,
                slot: str = "rag_backup") -> Lag:
    """The lag now: 0 if the archive holds what the server has flushed, else the time since
    the receiver last saw the archive hold everything. Also what the slot retains, so a slot
    that lets the server's disk fill is reported."""
    now = datetime.now(timezone.utc)
    status: ArchiveStatus | None = archive_status(repo)
    problems = []
    server_lsn, slot_info, timeline, answered = None, None, None, False
    try:
        conn = server.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_current_wal_flush_lsn()::text, ('x' || substr("
                            "pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int")
                position, timeline = cur.fetchone()
                server_lsn = parse_lsn(position)
                cur.execute("SELECT active, wal_status, safe_wal_size, pg_wal_lsn_diff("
                            "pg_current_wal_lsn(), restart_lsn)::bigint FROM "
                            "pg_replication_slots WHERE slot_name = %s", (slot,))
                row = cur.fetchone()
        finally:
            conn.close()
        answered = True
        if row is None:
            problems.append(f"the replication slot {slot!r} does not exist on "
                            f"{server.describe()}: no WAL receiver is set up")
        else:
            slot_info = {"name": slot, "active": row[0], "wal_status": row[1],
                         "safe_wal_size": row[2], "retained_bytes": row[3]}
            if not row[0]:
                problems.append(f"the replication slot {slot!r} is not in use: the WAL "
                                "receiver is not connected")
            if row[1] in ("unreserved", "lost"):
                problems.append(f"the replication slot {slot!r} is {row[1]}: the server "
                                "removed or will remove WAL the archive has not received "
                                "(max_slot_wal_keep_size reached)")
    except (StoreUnreachable, psycopg2.Error) as exc:
        problems.append(f"{server.describe()} could not be asked for its WAL position: "
                        f"{tail(str(exc), 500)}")
    if status is None:
        problems.append(f"no WAL receiver has reported to {repo.wal.location()}")
        return Lag(None, _fmt(server_lsn), None, None, slot_info, tuple(problems))
    if timeline is not None and status.timeline is not None and timeline != status.timeline:
        problems.append(f"the server is on timeline {timeline}, the receiver last reported "
                        f"timeline {status.timeline}: it has not caught up since the server "
                        "changed timeline (restored in place, or promoted)")
    seconds = status.lag_s(now, server_lsn, timeline)
    return Lag(None if seconds is None else round(seconds, 1), _fmt(server_lsn),
               _fmt(status.archived_lsn), round((now - status.updated_at).total_seconds(), 1),
               slot_info if answered else status.slot, tuple(problems))


def _fmt(lsn: int | None) -> str | None:
    return format_lsn(lsn) if lsn is not None else None


# -- retention -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WalPruning:
    keep_from: str | None  # the oldest segment kept (the oldest retained base backup's first)
    deleted: tuple[str, ...]
    bytes: int


def prune_wal(repo: BackupRepository, *, dry_run: bool = False) -> WalPruning:
    """Delete the segments no retained base backup needs: those before the first segment of
    the oldest base backup still in the repository. With no base backup, nothing is deleted
    (the WAL may be all there is)."""
    bases = [fingerprint_of(r) for r in repo.list_backups(BASE_STORE)]
    if not bases:
        return WalPruning(None, (), 0)
    index = WalIndex.read(repo)
    oldest = min(bases, key=lambda fp: parse_lsn(fp.start_lsn))
    first = segno_of(oldest.start_segment, index.seg_size)
    doomed: list[WalSegment] = [s for s in index.segments.values()
                                if segno_of(s.name, index.seg_size) < first]
    if not dry_run:
        repo.wal.delete(s.name for s in doomed)
    return WalPruning(oldest.start_segment, tuple(sorted(s.name for s in doomed)),
                      sum(s.stored_size for s in doomed))


def check_segment(repo: BackupRepository, name: str) -> None:
    """``IntegrityError`` if archived segment ``name`` is missing or differs from its record."""
    segment = repo.wal.get(name)
    if segment is None:
        raise IntegrityError(f"WAL segment {name} is not in {repo.wal.location()}")
    problem = repo.wal.check(segment)
    if problem:
        raise IntegrityError(f"WAL segment {name}: {problem}")
