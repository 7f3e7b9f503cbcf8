"""The WAL archive as PostgreSQL sees it: LSNs and segment names, timelines and their history,
which segments a recovery needs and which are missing, the commit times a segment holds, and
the archive's status (how far behind the server it is: the RPO).

Storage (compression, digests, layout) is the repository's (``repo.wal``); this module knows
PostgreSQL's side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rag_backup import progress
from rag_backup.errors import BackupNotFound, DamagedBackup, InvalidRequest
from rag_backup.proc import StreamingProcess
from rag_backup.repository import BackupRepository, WalSegment
from rag_backup.repository.manifest import _aware

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
FETCH_WORKERS = 4
WALDUMP_TIMEOUT_S = 120.0
# pg_waldump's description of a transaction's end: recovery to a time stops at these.
XACT_END = re.compile(rb"desc: (?:COMMIT|ABORT)(?:_PREPARED)? "
                      rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


# -- LSNs and segment names ----------------------------------------------------------------
def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` as an integer; ``InvalidRequest`` for anything else."""
    high, sep, low = (text or "").strip().partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError as exc:
        raise InvalidRequest(f"{text!r} is not a PostgreSQL LSN (like 16/B374D848)") from exc


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _per_id(seg_size: int) -> int:
    return 0x100000000 // seg_size


def segment_name(timeline: int, segno: int, seg_size: int = DEFAULT_SEGMENT_BYTES) -> str:
    per_id = _per_id(seg_size)
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def segno_of(name: str, seg_size: int = DEFAULT_SEGMENT_BYTES) -> int:
    return int(name[8:16], 16) * _per_id(seg_size) + int(name[16:24], 16)


