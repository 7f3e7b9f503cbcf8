"""The format of a MinIO backup: one snapshot per bucket, and the backup's fingerprint.

Layout in the backup repository::

    minio/<partition>/manifest.json                          the commit record (repository)
    minio/<partition>/<backup_id>/buckets/<bucket>.jsonl.zst  the snapshot of one bucket

and object contents in the repository's blob store (``repo.blobs``), named by their hash.

A snapshot is a zstd-compressed JSON-lines file: a header line, then one line per object in key
order (S3's listing order, which is UTF-8 byte order): key, size, etag, last_modified, sha256,
content type, user metadata, the other headers a PUT sets (Cache-Control,
Content-Disposition, Content-Encoding, Content-Language) and, from format version 2, the
object's tags. Version-1 snapshots (no tags) are still read and restored; their objects' tags
are "not recorded" and a restore reports the tag comparison as not run. Keys exist only inside
that file; blobs are named by their hash, so no key (``..``, a leading ``/``, spaces, any
unicode) ever becomes part of a path in the repository.

The manifest's fingerprint (``MinioFingerprint``) records the objects and bytes of every
bucket, their totals, the snapshot the backup reused unchanged objects from, and what the
backup transferred.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import zstandard

from rag_backup.engines.minio.client import check_bucket_name
from rag_backup.engines.minio.common import CHUNK, STORE
from rag_backup import repository
from rag_backup.errors import IntegrityError
from rag_backup.repository import BackupRecord, BackupRepository, PendingBackup
from rag_backup.repository.manifest import Artifact

SNAPSHOT_DIR = "buckets"
SNAPSHOT_SUFFIX = ".jsonl.zst"
SNAPSHOT_FORMAT = "rag-backup/minio-snapshot"
SNAPSHOT_VERSION = 2                # 2: object tags recorded; 1: no tags (still read)
READABLE_VERSIONS = (1, 2)
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


# -- snapshot records -------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectEntry:
    """One object of a snapshot."""

    key: str
    size: int
    etag: str
    last_modified: str
    sha256: str
    content_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] | None = None  # None: not recorded (a version-1 snapshot)

    def to_line(self) -> bytes:
        doc: dict[str, Any] = {
            "key": self.key, "size": self.size, "etag": self.etag,
            "last_modified": self.last_modified, "sha256": self.sha256,
            "content_type": self.content_type, "metadata": self.metadata,
            "headers": self.headers}
        if self.tags is not None:
            doc["tags"] = self.tags
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes, where: str, version: int = SNAPSHOT_VERSION) -> ObjectEntry:
        """One line of a snapshot of format ``version`` (from 2 on, every line has its
        object's tags, ``{}`` for none; version 1 recorded none: ``tags`` is None)."""
        try:
            doc = json.loads(line)
            tags = None if version < 2 else {str(k): str(v) for k, v in doc["tags"].items()}
            entry = cls(str(doc["key"]), int(doc["size"]), str(doc["etag"]),
                        str(doc["last_modified"]), str(doc["sha256"]),
                        str(doc.get("content_type", "")),
                        {str(k): str(v) for k, v in doc.get("metadata", {}).items()},
                        {str(k): str(v) for k, v in doc.get("headers", {}).items()}, tags)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where}: unreadable snapshot line: {exc}") from exc
        if not SHA_RE.fullmatch(entry.sha256) or entry.size < 0:
            raise IntegrityError(f"{where}: snapshot line for key {entry.key!r} has an invalid "
                                 f"sha256 {entry.sha256!r} or size {entry.size}")
        return entry


def snapshot_name(bucket: str) -> str:
    return f"{SNAPSHOT_DIR}/{check_bucket_name(bucket)}{SNAPSHOT_SUFFIX}"


def snapshot_buckets(record: BackupRecord) -> list[str]:
    return fingerprint_of(record).bucket_names


def _snapshot_artifact(record: BackupRecord, bucket: str) -> Artifact:
    name = snapshot_name(bucket)
    for artifact in record.manifest.artifacts:
        if artifact.path == name:
            return artifact
    raise IntegrityError(f"{STORE} backup {record.partition_key}: the manifest lists no "
                         f"snapshot {name} for bucket {bucket!r}")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        if not chunk:
            continue
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    if rest:
        yield rest


def _decompressed(repo: BackupRepository, record: BackupRecord, artifact: Artifact
                  ) -> Iterator[bytes]:
    """The artifact's decompressed bytes, in chunks; its size, sha256 and zstd frame are
    checked at the end (``IntegrityError``)."""
    where = f"{record.location}/{artifact.path}"
    digest, size = hashlib.sha256(), 0
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        stream = repo.open_artifact(record, artifact)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} is "
                             "missing") from exc
    with stream:
        for raw in iter(lambda: stream.read(CHUNK), b""):
            digest.update(raw)
            size += len(raw)
            try:
                yield decompressor.decompress(raw)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} "
                                     f"is not a valid zstd stream: {exc}") from exc
    if size != artifact.size or digest.hexdigest() != artifact.sha256:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} has "
                             f"{size} bytes / sha256 {digest.hexdigest()}, the manifest says "
                             f"{artifact.size} / {artifact.sha256} (corrupt)")
    if not decompressor.eof:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} ends "
                             "before its zstd frame does (truncated)")


