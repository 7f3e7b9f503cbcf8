"""PostgreSQL's write-ahead log in the repository: every archived segment, compressed, with its
sha256; the timelines' history files; the archive's status and the cluster it belongs to.

Layout (identical on every backend)::

    postgres_wal/cluster.json                        the cluster (system identifier, segment
                                                     size) this archive belongs to
    postgres_wal/segments/<TLI>/<segment>.zst        a segment, zstd-compressed
    postgres_wal/segments/<TLI>/<segment>.json       its record, written after the data: the
                                                     segment is archived once this exists
    postgres_wal/history/<TLI>.history               a timeline's history file, as the server
                                                     wrote it
    postgres_wal/status.json                         the receiver's heartbeat: what the server
                                                     had written, what the archive holds, and
                                                     since when it held everything

A segment is immutable once archived: archiving it again with the same bytes is a no-op (a
receiver restarted mid-segment receives it again), with different bytes an ``IntegrityError``
(two clusters, or damage). Readers check both digests: of the stored bytes and of the segment.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from rag_backup.errors import BackupNotFound, DamagedBackup, IntegrityError
from rag_backup.repository.backends import Backend
from rag_backup.repository.crypto import DecryptionError
from rag_backup.repository.manifest import _aware, load_record, utcnow

WAL_ROOT = "postgres_wal"
SEGMENTS = f"{WAL_ROOT}/segments"
HISTORY = f"{WAL_ROOT}/history"
STATUS = f"{WAL_ROOT}/status.json"
CLUSTER = f"{WAL_ROOT}/cluster.json"
SEGMENT_NAME = re.compile(r"^[0-9A-F]{24}$")
HISTORY_NAME = re.compile(r"^[0-9A-F]{8}\.history$")
CHUNK = 1024 * 1024
ZSTD_LEVEL = 3
READ_WORKERS = 8


def _segment_name(name: str) -> str:
    if not SEGMENT_NAME.fullmatch(name or ""):
        raise IntegrityError(f"{name!r} is not a WAL segment name (24 hex digits)")
    return name


def segment_key(name: str) -> str:
    return f"{SEGMENTS}/{name[:8]}/{_segment_name(name)}.zst"


def segment_record_key(name: str) -> str:
    return f"{SEGMENTS}/{name[:8]}/{_segment_name(name)}.json"


@dataclass(frozen=True)
class WalSegment:
    """One archived segment: its digests, when it was archived, and the commit times it holds
    (``None`` when they could not be read: the segment is still restorable)."""

    name: str
    size: int
    sha256: str
    stored_size: int
    stored_sha256: str
    archived_at: datetime
    first_commit_at: datetime | None = None
    last_commit_at: datetime | None = None
    commits: int | None = None
    restore_points: tuple[str, ...] = ()  # named restore points (pg_create_restore_point)

    @property
    def timeline(self) -> int:
        return int(self.name[:8], 16)

    def to_json(self) -> bytes:
        doc = asdict(self)
        for name in ("archived_at", "first_commit_at", "last_commit_at"):
            if doc[name] is not None:
                doc[name] = doc[name].isoformat()
        doc["format_version"] = 1
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> WalSegment:
        doc = load_record(data, "WAL segment record", where)
        try:
            doc.pop("format_version", None)
            for name in ("archived_at", "first_commit_at", "last_commit_at"):
                if doc.get(name) is not None:
                    doc[name] = _aware(doc[name], name)
            doc["restore_points"] = tuple(doc.get("restore_points") or ())
            segment = cls(**doc)
            _segment_name(segment.name)
        except (TypeError, ValueError, IntegrityError) as exc:
            raise DamagedBackup(f"the WAL segment record {where} is unreadable: {exc}",
                                file=where, error=str(exc)) from exc
        return segment


class _Hashing:
    """A sink that hashes and counts what passes through it."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.sink.write(data) if self.sink is not None else len(data)

    def flush(self) -> None:
        pass