def segment_of_lsn(timeline: int, lsn: int, seg_size: int = DEFAULT_SEGMENT_BYTES) -> str:
    return segment_name(timeline, lsn // seg_size, seg_size)


# -- timelines -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Timeline:
    """A timeline on the path to the target one: it holds WAL from ``begin`` (an LSN; 0 for
    the first) up to ``end`` (``None``: the target timeline, open-ended)."""

    tli: int
    begin: int
    end: int | None


def parse_history(data: bytes) -> list[tuple[int, int]]:
    """A ``<TLI>.history`` file's entries: (parent timeline, LSN where it ended)."""
    entries = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        entries.append((int(fields[0]), parse_lsn(fields[1])))
    return entries


def timeline_path(target: int, histories: dict[str, bytes]) -> list[Timeline]:
    """The timelines that lead to ``target``, oldest first (``InvalidRequest`` if timeline
    ``target`` > 1 has no history file in the archive)."""
    if target == 1:
        return [Timeline(1, 0, None)]
    data = histories.get(f"{target:08X}.history")
    if data is None:
        known = sorted(int(name[:8], 16) for name in histories) or [1]
        raise InvalidRequest(f"timeline {target} is not in the WAL archive (its history file "
                             f"is missing); the archive knows timelines "
                             f"{', '.join(map(str, [1, *known] if 1 not in known else known))}")
    path, begin = [], 0
    for tli, end in parse_history(data):
        path.append(Timeline(tli, begin, end))
        begin = end
    path.append(Timeline(target, begin, None))
    return path


def expected_name(segno: int, path: Sequence[Timeline], seg_size: int) -> str:
    """The file a recovery along ``path`` reads for ``segno``: the newest timeline that began
    at or before that segment (PostgreSQL's own rule)."""
    tli = next(t.tli for t in reversed(path) if t.begin // seg_size <= segno)
    return segment_name(tli, segno, seg_size)


def newest_timeline(segments: Iterable[WalSegment], histories: dict[str, bytes]) -> int:
    tlis = {s.timeline for s in segments} | {int(n[:8], 16) for n in histories} | {1}
    return max(tlis)


# -- the archive's contents ----------------------------------------------------------------
@dataclass
class WalIndex:
    """Every readable segment of the archive by name, the damaged records, the histories."""

    segments: dict[str, WalSegment]
    damaged: list[DamagedBackup]
    histories: dict[str, bytes]
    seg_size: int

    @classmethod
    def read(cls, repo: BackupRepository) -> WalIndex:
        found = repo.wal.segments()
        cluster = repo.wal.cluster() or {}
        return cls({s.name: s for s in found if isinstance(s, WalSegment)},
                   [s for s in found if isinstance(s, DamagedBackup)],
                   repo.wal.histories(),
                   int(cluster.get("wal_segment_size") or DEFAULT_SEGMENT_BYTES))

    def path(self, timeline: int | None = None) -> list[Timeline]:
        return timeline_path(timeline or newest_timeline(self.segments.values(),
                                                         self.histories), self.histories)

    def chain(self, first: int, last: int, path: Sequence[Timeline]
              ) -> tuple[list[WalSegment], list[str]]:
        """The segments ``first``..``last`` (segment numbers) along ``path``: those archived,
        and the names of those missing."""
        have, missing = [], []
        for segno in range(first, last + 1):
            name = expected_name(segno, path, self.seg_size)
            if name in self.segments:
                have.append(self.segments[name])
            else:
                missing.append(name)
        return have, missing

    def on_path(self, path: Sequence[Timeline]) -> list[WalSegment]:
        """The archived segments a recovery along ``path`` would read, in WAL order."""
        wanted = []
        for segment in self.segments.values():
            segno = segno_of(segment.name, self.seg_size)
            if expected_name(segno, path, self.seg_size) == segment.name:
                wanted.append(segment)
        return sorted(wanted, key=lambda s: segno_of(s.name, self.seg_size))

    def end_lsn(self, segment: WalSegment) -> int:
        return (segno_of(segment.name, self.seg_size) + 1) * self.seg_size


def fetch_segments(repo: BackupRepository, names: Sequence[str], dest: Path, *,
                   workers: int = FETCH_WORKERS) -> int:
    """Decompress segments ``names`` into directory ``dest`` (digests checked); returns the
    bytes written. ``BackupNotFound`` names every segment the archive lacks."""
    records = {name: repo.wal.get(name) for name in names}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise BackupNotFound(f"the WAL archive at {repo.wal.location()} lacks "
                             f"{len(missing)} segment(s): {', '.join(missing[:20])}")
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    with ThreadPoolExecutor(workers) as pool, progress.tracking(
            f"fetching {len(names)} WAL segment(s)", sum(r.size for r in records.values())):
        for size in pool.map(lambda r: repo.wal.read_to(r, dest / r.name), records.values()):
            written += size
            progress.advance(size)
    return written


def copy_histories(repo: BackupRepository, dest: Path) -> list[str]:
    """Every timeline history file of the archive into ``dest`` (recovery reads them)."""
    dest.mkdir(parents=True, exist_ok=True)
    histories = repo.wal.histories()
    for name, data in histories.items():
        (dest / name).write_bytes(data)
    return sorted(histories)


# -- commit times --------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitTimes:
    """What a segment says about time: its first and last transaction ends (commit or abort:
    a recovery to a time stops at these) and its named restore points."""

    first: datetime | None
    last: datetime | None
    count: int | None  # None: pg_waldump could not read the segment
    restore_points: tuple[str, ...] = ()


def commit_times(waldump: str, directory: Path, name: str, timeline: int) -> CommitTimes:
    """Read segment ``name`` with ``pg_waldump``: its transaction-end times and restore points.
    pg_waldump finds the segment's first record itself (it may begin in the previous one), and
    exits non-zero at the end of a switched segment ("invalid record length"): what it printed
    before is still right, so its exit status is not the verdict."""
    proc = StreamingProcess([waldump, f"--timeline={timeline}", f"--path={directory}", name],
                            what=f"pg_waldump of WAL segment {name}", timeout=WALDUMP_TIMEOUT_S,
                            env={"TZ": "UTC", "LC_ALL": "C"})
    assert proc.proc.stdout is not None
    first = last = None
    count, records = 0, 0
    points: list[str] = []
    try:
        for line in proc.proc.stdout:
            records += 1
            if b"desc: COMMIT" in line or b"desc: ABORT" in line:
                found = XACT_END.search(line)
                if found:
                    when = _aware(found.group(1).decode().replace(" ", "T"), "commit time")
                    first = first or when
                    last = when
                    count += 1
            elif b"desc: RESTORE_POINT " in line:
                points.append(line.split(b"desc: RESTORE_POINT ", 1)[1].strip().decode(
                    "utf-8", errors="replace"))
    finally:
        proc.abort()
    if records == 0:  # pg_waldump read nothing: unknown, not "no commits"
        return CommitTimes(None, None, None, ())
    return CommitTimes(first, last, count, tuple(points))


# -- status (the RPO) ----------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveStatus:
    """What the receiver last reported: the server's written position when it looked, the end
    of the newest archived WAL, and ``caught_up_at``: the newest time at which the archive held
    everything the server had written. The RPO at a moment is ``now - caught_up_at`` unless
    the archive holds the server's current position."""

    updated_at: datetime
    server_lsn: int | None
    archived_lsn: int | None  # the archive's end on ``timeline``
    caught_up_at: datetime | None
    receiver: str
    slot: dict | None
    timeline: int | None = None  # the server's timeline when the receiver looked

    def lag_s(self, now: datetime | None = None, server_lsn: int | None = None,
              timeline: int | None = None) -> float | None:
        """Seconds of WAL at risk now: 0 if the archive holds ``server_lsn`` on ``timeline``
        (the server's current position, if known), else the time since the archive last
        caught up. Positions on different timelines are not comparable."""
        if server_lsn is not None and self.archived_lsn is not None \
                and timeline is not None and timeline == self.timeline \
                and self.archived_lsn >= server_lsn:
            return 0.0
        if self.caught_up_at is None:
            return None
        return max(0.0, ((now or datetime.now(timezone.utc)) - self.caught_up_at
                         ).total_seconds())


def archive_status(repo: BackupRepository) -> ArchiveStatus | None:
    """The receiver's last status, or ``None`` if no receiver ever wrote one."""
    doc = repo.wal.read_status()
    if doc is None:
        return None
    where = repo.wal.location("postgres_wal/status.json")
    try:
        return ArchiveStatus(
            _aware(doc["updated_at"], "updated_at"),
            parse_lsn(doc["server_lsn"]) if doc.get("server_lsn") else None,
            parse_lsn(doc["archived_lsn"]) if doc.get("archived_lsn") else None,
            _aware(doc["caught_up_at"], "caught_up_at") if doc.get("caught_up_at") else None,
            str(doc.get("receiver", "")), doc.get("slot"),
            int(doc["timeline"]) if doc.get("timeline") is not None else None)
    except (KeyError, ValueError, InvalidRequest) as exc:
        raise DamagedBackup(f"the WAL archive status {where} is unreadable: {exc}",
                            file=where, error=str(exc)) from exc
