"""PostgreSQL base backups (``pg_basebackup``) into the repository, and their verification.

Why: point-in-time recovery replays archived WAL onto a physical copy of the cluster; the daily
logical dumps cannot take WAL. The copy streams: ``pg_basebackup -D - -Ft -X none`` writes one
tar to stdout (PostgreSQL 15 appends its ``backup_manifest`` to that tar as the last member) and
zstd compresses it into the artifact ``base.tar.zst``; nothing is staged on local disk.

``-X none``: the WAL the backup needs to become consistent (``start_segment`` ..
``end_segment`` of the fingerprint) comes from the WAL archive, which must hold it before the
backup can be verified or restored. With ``-X none`` pg_basebackup does not print its WAL range,
so the copy loop reads the manifest's ``WAL-Ranges`` as the tar passes by.

Verification extracts the tar (streaming; the artifact's size and sha256 are checked at the end)
into scratch space and runs ``pg_verifybackup`` on it with that WAL: every file against the
manifest's size and CRC32C, and the WAL range parsed by pg_waldump. PostgreSQL 15's
pg_verifybackup reads plain-format backups only, hence the extraction.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import psycopg2
import zstandard

from rag_backup import progress, repository
from rag_backup.engines.postgres.common import Log, _quiet
from rag_backup.engines.postgres.pitr.instance import find_bindir
from rag_backup.engines.postgres.pitr.wal import (
    parse_lsn,
    segment_name,
    segment_of_lsn,
    segno_of,
)
from rag_backup.engines.postgres.server import SERVER_WENT_AWAY, PostgresServer, tool_version
from rag_backup.engines.zstream import COPY_CHUNK, CountedReader, compress_into
from rag_backup.errors import IntegrityError, InvalidRequest, RagBackupError, ToolError
from rag_backup.proc import StreamingProcess
from rag_backup.repository import Artifact, BackupRecord, BackupRepository, PendingBackup
from rag_backup.repository.manifest import _aware

BASE_STORE = "postgres_base"
BASE_ARTIFACT = "base.tar.zst"
MANIFEST_MEMBER = "backup_manifest"
MANIFEST_TAIL = 64 * 1024  # the manifest ends with its WAL-Ranges: keep only its end
TAR_BLOCK = 512
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
SEGMENT = re.compile(r"^[0-9A-F]{24}$")
# Where the cluster's system identifier lies: first in pg_control, after the first page's
# header in a WAL segment (both in the writing server's byte order).
CONTROL_SYSID_OFFSET = 0
SEGMENT_SYSID_OFFSET = 24
WAL_RANGE = re.compile(rb'\{\s*"Timeline":\s*(\d+),\s*"Start-LSN":\s*"([0-9A-F]+/[0-9A-F]+)",'
                       rb'\s*"End-LSN":\s*"([0-9A-F]+/[0-9A-F]+)"\s*\}')


# -- the fingerprint -----------------------------------------------------------------------
def end_segment_of(timeline: int, end_lsn: int, seg_size: int) -> str:
    """The last segment a backup needs: ``end_lsn`` is where its last record ends, so the last
    byte needed is the one before (on a segment boundary, the previous segment)."""
    return segment_of_lsn(timeline, end_lsn - 1, seg_size)


@dataclass(frozen=True)
class BaseBackupFingerprint:
    """What a base backup is: the WAL range that makes it consistent (the segments the archive
    must hold for it), when it was taken, and the cluster it is a copy of.

    ``consistent_at`` is taken right after pg_basebackup exited: recovery to any target time
    from then on can start from this backup (a conservative bound)."""

    timeline: int
    start_lsn: str
    end_lsn: str
    start_segment: str
    end_segment: str
    started_at: datetime
    consistent_at: datetime
    system_identifier: str
    wal_segment_size: int
    server_version_num: int
    tar_bytes: int

    def wal_segments(self) -> list[str]:
        """The names of the segments ``start_segment`` .. ``end_segment``, in order."""
        size = self.wal_segment_size
        return [segment_name(self.timeline, segno, size) for segno in
                range(segno_of(self.start_segment, size), segno_of(self.end_segment, size) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"timeline": self.timeline, "start_lsn": self.start_lsn, "end_lsn": self.end_lsn,
                "start_segment": self.start_segment, "end_segment": self.end_segment,
                "started_at": self.started_at.isoformat(),
                "consistent_at": self.consistent_at.isoformat(),
                "system_identifier": self.system_identifier,
                "wal_segment_size": self.wal_segment_size,
                "server_version_num": self.server_version_num, "tar_bytes": self.tar_bytes}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BaseBackupFingerprint:
        """The dict form back; ``ValueError`` saying what is wrong if it is not one."""
        if not isinstance(doc, dict):
            raise ValueError(f"{doc!r} is not an object")
        for name in ("timeline", "wal_segment_size", "server_version_num", "tar_bytes"):
            if type(doc.get(name)) is not int or doc[name] < 0:
                raise ValueError(f"{name} is {doc.get(name)!r}, not a count")
        size = doc["wal_segment_size"]
        if not (1 << 20 <= size <= 1 << 30 and size & (size - 1) == 0):
            raise ValueError(f"wal_segment_size {size} is not a power of 2 from 1 MB to 1 GB")
        for name, pattern in (("start_lsn", LSN), ("end_lsn", LSN), ("start_segment", SEGMENT),
                              ("end_segment", SEGMENT)):
            if not isinstance(doc.get(name), str) or not pattern.match(doc[name]):
                raise ValueError(f"{name} is {doc.get(name)!r}")
        if not (isinstance(doc.get("system_identifier"), str)
                and doc["system_identifier"].isdigit()):
            raise ValueError(f"system_identifier is {doc.get('system_identifier')!r}")
        found = cls(doc["timeline"], doc["start_lsn"], doc["end_lsn"], doc["start_segment"],
                    doc["end_segment"], _aware(doc.get("started_at"), "started_at"),
                    _aware(doc.get("consistent_at"), "consistent_at"), doc["system_identifier"],
                    size, doc["server_version_num"], doc["tar_bytes"])
        start, end = parse_lsn(found.start_lsn), parse_lsn(found.end_lsn)
        if (found.start_segment != segment_of_lsn(found.timeline, start, size)
                or found.end_segment != end_segment_of(found.timeline, end, size)
                or end <= start):
            raise ValueError(f"segments {found.start_segment}..{found.end_segment} do not match "
                             f"the WAL range {found.start_lsn}..{found.end_lsn}")
        return found


def fingerprint_of(source: BackupRecord | repository.Manifest | repository.BackupOutcome
                   ) -> BaseBackupFingerprint:
    """The typed fingerprint of a base backup (its record or manifest) or of its outcome; an
    invalid one raises ``DamagedBackup`` naming the backup."""
    return repository.typed_fingerprint(source, BASE_STORE, BaseBackupFingerprint.from_dict)


@dataclass(frozen=True)
class BaseBackupOutcome(repository.BackupOutcome):
    @property
    def base(self) -> BaseBackupFingerprint:
        return fingerprint_of(self)


# -- taking a base backup ------------------------------------------------------------------
class _TarWatcher:
    """A reader over pg_basebackup's tar stream that counts its bytes and keeps the end of the
    ``backup_manifest`` member as it passes (only tar headers are parsed: 512-byte blocks)."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.bytes = 0
        self.manifest_tail = bytearray()
        self._header = bytearray()
        self._left = 0  # bytes of the current member's data (and padding) still to come
        self._capturing = False

    def read(self, size: int = -1) -> bytes:
        block = self.source.read(size)
        self.bytes += len(block)
        self._feed(memoryview(block))
        return block

    def _feed(self, data: memoryview) -> None:
        while data:
            if self._left:
                taken, data = data[:self._left], data[self._left:]
                self._left -= len(taken)
                if self._capturing:
                    self.manifest_tail += taken
                    del self.manifest_tail[:-MANIFEST_TAIL]
                continue
            needed = TAR_BLOCK - len(self._header)
            self._header += data[:needed]
            data = data[needed:]
            if len(self._header) == TAR_BLOCK:
                self._member(bytes(self._header))
                self._header.clear()

    def _member(self, header: bytes) -> None:
        raw = header[124:136]
        size = (int.from_bytes(raw[1:], "big") if raw[0] & 0x80  # base-256 for huge files
                else int(raw.strip(b"\0 ") or b"0", 8))
        self._left = -(-size // TAR_BLOCK) * TAR_BLOCK
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        self._capturing = bool(size) and PurePosixPath(name).as_posix() == MANIFEST_MEMBER

    def wal_range(self, what: str) -> tuple[int, str, str]:
        """(timeline, start LSN, end LSN) from the manifest's WAL-Ranges."""
        section = bytes(self.manifest_tail).rpartition(b'"WAL-Ranges"')[2]
        ranges = WAL_RANGE.findall(section)
        if len(ranges) != 1:
            raise ToolError(f"{what}: the tar stream's backup_manifest has "
                            f"{len(ranges) or 'no'} WAL range(s), expected one (a backup taken "
                            "across a timeline switch, or no manifest)")
        timeline, start, end = ranges[0]
        return int(timeline), start.decode(), end.decode()


@dataclass(frozen=True)
class _Cluster:
    system_identifier: str
    wal_segment_size: int
    server_version_num: int
    server_version: str
    tablespaces: str  # other than pg_default and pg_global, with their locations


def _read_cluster(server: PostgresServer) -> _Cluster:
    conn = server.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text, "
                "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
                "current_setting('server_version_num')::int, current_setting('server_version'),"
                " coalesce((SELECT string_agg(format('%s (%s)', spcname, "
                "pg_tablespace_location(oid)), ', ' ORDER BY spcname) FROM pg_tablespace "
                "WHERE spcname NOT IN ('pg_default', 'pg_global')), '')")
            return _Cluster(*cur.fetchone())
    finally:
        conn.close()