def read_snapshot(repo: BackupRepository, record: BackupRecord, bucket: str
                  ) -> Iterator[ObjectEntry]:
    """The entries of one bucket's snapshot, in key order, streamed.

    Damage raises ``IntegrityError``; a checksum mismatch is only known once the last entry has
    been read, so a consumer that must not act on a damaged snapshot checks it first
    (``check_snapshot``)."""
    artifact = _snapshot_artifact(record, bucket)
    where = f"{record.location}/{artifact.path}"
    lines = _lines(_decompressed(repo, record, artifact))
    try:
        header = json.loads(next(lines))
    except (StopIteration, ValueError) as exc:
        raise IntegrityError(f"{where}: no snapshot header") from exc
    version = header.get("version")
    if header.get("format") != SNAPSHOT_FORMAT or version not in READABLE_VERSIONS \
            or header.get("bucket") != bucket:
        raise IntegrityError(f"{where}: header {header!r} is not a snapshot of bucket "
                             f"{bucket!r} in a format this release reads (versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
    previous: str | None = None
    for line in lines:
        entry = ObjectEntry.from_line(line, where, version)
        if previous is not None and entry.key <= previous:
            raise IntegrityError(f"{where}: key {entry.key!r} follows {previous!r} (a snapshot "
                                 "is in strictly increasing key order)")
        previous = entry.key
        yield entry


def check_snapshot(repo: BackupRepository, record: BackupRecord, bucket: str) -> None:
    """Size and sha256 of one bucket's snapshot against the manifest (no parsing)."""
    repo.stream_artifact(record, _snapshot_artifact(record, bucket))


@contextmanager
def write_snapshot(pending: PendingBackup, bucket: str, incremental_from: str | None
                   ) -> Iterator[Callable[[ObjectEntry], Any]]:
    """Write the snapshot of ``bucket`` into ``pending``: the header, then every entry passed
    to the callable this yields (in strictly increasing key order), zstd-compressed with a
    checksum. The artifact is recorded once the block exits cleanly."""
    header = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "bucket": bucket,
              "partition_key": pending.partition_key, "backup_id": pending.backup_id,
              "incremental_from": incremental_from}
    with pending.artifact(snapshot_name(bucket)) as out, \
            zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
                out, closefd=False) as zout:
        zout.write(json.dumps(header).encode() + b"\n")
        yield lambda entry: zout.write(entry.to_line())


# -- the fingerprint -------------------------------------------------------------------------

@dataclass(frozen=True)
class BucketCounts:
    """One bucket of a snapshot: its objects and their bytes."""

    objects: int
    bytes: int


@dataclass(frozen=True)
class Transfer:
    """What a backup moved: objects downloaded into blobs, objects reused from the previous
    snapshot, GetObjectTagging requests the GETs' tag counts saved, and how long it took."""

    objects_copied: int
    bytes_copied: int
    objects_reused: int
    tag_reads_saved: int
    duration_s: float


@dataclass(frozen=True)
class MinioFingerprint:
    """The fingerprint of a MinIO backup, as its manifest records it (``to_dict``/``from_dict``:
    the same dict on disk as every release wrote)."""

    buckets: dict[str, BucketCounts]
    objects: int
    bytes: int
    incremental_from: str | None = None  # the reuse source's partition (None: a full copy)
    transfer: Transfer | None = None      # None: not recorded (the first release)

    @property
    def bucket_names(self) -> list[str]:
        return sorted(self.buckets)

    @property
    def objects_copied(self) -> int:
        """Objects downloaded into blobs by the backup (0 when not recorded)."""
        return self.transfer.objects_copied if self.transfer else 0

    @property
    def bytes_copied(self) -> int:
        return self.transfer.bytes_copied if self.transfer else 0

    @property
    def objects_reused(self) -> int:
        """Objects taken unchanged from the previous snapshot (0 when not recorded)."""
        return self.transfer.objects_reused if self.transfer else 0

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "buckets": {b: {"objects": c.objects, "bytes": c.bytes}
                        for b, c in self.buckets.items()},
            "objects": self.objects, "bytes": self.bytes,
            "incremental_from": self.incremental_from}
        if self.transfer is not None:
            t = self.transfer
            doc["transfer"] = {"objects_copied": t.objects_copied, "bytes_copied": t.bytes_copied,
                               "objects_reused": t.objects_reused,
                               "tag_reads_saved": t.tag_reads_saved, "duration_s": t.duration_s}
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> MinioFingerprint:
        """The dict form back (every release's: the first recorded no ``transfer`` and no
        ``incremental_from``); ``ValueError`` saying what is wrong if it is not one."""
        try:
            buckets = {str(b): BucketCounts(int(c["objects"]), int(c["bytes"]))
                       for b, c in doc.get("buckets", {}).items()}
            raw = doc.get("transfer")
            transfer = None if raw is None else Transfer(
                int(raw["objects_copied"]), int(raw["bytes_copied"]), int(raw["objects_reused"]),
                int(raw.get("tag_reads_saved", 0)), float(raw["duration_s"]))
            source = doc.get("incremental_from")
            return cls(buckets, int(doc.get("objects", sum(c.objects for c in buckets.values()))),
                       int(doc.get("bytes", sum(c.bytes for c in buckets.values()))),
                       None if source is None else str(source), transfer)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def fingerprint_of(source: BackupRecord | repository.Manifest | repository.BackupOutcome
                   ) -> MinioFingerprint:
    """The typed fingerprint of a backup (its record or manifest) or of a backup's outcome;
    an invalid one raises ``DamagedBackup`` naming the backup."""
    return repository.typed_fingerprint(source, STORE, MinioFingerprint.from_dict)


