"""Restore PostgreSQL to a point in time: a verified base backup, the archived WAL after it,
and PostgreSQL's own recovery replaying it up to the target, in an instance of our own.

``plan`` decides everything before anything changes, and refuses what cannot be done with the
times that can: a target before the oldest base backup, after the newest archived WAL, a
missing segment on the way (named), an unknown timeline, an unknown restore point.

``restore`` then extracts the base backup, places exactly the WAL the recovery needs (digests
checked) beside it, and starts PostgreSQL with ``restore_command`` reading that directory and
``recovery_target_*`` set; it promotes at the target. The result goes where asked:

- ``scratch``: the recovered instance itself, on a port of its own, left running for
  inspection or stopped and removed;
- ``databases``: chosen databases copied out of the recovered instance into a target server
  with the whole fidelity of the logical restore (a logical backup of the copy, restored and
  compared by the logical restore engine), under new names unless an existing one is confirmed;
- ``in_place``: a stopped server's data directory replaced by the recovered one (the old one
  kept beside it, renamed), only when ``confirm`` names the directory.

Why the WAL is placed before the start rather than fetched by ``restore_command`` on demand: a
command per segment would start a process per 16 MB and need the repository's credentials in
the server's environment; placing the segments lets us fetch them in parallel, check them, and
hand the server nothing but a ``cp``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rag_backup.engines.comparison import Comparison
from rag_backup.engines.postgres.common import Log, _quiet
from rag_backup.engines.postgres.pitr.basebackup import (
    BASE_STORE,
    BaseBackupFingerprint,
    extract_base_backup,
    fingerprint_of,
)
from rag_backup.engines.postgres.pitr.instance import PgInstance
from rag_backup.engines.postgres.pitr.wal import (
    WalIndex,
    archive_status,
    copy_histories,
    fetch_segments,
    format_lsn,
    parse_lsn,
    segno_of,
)
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import (
    BackupNotFound,
    ConfirmationRequired,
    InvalidRequest,
    RagBackupError,
)
from rag_backup.repository import BackupRecord, BackupRepository, WalSegment
from rag_backup.repository.manifest import _aware

LATEST = "latest"
MODES = ("scratch", "databases", "in_place")
# The unix socket lies in a 0700 directory of the server's OS user: only that user and root
# reach it, and we connect through it (the source's role may have no password we know). Over
# TCP, the copy's own roles log in with their own passwords (an operator inspecting it).
RECOVERY_HBA = ("# Written by rag-backup for a recovered copy.\n"
                "local all all trust\n"
                "host  all all 127.0.0.1/32 md5\n")


# -- what is asked -------------------------------------------------------------------------
@dataclass(frozen=True)
class PitrTarget:
    """The point to recover to: a time (``None`` with ``latest``: the end of the archive), or
    an LSN, or a named restore point; on a timeline (``None``: the newest)."""

    time: datetime | None = None
    lsn: int | None = None
    name: str | None = None
    timeline: int | None = None
    inclusive: bool = True

    @classmethod
    def parse(cls, target_time: str = LATEST, target_lsn: str = "", target_name: str = "",
              timeline: int | None = None, inclusive: bool = True) -> PitrTarget:
        chosen = [what for what, value in (("target_lsn", target_lsn),
                                            ("target_name", target_name)) if value]
        text = (target_time or LATEST).strip()
        if text != LATEST:
            chosen.insert(0, "target_time")
        if len(chosen) > 1:
            raise InvalidRequest(f"give one recovery target, not {' and '.join(chosen)}")
        when = None
        if text != LATEST:
            try:
                when = _aware(text, "target_time")
            except ValueError as exc:
                raise InvalidRequest(f"target_time {text!r} is not an ISO 8601 time (like "
                                     "2026-11-30T14:32:00+00:00) nor 'latest'") from exc
        return cls(when, parse_lsn(target_lsn) if target_lsn else None,
                   target_name.strip() or None, timeline, inclusive)

    @property
    def latest(self) -> bool:
        return self.time is None and self.lsn is None and self.name is None

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.lsn is not None:
            return f"LSN {format_lsn(self.lsn)}"
        if self.name is not None:
            return f"restore point {self.name!r}"
        return "the end of the archived WAL (latest)"


@dataclass(frozen=True)
class Reachable:
    """The times a recovery can reach: from the oldest verified base backup's consistency
    point to the newest time the archive held everything the server had written."""

    earliest: datetime | None
    latest: datetime | None

    def describe(self) -> str:
        if self.earliest is None:
            return "no time is reachable: there is no verified base backup"
        end = self.latest.isoformat() if self.latest else "(unknown: no archived WAL after it)"
        return f"reachable: {self.earliest.isoformat()} .. {end}"


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PitrPlan:
    target: PitrTarget
    base: BackupRecord
    base_fp: BaseBackupFingerprint
    timeline: int
    segments: tuple[WalSegment, ...]
    stop_expected: bool  # the placed WAL holds the target (else: replay to its end)
    reachable: Reachable

    @property
    def wal_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def settings(self, wal_dir: Path) -> dict[str, str]:
        settings = {"restore_command": f"cp '{wal_dir}/%f' '%p'",
                    "recovery_target_timeline": str(self.timeline),
                    "recovery_target_action": "promote",
                    "archive_mode": "off", "hot_standby": "on"}
        if not self.stop_expected:  # no transaction after the target: replay everything
            return settings
        if self.target.time is not None:
            settings["recovery_target_time"] = self.target.time.isoformat()
        elif self.target.lsn is not None:
            settings["recovery_target_lsn"] = format_lsn(self.target.lsn)
        elif self.target.name is not None:
            settings["recovery_target_name"] = self.target.name
        settings["recovery_target_inclusive"] = "on" if self.target.inclusive else "off"
        return settings


def verified_bases(repo: BackupRepository, allow_unverified: bool = False
                   ) -> list[tuple[BackupRecord, BaseBackupFingerprint]]:
    """The base backups a recovery may start from, oldest consistency point first."""
    found = []
    for record in repo.list_backups(BASE_STORE):
        if record.verified or allow_unverified:
            found.append((record, fingerprint_of(record)))
    return sorted(found, key=lambda pair: pair[1].consistent_at)


def reachable(repo: BackupRepository, bases=None, index: WalIndex | None = None) -> Reachable:
    bases = verified_bases(repo) if bases is None else bases
    if not bases:
        return Reachable(None, None)
    index = index or WalIndex.read(repo)
    status = archive_status(repo)
    latest = status.caught_up_at if status is not None else None
    commits = [s.last_commit_at for s in index.segments.values() if s.last_commit_at]
    if latest is None and commits:
        latest = max(commits)
    return Reachable(bases[0][1].consistent_at, latest)


def plan(repo: BackupRepository, target: PitrTarget, *, allow_unverified: bool = False
         ) -> PitrPlan:
    """Choose the base backup and the WAL for ``target``, or refuse (``InvalidRequest``,
    ``BackupNotFound``) saying why and which times are reachable. Reads only."""
    bases = verified_bases(repo, allow_unverified)
    if not bases:
        raise BackupNotFound(f"no {'' if allow_unverified else 'verified '}base backup in "
                             f"{repo.root_location}/{BASE_STORE}: point-in-time recovery starts "
                             "from one (run postgres_base_backup, then its verification)")
    index = WalIndex.read(repo)
    span = reachable(repo, bases, index)
    path = index.path(target.timeline)
    timeline = path[-1].tli
    on_path = [(r, fp) for r, fp in bases if any(t.tli == fp.timeline and
                                                 t.begin <= parse_lsn(fp.start_lsn) and
                                                 (t.end is None or parse_lsn(fp.end_lsn) <= t.end)
                                                 for t in path)]
    if not on_path:
        raise InvalidRequest(f"no verified base backup lies on timeline {timeline}'s history "
                             f"({', '.join(str(t.tli) for t in path)}); {span.describe()}")
    if target.time is not None:
        if target.time < on_path[0][1].consistent_at:
            raise InvalidRequest(f"cannot recover to {target.describe()}: it is before the "
                                 f"oldest verified base backup "
                                 f"({on_path[0][1].consistent_at.isoformat()}); "
                                 f"{span.describe()}")
        if span.latest is None or target.time > span.latest:
            raise InvalidRequest(f"cannot recover to {target.describe()}: it is after the "
                                 "newest archived WAL (what the server wrote since is not in "
                                 f"the archive); {span.describe()}")
        record, fp = [pair for pair in on_path if pair[1].consistent_at <= target.time][-1]
    elif target.lsn is not None:
        fitting = [pair for pair in on_path if parse_lsn(pair[1].end_lsn) <= target.lsn]
        if not fitting:
            raise InvalidRequest(f"cannot recover to {target.describe()}: it is before the end "
                                 f"of the oldest verified base backup "
                                 f"({on_path[0][1].end_lsn}); {span.describe()}")
        record, fp = fitting[-1]
    else:
        record, fp = on_path[-1] if target.latest else on_path[0]
    first = segno_of(fp.start_segment, index.seg_size)
    archived = [s for s in index.on_path(path) if segno_of(s.name, index.seg_size) >= first]
    try:
        last, stop_expected = _last_needed(target, archived, index, fp)
    except InvalidRequest:
        if archived:  # a missing segment may hold the restore point: the gap is the news
            newest = segno_of(archived[-1].name, index.seg_size)
            missing = index.chain(first, newest, path)[1]
            if missing:
                raise InvalidRequest(
                    f"cannot recover to {target.describe()}: it is in no archived segment, and "
                    f"the WAL archive has a gap after base backup {record.partition_key}: "
                    f"{', '.join(missing[:10])} missing; {span.describe()}") from None
        raise
    segments, missing = index.chain(first, last, path)
    if missing:
        raise InvalidRequest(
            f"cannot recover to {target.describe()} from base backup {record.partition_key} "
            f"({record.backup_id}): the WAL archive has a gap: {len(missing)} segment(s) "
            f"missing on the way: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            f"; {span.describe()}")
    return PitrPlan(target, record, fp, timeline, tuple(segments), stop_expected, span)


def _last_needed(target: PitrTarget, archived: Sequence[WalSegment], index: WalIndex,
                 fp: BaseBackupFingerprint) -> tuple[int, bool]:
    """The last segment number the recovery reads, and whether it will find the target in
    the placed WAL (a transaction end after the target time, the LSN, the restore point)."""
    end = segno_of(fp.end_segment, index.seg_size)
    newest = max([segno_of(s.name, index.seg_size) for s in archived] + [end])
    if target.time is not None:
        unknown = False  # a segment whose commit times could not be read may hold later ones
        for segment in archived:
            if segment.commits is None:
                unknown = True
            elif segment.last_commit_at is not None and segment.last_commit_at > target.time:
                return max(segno_of(segment.name, index.seg_size), end), True
        # Nothing committed after the target: its state is the archive's end (replayed without
        # a target, which PostgreSQL would refuse for lack of a later commit). Unless times
        # were unreadable: then the target is kept, and PostgreSQL says if it is not found.
        return newest, unknown
    if target.lsn is not None:
        wanted = target.lsn // index.seg_size
        if wanted > newest:
            raise InvalidRequest(f"cannot recover to {target.describe()}: the archive ends at "
                                 f"{format_lsn((newest + 1) * index.seg_size)}")
        return max(min(wanted + 1, newest), end), True
    if target.name is not None:
        for segment in archived:
            if target.name in segment.restore_points:
                return max(segno_of(segment.name, index.seg_size), end), True
        points = sorted({p for s in archived for p in s.restore_points})
        raise InvalidRequest(f"the archived WAL after base backup {fp.start_segment} has no "
                             f"restore point named {target.name!r}; it has: "
                             f"{', '.join(points) or 'none'}")
    return newest, False


# -- where the result goes -----------------------------------------------------------------
@dataclass(frozen=True)
class Into:
    """Where the recovered cluster goes (see the module's docstring)."""

    mode: str = "scratch"
    work_dir: Path | None = None  # scratch: where the copy lives (default: a new temp dir)
    port: int = 0  # scratch: the copy's port (0: a free one)
    keep_running: bool = False  # scratch: leave the copy running for inspection
    databases: tuple[str, ...] = ()  # databases: which ones
    target_server: PostgresServer | None = None  # databases: where they go
    target_names: dict[str, str] = field(default_factory=dict)  # databases: renames
    data_directory: Path | None = None  # in_place: the stopped server's data directory
    os_user: str | None = None  # the OS user the recovered server runs as
    slot: str = "rag_backup"  # in_place: the WAL receiver's replication slot, created in it
    confirm: str = ""  # in_place: the directory; databases: the existing databases replaced,
    #                    comma-separated

    def check(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "databases" and (not self.databases or self.target_server is None):
            raise InvalidRequest("mode 'databases' needs the databases to extract and a "
                                 "target server")
        if self.mode == "in_place":
            if self.data_directory is None:
                raise InvalidRequest("mode 'in_place' needs the data directory to replace")
            if self.confirm != str(self.data_directory):
                raise ConfirmationRequired(
                    f"replacing the data directory {self.data_directory} destroys what it "
                    f"holds (it is kept aside, renamed); set confirm to exactly "
                    f"{str(self.data_directory)!r} to allow it")
            pid_file = self.data_directory / "postmaster.pid"
            if pid_file.exists() and _pid_alive(pid_file):
                raise InvalidRequest(f"the server of {self.data_directory} is running "
                                     f"({pid_file} names a live process): stop it first")
            if not (self.data_directory / "PG_VERSION").exists():
                raise InvalidRequest(f"{self.data_directory} is not a PostgreSQL data "
                                     "directory (no PG_VERSION)")


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True


@dataclass
class PitrReport:
    target: str
    mode: str
    base_backup: str
    base_partition: str
    timeline: int
    reached_at: datetime | None
    stop: str | None
    wal_segments: int
    wal_bytes: int
    fetch_s: float
    extract_s: float
    replay_s: float
    duration_s: float
    port: int | None = None
    data_directory: str | None = None
    running: bool = False
    kept_aside: str | None = None
    databases: dict[str, str] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    rows: int = 0  # databases mode: the rows restored

    @property
    def matches(self) -> bool:
        return all(c.matches for c in self.comparisons.values())

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if k != "comparisons"}
        doc["reached_at"] = self.reached_at.isoformat() if self.reached_at else None
        doc["comparisons"] = {k: c.to_dict() for k, c in self.comparisons.items()}
        return doc


# -- the restore ---------------------------------------------------------------------------
def recover(repo: BackupRepository, chosen: PitrPlan, data_dir: Path, wal_dir: Path,
            credentials: PostgresServer, *, port: int = 0, os_user: str | None = None,
            timeout_s: float = 6 * 3600, log: Log = _quiet) -> tuple[PgInstance, dict]:
    """Extract, place the WAL, start and recover; returns the running, promoted instance and
    the timings. On failure the instance is stopped (its files are the caller's)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    extract_base_backup(repo, chosen.base, data_dir, timeout_s=timeout_s)
    timings["extract_s"] = time.monotonic() - started
    log(f"base backup {chosen.base.partition_key} ({chosen.base.backup_id}) extracted into "
        f"{data_dir} in {timings['extract_s']:.1f} s")
    started = time.monotonic()
    fetch_segments(repo, [s.name for s in chosen.segments], wal_dir)
    copy_histories(repo, wal_dir)
    timings["fetch_s"] = time.monotonic() - started
    log(f"{len(chosen.segments)} WAL segment(s) ({chosen.wal_bytes / 1e6:.0f} MB) placed in "
        f"{timings['fetch_s']:.1f} s")
    instance = PgInstance(data_dir, port=port, os_user=os_user)
    for stale in ("postmaster.pid", "standby.signal", "backup_manifest"):
        (data_dir / stale).unlink(missing_ok=True)
    (data_dir / "recovery.signal").touch()
    instance.prepare_ownership(shared=[wal_dir])
    instance.configure(chosen.settings(wal_dir), hba=RECOVERY_HBA)
    server = private_server(instance, credentials)
    started = time.monotonic()
    try:
        instance.start(timeout_s=120)
        instance.wait_recovery_finished(server, timeout_s=timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            instance.stop(mode="immediate")
        raise
    timings["replay_s"] = time.monotonic() - started
    return instance, timings


def reached_time(chosen: PitrPlan, last_transaction: datetime | None) -> datetime | None:
    """The time the copy's state is from: its newest replayed transaction; with none replayed
    (nothing committed since the base backup), the target time or the archive's end."""
    if last_transaction is not None:
        return last_transaction
    if chosen.target.time is not None:
        return chosen.target.time
    return chosen.reachable.latest or chosen.base_fp.consistent_at


def private_server(instance: PgInstance, credentials: PostgresServer) -> PostgresServer:
    """The recovered copy through its private unix socket, as the source's role."""
    return PostgresServer(str(instance.socket_dir), instance.port, credentials.user,
                          bin_dir=str(instance.bindir))


def restore(repo: BackupRepository, chosen: PitrPlan, into: Into,
            credentials: PostgresServer, *, timeout_s: float = 6 * 3600, jobs: int = 2,
            log: Log = _quiet) -> PitrReport:
    """Carry out ``chosen`` into ``into``; ``credentials``: a role of the source cluster (the
    copy has its roles and passwords). Refusals happen before anything changes."""
    into.check()
    began = time.monotonic()
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    if into.mode == "in_place":  # beside the directory: the swap is a rename
        assert into.data_directory is not None
        base, prefix = into.data_directory.parent, f".{into.data_directory.name}.pitr-{stamp}-"
    else:
        base, prefix = into.work_dir or Path(tempfile.gettempdir()), f"rag-pitr-{stamp}-"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # unique, whoever runs at once
    data_dir, wal_dir = work / "data", work / "wal"
    log(f"recovering to {chosen.target.describe()} from base backup "
        f"{chosen.base.partition_key} with {len(chosen.segments)} WAL segment(s) in {work}")
    keep = False
    try:
        instance, timings = recover(repo, chosen, data_dir, wal_dir, credentials,
                                    port=into.port if into.mode == "scratch" else 0,
                                    os_user=into.os_user or _owner_of(into), timeout_s=timeout_s,
                                    log=log)
        summary = instance.recovery_summary()
        report = PitrReport(
            chosen.target.describe(), into.mode, chosen.base.backup_id,
            chosen.base.partition_key, summary.new_timeline or chosen.timeline,
            reached_time(chosen, summary.last_transaction_at), summary.stop,
            summary.restored_wal_files or
            len(chosen.segments), chosen.wal_bytes, round(timings["fetch_s"], 3),
            round(timings["extract_s"], 3), round(timings["replay_s"], 3), 0.0)
        log(f"recovered: {summary.stop or 'replayed to the end of the placed WAL'}; the copy's "
            f"newest transaction is from {report.reached_at}")
        if into.mode == "scratch":
            report.port, report.data_directory = instance.port, str(data_dir)
            if into.keep_running:
                keep = True
                report.running = True
                log(f"the recovered copy runs on 127.0.0.1:{instance.port} (data {data_dir}); "
                    f"stop it with: pg_ctl stop -D {data_dir}")
            else:
                instance.stop()
        elif into.mode == "databases":
            try:
                _extract_databases(instance, credentials, into, report, timeout_s, jobs, log)
            finally:
                instance.stop()
        else:
            try:
                _continue_archiving(repo, instance, credentials, data_dir, into.slot, log)
            finally:
                instance.stop()
            report.kept_aside = _swap_in(data_dir, into.data_directory, stamp, log)
            report.data_directory = str(into.data_directory)
        report.duration_s = round(time.monotonic() - began, 3)
        return report
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _continue_archiving(repo: BackupRepository, instance: PgInstance,
                        credentials: PostgresServer, data_dir: Path, slot: str,
                        log: Log) -> None:
    """A cluster restored in place goes on writing WAL on its new timeline: its history file
    goes into the archive now (so recovery plans follow the new timeline at once), and the
    WAL receiver's slot is created in it before it is first stopped (slots are not in base
    backups; without one the new timeline's first WAL would be lost)."""
    for history in sorted((data_dir / "pg_wal").glob("*.history")):
        repo.wal.put_history(history.name, history.read_bytes())
    conn = private_server(instance, credentials).connect("postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            if cur.fetchone() is None:
                cur.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
    finally:
        conn.close()
    log(f"the restored cluster keeps the WAL receiver's slot {slot!r}; its new timeline's "
        "history is in the archive")


def _owner_of(into: Into) -> str | None:
    """In place, the recovered server runs as the directory's owner."""
    if into.mode != "in_place" or into.data_directory is None or os.geteuid() != 0:
        return None
    import pwd
    return pwd.getpwuid(into.data_directory.stat().st_uid).pw_name


def _swap_in(recovered: Path, target: Path, stamp: str, log: Log) -> str:
    """Put the recovered data directory in ``target``'s place; the old one is renamed beside
    it, its configuration files carried over (the server starts as before)."""
    aside = target.with_name(f"{target.name}.before-pitr-{stamp}")
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf"):
        old = target / name
        if old.exists():
            shutil.copy2(old, recovered / name)
    (recovered / "recovery.signal").unlink(missing_ok=True)
    stat = target.stat()
    os.rename(target, aside)
    os.rename(recovered, target)
    with contextlib.suppress(PermissionError):
        for root, dirs, files in os.walk(target):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), stat.st_uid, stat.st_gid)
        os.chown(target, stat.st_uid, stat.st_gid)
    log(f"{target} now holds the recovered cluster; the old one is kept at {aside} (remove it "
        "once the server runs as it should)")
    return str(aside)