def estimate_cluster_bytes(server: PostgresServer) -> int | None:
    """About the size of a base backup's tar (every database's files), for progress; None if
    the sizes cannot be read (``pg_database_size`` needs CONNECT on each database)."""
    try:
        conn = server.connect("postgres")
    except RagBackupError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
            return int(cur.fetchone()[0] or 0) or None
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def take_base_backup(server: PostgresServer, pending: PendingBackup, *,
                     timeout_s: float = 6 * 3600, zstd_level: int = 3,
                     log: Log = _quiet) -> BaseBackupOutcome:
    """``pg_basebackup`` of the whole cluster, as one tar with its manifest, through zstd into
    ``pending``'s artifact ``BASE_ARTIFACT``. Refuses a cluster with tablespaces (a tar on
    stdout holds the main data directory only)."""
    what = f"pg_basebackup of {server.describe()}"
    cluster = _read_cluster(server)
    if cluster.tablespaces:
        raise InvalidRequest(f"{what}: the cluster has tablespaces outside its data directory "
                             f"({cluster.tablespaces}); a streamed base backup holds the data "
                             "directory only, so it cannot take them")
    estimate = estimate_cluster_bytes(server)
    started_at, started = datetime.now(timezone.utc), time.monotonic()
    proc = StreamingProcess(
        [server.tool("pg_basebackup"), "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast",
         "--manifest-checksums=CRC32C", f"--label=rag-backup-{pending.backup_id}",
         "--no-password", "-v", "-d", server.dsn("postgres")],
        what=what, timeout=timeout_s, env=server.env(), transient=SERVER_WENT_AWAY)
    assert proc.proc.stdout is not None
    watcher = _TarWatcher(proc.proc.stdout)
    try:
        with progress.tracking(what, estimate, estimated=True):
            compress_into(pending, BASE_ARTIFACT, watcher, zstd_level)
            proc.wait()
    except BaseException:
        proc.abort()
        raise
    consistent_at = datetime.now(timezone.utc)
    timeline, start_lsn, end_lsn = watcher.wal_range(what)
    size = cluster.wal_segment_size
    fingerprint = BaseBackupFingerprint(
        timeline, start_lsn, end_lsn, segment_of_lsn(timeline, parse_lsn(start_lsn), size),
        end_segment_of(timeline, parse_lsn(end_lsn), size), started_at, consistent_at,
        cluster.system_identifier, size, cluster.server_version_num, watcher.bytes)
    log(f"pg_basebackup: {watcher.bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f} s, "
        f"WAL {start_lsn}..{end_lsn} on timeline {timeline} "
        f"({fingerprint.start_segment}..{fingerprint.end_segment})")
    versions = {"pg_basebackup": tool_version(server, "pg_basebackup"),
                "zstd": f"python-zstandard {zstandard.__version__}"}
    return BaseBackupOutcome(fingerprint.to_dict(), versions, cluster.server_version)