class WalStore:
    """The WAL archive of one PostgreSQL cluster, on the repository's backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- the cluster ---------------------------------------------------------------------
    def cluster(self) -> dict[str, Any] | None:
        raw = self.backend.read_bytes(CLUSTER)
        return None if raw is None else load_record(raw, "WAL cluster record",
                                                     self.backend.location(CLUSTER))

    def claim(self, system_identifier: str, wal_segment_size: int) -> None:
        """Bind this archive to one cluster; a different cluster is refused (its segment
        names would collide with this one's)."""
        found = self.cluster()
        if found is None:
            self.backend.write_bytes(CLUSTER, json.dumps({
                "system_identifier": system_identifier, "wal_segment_size": wal_segment_size,
                "claimed_at": utcnow().isoformat()}, indent=2).encode())
            return
        if str(found.get("system_identifier")) != system_identifier:
            raise IntegrityError(
                f"the WAL archive at {self.backend.location(WAL_ROOT)} belongs to the "
                f"PostgreSQL cluster {found.get('system_identifier')}, not to this server's "
                f"cluster {system_identifier} (a new initdb, or another server): archive it "
                "into another repository, or move the old archive away once its base backups "
                "are no longer needed")

    # -- segments ------------------------------------------------------------------------
    def get(self, name: str) -> WalSegment | None:
        key = segment_record_key(name)
        raw = self.backend.read_bytes(key)
        return None if raw is None else WalSegment.from_json(raw, self.backend.location(key))

    def put(self, name: str, source: BinaryIO, *, first_commit_at: datetime | None = None,
            last_commit_at: datetime | None = None, commits: int | None = None,
            restore_points: tuple[str, ...] = ()) -> tuple[WalSegment, bool]:
        """Archive segment ``name`` from ``source`` (streamed, compressed); returns the record
        and whether it was new. The same bytes again are a no-op; other bytes are refused."""
        stored_key = segment_key(name)
        existing = self.get(name)
        if existing is not None:
            plain = _Hashing(None)
            for block in iter(lambda: source.read(CHUNK), b""):
                plain.write(block)
            if existing.sha256 != plain.hash.hexdigest():
                raise IntegrityError(
                    f"WAL segment {name} is archived already at "
                    f"{self.backend.location(stored_key)} with other contents (sha256 "
                    f"{existing.sha256[:12]}..., now {plain.hash.hexdigest()[:12]}...): "
                    "refusing to replace it; two clusters archive into one repository, or it "
                    "is damaged")
            return existing, False
        plain = _Hashing(None)
        with self.backend.open_write(stored_key) as out:
            stored = _Hashing(out)
            with zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True
                                          ).stream_writer(stored, closefd=False) as zout:
                for block in iter(lambda: source.read(CHUNK), b""):
                    plain.write(block)
                    zout.write(block)
        segment = WalSegment(name, plain.size, plain.hash.hexdigest(), stored.size,
                             stored.hash.hexdigest(), utcnow(), first_commit_at,
                             last_commit_at, commits, tuple(restore_points))
        self.backend.write_bytes(segment_record_key(name), segment.to_json())
        return segment, True

    def segments(self) -> list[WalSegment | DamagedBackup]:
        """Every archived segment's record, in WAL order (damaged records as the error that
        names them, so one bad record never hides the others)."""
        keys = [info.key for info in self.backend.list_files(f"{SEGMENTS}/")
                if info.key.endswith(".json")]

        def read(key: str) -> WalSegment | DamagedBackup | None:
            raw = self.backend.read_bytes(key)
            if raw is None:  # deleted while we listed
                return None
            try:
                return WalSegment.from_json(raw, self.backend.location(key))
            except DamagedBackup as exc:
                return exc

        with ThreadPoolExecutor(READ_WORKERS) as pool:
            found = [r for r in pool.map(read, keys) if r is not None]
        return sorted(found, key=lambda r: (r.name[8:], r.name[:8])
                      if isinstance(r, WalSegment) else ("", ""))

    def read_to(self, segment: WalSegment, dest: Path) -> int:
        """Decompress ``segment`` into file ``dest``, checking both digests; returns its size.
        ``BackupNotFound`` if its data is gone, ``IntegrityError`` if it differs."""
        key = segment_key(segment.name)
        if not self.backend.exists(key):
            raise BackupNotFound(f"WAL segment {segment.name} has a record but no data at "
                                 f"{self.backend.location(key)}")
        tmp = dest.with_name(dest.name + ".part")
        with self.backend.open_read(key) as raw, open(tmp, "wb") as out:
            stored = _Hashing(None)
            plain = _Hashing(out)

            class _Tee:
                def read(self, size: int = -1) -> bytes:
                    data = raw.read(size)
                    stored.write(data)
                    return data

            try:
                zstandard.ZstdDecompressor().copy_stream(_Tee(), plain, read_size=CHUNK,
                                                         write_size=CHUNK)
            except DecryptionError as exc:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(f"WAL segment {segment.name} is damaged: {exc}") from exc
            except zstandard.ZstdError as exc:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(f"WAL segment {segment.name} at "
                                     f"{self.backend.location(key)} does not decompress: "
                                     f"{exc}") from exc
        problem = None
        if stored.hash.hexdigest() != segment.stored_sha256:
            problem = "its stored bytes' sha256 differs from the record"
        elif plain.hash.hexdigest() != segment.sha256 or plain.size != segment.size:
            problem = "its decompressed sha256 or size differs from the record"
        if problem:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"WAL segment {segment.name} at {self.backend.location(key)}"
                                 f" is damaged: {problem}")
        tmp.replace(dest)
        return plain.size

    def check(self, segment: WalSegment) -> str | None:
        """Why ``segment``'s data does not match its record (read and hashed), or ``None``."""
        key = segment_key(segment.name)
        digest, size = hashlib.sha256(), 0
        try:
            with self.backend.open_read(key) as raw:
                for block in iter(lambda: raw.read(CHUNK), b""):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return f"its data is missing at {self.backend.location(key)}"
        except BackupNotFound:
            return f"its data is missing at {self.backend.location(key)}"
        except DecryptionError as exc:
            return f"its stored bytes do not match the record: {exc}"
        if size != segment.stored_size or digest.hexdigest() != segment.stored_sha256:
            return (f"its stored bytes at {self.backend.location(key)} do not match the record "
                    f"(size {size}, expected {segment.stored_size})")
        return None

    def delete(self, names: Iterable[str]) -> int:
        """Delete segments: the record first (so a segment stops existing at once), then the
        data. Returns how many."""
        count = 0
        for name in names:
            self.backend.delete(segment_record_key(name))
            self.backend.delete(segment_key(name))
            count += 1
        return count

    # -- timelines -----------------------------------------------------------------------
    def put_history(self, name: str, data: bytes) -> None:
        if not HISTORY_NAME.fullmatch(name):
            raise IntegrityError(f"{name!r} is not a timeline history file name")
        key = f"{HISTORY}/{name}"
        if self.backend.read_bytes(key) != data:
            self.backend.write_bytes(key, data)

    def histories(self) -> dict[str, bytes]:
        found = {}
        for child in self.backend.list_children(HISTORY):
            if HISTORY_NAME.fullmatch(child):
                data = self.backend.read_bytes(f"{HISTORY}/{child}")
                if data is not None:
                    found[child] = data
        return found

    # -- status --------------------------------------------------------------------------
    def write_status(self, doc: dict[str, Any]) -> None:
        self.backend.write_bytes(STATUS, json.dumps(doc, indent=2, sort_keys=True).encode())

    def read_status(self) -> dict[str, Any] | None:
        raw = self.backend.read_bytes(STATUS)
        return None if raw is None else load_record(raw, "WAL archive status",
                                                    self.backend.location(STATUS))

    def location(self, key: str = WAL_ROOT) -> str:
        return self.backend.location(key)