def _extract_databases(instance: PgInstance, credentials: PostgresServer, into: Into,
                       report: PitrReport, timeout_s: float, jobs: int, log: Log) -> None:
    """Copy the chosen databases out of the recovered instance into the target server, with
    the logical engine: a backup of the copy into a private repository, then its restore
    (staging database, comparison with the archive, swap-in)."""
    from rag_backup.engines.postgres import backup as logical_backup
    from rag_backup.engines.postgres import restore as logical_restore
    from rag_backup.repository import FilesystemBackend

    assert into.target_server is not None
    source = private_server(instance, credentials)
    with tempfile.TemporaryDirectory(prefix="rag-pitr-dump-") as tmp:
        private = BackupRepository(FilesystemBackend(tmp))
        with private.begin("postgres", "pitr", "pitr") as pending:
            outcome = logical_backup(source, pending, databases=list(into.databases),
                                     timeout_s=timeout_s, log=log)
            pending.commit(outcome)
        record = private.get("postgres", "pitr")
        assert record is not None
        stamp = f"{datetime.now(timezone.utc):%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:4]}"
        confirmed = {name.strip() for name in into.confirm.split(",") if name.strip()}
        for database in into.databases:
            name = into.target_names.get(database) or f"{database[:40]}_pitr_{stamp}"
            confirm = name if name in confirmed else ""
            restored = logical_restore(private, record, into.target_server,
                                       source_database=database, target_database=name,
                                       confirm=confirm, jobs=jobs, timeout_s=timeout_s,
                                       log=log)
            report.databases[database] = restored.target_database
            report.comparisons[database] = restored.comparison
            report.rows += restored.rows
            log(f"database {database!r} at {report.reached_at} -> {restored.target_database!r}"
                f" on {into.target_server.describe()}: {restored.rows} rows, "
                f"{'matches' if restored.comparison.matches else 'DIFFERS'}")


def restore_to_time(repo: BackupRepository, credentials: PostgresServer, *,
                    target: PitrTarget, into: Into, timeout_s: float = 6 * 3600,
                    allow_unverified: bool = False, log: Log = _quiet) -> PitrReport:
    """Plan (refusing before anything changes), then restore."""
    into.check()
    chosen = plan(repo, target, allow_unverified=allow_unverified)
    return restore(repo, chosen, into, credentials, timeout_s=timeout_s, log=log)


__all__ = ["Into", "LATEST", "PitrPlan", "PitrReport", "PitrTarget", "Reachable", "RagBackupError",
           "plan", "reachable", "recover", "restore", "restore_to_time", "verified_bases"]