# -- extracting and verifying --------------------------------------------------------------
def _artifact(record: BackupRecord) -> Artifact:
    for artifact in record.manifest.artifacts:
        if artifact.path == BASE_ARTIFACT:
            return artifact
    raise IntegrityError(f"{record.manifest.store} backup {record.partition_key} "
                         f"({record.location}) has no artifact {BASE_ARTIFACT}")


def _checked_members(tar: tarfile.TarFile, where: str, deadline: float, timeout_s: float,
                     extracted: list[int]) -> Iterator[tarfile.TarInfo]:
    """The tar's members, refusing unsafe names and kinds (links are left to the ``tar``
    extraction filter, which refuses those leading outside); counts file bytes."""
    for member in tar:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise IntegrityError(f"{where}: the tar holds the unsafe path {member.name!r}")
        if not (member.isfile() or member.isdir() or member.issym()):
            raise IntegrityError(f"{where}: the tar holds {member.name!r} of an unexpected "
                                 f"kind (type {member.type!r})")
        if time.monotonic() > deadline:
            raise ToolError(f"{where}: extraction did not finish within {timeout_s:.0f} s")
        extracted[0] += member.size if member.isfile() else 0
        yield member


def extract_base_backup(repo: BackupRepository, record: BackupRecord, dest: Path, *,
                        timeout_s: float) -> int:
    """Extract a base backup into ``dest`` (absent or empty), streaming: memory stays bounded,
    and the artifact's size and sha256 are checked at the end, so act on ``dest`` only once
    this returns. Leaves ``backup_manifest`` in place. Returns the bytes of the files."""
    where = (f"{record.manifest.store} backup {record.partition_key} "
             f"({record.location}/{BASE_ARTIFACT})")
    artifact = _artifact(record)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidRequest(f"cannot extract {where} into {dest}: it exists and is not an "
                             "empty directory")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    deadline, extracted = time.monotonic() + timeout_s, [0]
    failure: Exception | None = None
    with repo.open_checked(record, artifact) as raw, \
            progress.tracking(f"extracting base backup {record.partition_key}", artifact.size):
        reader = zstandard.ZstdDecompressor().stream_reader(CountedReader(raw),
                                                            read_size=COPY_CHUNK, closefd=False)
        try:
            with tarfile.open(fileobj=reader, mode="r|", bufsize=COPY_CHUNK,
                              copybufsize=COPY_CHUNK) as tar:
                tar.extractall(dest, members=_checked_members(tar, where, deadline, timeout_s,
                                                              extracted), filter="tar")
            while reader.read(COPY_CHUNK):  # the rest of the frame, to its zstd checksum
                pass
        except (zstandard.ZstdError, tarfile.TarError, IntegrityError) as exc:
            failure = exc
        raw.finish()  # a size or sha256 mismatch first: it is the better diagnosis
    if isinstance(failure, IntegrityError):
        raise failure
    if failure is not None:
        raise IntegrityError(f"{where} is not a valid zstd-compressed tar: {failure}")
    return extracted[0]


def _manifest_facts(data: Path, where: str) -> tuple[int, int, list[tuple[int, str, str]]]:
    """(files, their bytes, WAL ranges) of an extracted backup's ``backup_manifest``."""
    try:
        doc = json.loads((data / MANIFEST_MEMBER).read_bytes())
        files = doc["Files"]
        ranges = [(r["Timeline"], r["Start-LSN"], r["End-LSN"]) for r in doc["WAL-Ranges"]]
        return len(files), sum(f["Size"] for f in files), ranges
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{where}: its backup_manifest is missing or unreadable: "
                             f"{exc}") from exc


def _system_identifier(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return str(int.from_bytes(fh.read(8), sys.byteorder))


def _check_cluster(fp: BaseBackupFingerprint, data: Path, wal_dir: Path, where: str) -> None:
    """The data's pg_control and the WAL segments are of the cluster the fingerprint names:
    PostgreSQL 15's manifest does not record it, and pg_waldump does not compare it."""
    files = [(data / "global" / "pg_control", CONTROL_SYSID_OFFSET)]
    files += [(wal_dir / name, SEGMENT_SYSID_OFFSET) for name in fp.wal_segments()
              if (wal_dir / name).is_file()]  # a missing one: pg_verifybackup names it
    for path, offset in files:
        found = _system_identifier(path, offset)
        if found != fp.system_identifier:
            raise IntegrityError(f"{where}: {path} is of the cluster {found}, the backup's "
                                 f"fingerprint says {fp.system_identifier}")


def verify_base_backup(repo: BackupRepository, record: BackupRecord, *, wal_dir: Path,
                       work_dir: Path, timeout_s: float, log: Log = _quiet) -> dict[str, Any]:
    """Extract the backup into ``work_dir/data`` (this function's scratch, removed before and
    after) and run ``pg_verifybackup`` with the segments ``wal_segments()`` that the caller
    placed in ``wal_dir``. Returns the checks; ``IntegrityError`` carrying pg_verifybackup's
    own output if the backup does not match its manifest or its WAL does not parse."""
    fp = fingerprint_of(record)
    where = f"{record.manifest.store} backup {record.partition_key} ({record.backup_id})"
    data = work_dir / "data"
    started = time.monotonic()
    deadline = started + timeout_s
    shutil.rmtree(data, ignore_errors=True)
    try:
        extracted = extract_base_backup(repo, record, data, timeout_s=timeout_s)
        files, manifest_bytes, ranges = _manifest_facts(data, where)
        if ranges != [(fp.timeline, fp.start_lsn, fp.end_lsn)]:
            raise IntegrityError(f"{where}: its backup_manifest's WAL ranges {ranges} are not "
                                 f"the fingerprint's ({fp.timeline}, {fp.start_lsn}, "
                                 f"{fp.end_lsn})")
        _check_cluster(fp, data, wal_dir, where)
        proc = StreamingProcess(
            [str(find_bindir() / "pg_verifybackup"), "--wal-directory", str(wal_dir),
             str(data)], what=f"pg_verifybackup of {where}", stdout=False,
            timeout=max(deadline - time.monotonic(), 60.0))
        try:
            proc.wait()
        except ToolError as exc:
            if proc.timed_out:
                raise
            raise IntegrityError(f"{where} failed verification: {exc}") from exc
    finally:
        shutil.rmtree(data, ignore_errors=True)
    seconds = round(time.monotonic() - started, 3)
    log(f"{where}: {files} files ({manifest_bytes / 1e6:.1f} MB) and "
        f"{len(fp.wal_segments())} WAL segment(s) verified in {seconds:.1f} s")
    return {"manifest_files": files, "manifest_bytes": manifest_bytes,
            "extracted_bytes": extracted, "wal_segments": len(fp.wal_segments()),
            "wal_range": f"{fp.start_lsn}..{fp.end_lsn}", "timeline": fp.timeline,
            "system_identifier": fp.system_identifier, "seconds": seconds}
