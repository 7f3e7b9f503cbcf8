"""MinIO backups: incremental, content-addressed snapshots of buckets.

Incremental backups: the bucket listing is walked alongside the previous snapshot (both are in
key order, so memory stays bounded whatever the bucket's size). An object whose key, size and
etag are unchanged, and whose blob is present with the right size, is not downloaded again: its
sha256 is taken from the previous snapshot (and its headers too, when its Last-Modified is
unchanged; otherwise one HEAD refreshes them, since a metadata-only copy keeps the etag). Tags
are read for every object on every backup: changing an object's tags changes neither its etag
nor its Last-Modified, so an unchanged object costs one GetObjectTagging (by the worker pool).
A downloaded object's GET says whether it has tags (``x-amz-tagging-count``, sent only for a
tagged object and only to credentials that may read tags): a missing header is taken as "no
tags" only once this backup has seen, on one tagged object, GetObjectTagging succeed with the
count its GET reported (``_TagCountTrust``); until then, and for good on a server that omits
the header, GetObjectTagging is asked. New or changed objects are downloaded by a pool of
threads, hashed while they stream, and stored as blobs through the repository's blob store
(idempotent: the same content always gets the same name). GETs carry ``If-Match`` with the
listed etag, so the bytes always belong to the version recorded; an object overwritten after
the listing is re-read as its new version, one deleted after the listing is left out (each
object in a snapshot is one consistent version from the backup's run).

The previous snapshot ("reuse source") is the newest committed one at or before the partition
whose age is at most ``window - gc_grace``: retention cannot delete it while this backup runs
(see ``gc.collect_garbage`` for why that matters).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import boto3
import botocore

from rag_backup import progress, repository
from rag_backup.engines.minio.client import (
    S3Endpoint,
    check_bucket_name,
    refuse_repository_bucket,
    s3_errors,
)
from rag_backup.engines.minio.common import (
    DEFAULT_GC_GRACE,
    DEFAULT_WORKERS,
    MAX_QUEUED,
    OBJECTS,
    STORE,
    Log,
    _quiet,
)
from rag_backup.engines.minio.objects import (
    MAX_CHANGES,
    _Listed,
    _list_bucket,
    _ObjectChanged,
    _Objects,
)
from rag_backup.engines.minio.snapshot import (
    BucketCounts,
    MinioFingerprint,
    ObjectEntry,
    Transfer,
    check_snapshot,
    fingerprint_of,
    read_snapshot,
    snapshot_buckets,
    write_snapshot,
)
from rag_backup.errors import IntegrityError, InvalidRequest, StoreUnreachable
from rag_backup.repository import BackupRecord, BackupRepository, BlobWriter, PendingBackup
from rag_backup.repository.crypto import IdentityError
from rag_backup.repository.manifest import utcnow


class _Cursor:
    """Walks a key-ordered snapshot alongside a key-ordered listing."""

    def __init__(self, entries: Iterator[ObjectEntry]) -> None:
        self._entries = entries
        self._next = next(entries, None)

    def find(self, key: str) -> ObjectEntry | None:
        while self._next is not None and self._next.key < key:
            self._next = next(self._entries, None)
        return self._next if self._next is not None and self._next.key == key else None

    def close(self) -> None:
        close = getattr(self._entries, "close", None)
        if close is not None:
            close()


@dataclass
class BucketStats:
    objects: int = 0
    bytes: int = 0
    objects_copied: int = 0
    bytes_copied: int = 0
    objects_reused: int = 0
    objects_vanished: int = 0

    def counts(self) -> BucketCounts:
        return BucketCounts(self.objects, self.bytes)


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    """``fingerprint`` is ``MinioFingerprint.to_dict()`` (what the manifest records; read it
    back with ``fingerprint_of``)."""

    buckets: dict[str, BucketStats]
    reuse_source: str | None

    def _total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.buckets.values())

    @property
    def objects(self) -> int:
        return self._total("objects")

    @property
    def bytes(self) -> int:
        return self._total("bytes")

    @property
    def objects_copied(self) -> int:
        return self._total("objects_copied")

    @property
    def objects_reused(self) -> int:
        return self._total("objects_reused")

    @property
    def bytes_copied(self) -> int:
        return self._total("bytes_copied")

    @property
    def objects_vanished(self) -> int:
        return self._total("objects_vanished")


@dataclass
class _Copier(_Objects):
    """What the worker threads of one backup share."""

    repo: BackupRepository
    blobs: BlobWriter               # this backup's puts (each content written once, fresh)
    existing: dict[bytes, int]      # blobs present when the backup started: sha -> size

    def blob_present(self, sha: str, size: int) -> bool:
        return self.existing.get(bytes.fromhex(sha)) == size

    def copy(self, bucket: str, obj: _Listed) -> tuple[ObjectEntry | None, str]:
        """Download one object into a blob, and read its tags. ``(entry, "copied")``, or
        ``(None, "vanished")`` when it was deleted after the listing."""
        for _ in range(MAX_CHANGES):
            try:
                download = self._get(bucket, obj.key, obj.etag)
                if download is None:
                    return None, "vanished"
                head = download.head
                sha, length = self.blobs.put(self._chunks(bucket, obj.key, obj.etag, download),
                                             obj.size)
                if length != obj.size:
                    raise IntegrityError(f"GET {obj.key!r} from {self.endpoint.describe(bucket)}"
                                         f" returned {length} bytes, the listing says {obj.size}")
                tags = self.downloaded_tags(bucket, obj.key, head.tag_count)
                if tags is None:
                    return None, "vanished"
                return ObjectEntry(obj.key, length, obj.etag, obj.last_modified, sha,
                                   head.content_type, head.metadata, head.headers,
                                   tags), "copied"
            except _ObjectChanged:
                current = self.head(bucket, obj.key)
                if current is None:
                    return None, "vanished"
                obj = _Listed(obj.key, current.size, current.etag, current.last_modified)
        raise StoreUnreachable(f"{self.endpoint.describe(bucket)}: object {obj.key!r} was "
                               f"overwritten {MAX_CHANGES} times while it was being copied; "
                               "retried")

    def refresh(self, bucket: str, obj: _Listed, previous: ObjectEntry
                ) -> tuple[ObjectEntry | None, str]:
        """Same content as the previous snapshot but a new Last-Modified: the headers may have
        changed (a metadata-only copy keeps the etag). One HEAD and the tags; no download."""
        head = self.head(bucket, obj.key)
        if head is None:
            return None, "vanished"
        if head.etag != previous.etag or head.size != previous.size:
            return self.copy(bucket, _Listed(obj.key, head.size, head.etag, head.last_modified))
        tags = self.tags(bucket, obj.key)
        if tags is None:
            return None, "vanished"
        # The listing's Last-Modified, not the HEAD's: HTTP dates have one-second resolution,
        # MinIO's listings milliseconds; the next backup compares with the listing.
        return replace(previous, last_modified=obj.last_modified,
                       content_type=head.content_type, metadata=head.metadata,
                       headers=head.headers, tags=tags), "reused"

    def retag(self, bucket: str, previous: ObjectEntry) -> tuple[ObjectEntry | None, str]:
        """Unchanged since the previous snapshot (key, size, etag, Last-Modified), but its
        tags may not be: changing them changes neither the etag nor Last-Modified."""
        tags = self.tags(bucket, previous.key)
        if tags is None:
            return None, "vanished"
        return replace(previous, tags=tags), "reused"


def choose_reuse_source(repo: BackupRepository, partition_key: str, *, window: timedelta,
                        gc_grace: timedelta, now: datetime | None = None
                        ) -> BackupRecord | None:
    """The newest committed snapshot at or before ``partition_key`` that retention cannot
    delete within ``gc_grace`` (its age, from the start of its partition's window as its
    manifest records it, is at most ``window - gc_grace``)."""
    now = now or utcnow()
    eligible = [r for r in repo.list_backups(STORE)
                if r.partition_key <= partition_key
                and now - r.manifest.window.start <= window - gc_grace]
    return eligible[-1] if eligible else None


def probe_bucket(client: Any, endpoint: S3Endpoint, bucket: str, what: str) -> str:
    """One cheap request proving the bucket exists and the credentials work; returns the
    server's ``Server`` header."""
    with s3_errors(endpoint, what, bucket):
        resp = client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    return str(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", "unknown"))


def backup(endpoint: S3Endpoint, pending: PendingBackup, buckets: Sequence[str], *,
           window: timedelta, gc_grace: timedelta = DEFAULT_GC_GRACE,
           workers: int = DEFAULT_WORKERS, log: Log = _quiet) -> BackupOutcome:
    """Snapshot ``buckets`` into ``pending``: one snapshot artifact per bucket; new or changed
    objects copied as blobs, unchanged ones reused from the previous snapshot."""
    repo = pending.repo
    buckets = list(dict.fromkeys(buckets))
    if not buckets:
        raise InvalidRequest(f"{STORE}: no buckets configured (RAG_MINIO_BUCKETS)")
    for bucket in buckets:
        check_bucket_name(bucket)
        refuse_repository_bucket(repo, bucket, "source")
    if gc_grace >= window:
        raise InvalidRequest(f"{STORE}: the garbage-collection grace ({gc_grace}) must be "
                             f"shorter than the retention window ({window})")
    client = endpoint.client()
    server = "unknown"
    for bucket in buckets:
        server = probe_bucket(client, endpoint, bucket, f"{STORE} backup of partition "
                              f"{pending.partition_key}")
    source = choose_reuse_source(repo, pending.partition_key, window=window, gc_grace=gc_grace)
    started = time.monotonic()
    copier = _Copier(client, endpoint.reader(), endpoint, repo,
                     repo.blobs.writer(pending.backup_id), repo.blobs.sizes())
    log(f"{len(copier.existing)} blobs in the repository; reusing unchanged objects from "
        f"{'snapshot ' + source.partition_key if source else 'no earlier snapshot'}")
    stats: dict[str, BucketStats] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-backup")
    try:
        with progress.tracking(f"{STORE} backup of {', '.join(buckets)}",
                               _estimate_objects(source, buckets), OBJECTS, estimated=True):
            for bucket in buckets:
                stats[bucket] = _backup_bucket(copier, pool, pending, bucket, source, log)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    copier.blobs.sync()  # the blobs written unsynced: durable at once, before the commit
    log(f"tags of downloaded objects: x-amz-tagging-count {copier.tag_counts.state}; "
        f"{copier.tag_counts.skipped} GetObjectTagging requests saved")
    fingerprint = MinioFingerprint(
        buckets={b: s.counts() for b, s in stats.items()},
        objects=sum(s.objects for s in stats.values()),
        bytes=sum(s.bytes for s in stats.values()),
        incremental_from=source.partition_key if source else None,
        transfer=Transfer(objects_copied=sum(s.objects_copied for s in stats.values()),
                          bytes_copied=sum(s.bytes_copied for s in stats.values()),
                          objects_reused=sum(s.objects_reused for s in stats.values()),
                          tag_reads_saved=copier.tag_counts.skipped,
                          duration_s=round(time.monotonic() - started, 3)))
    versions = {"boto3": boto3.__version__, "botocore": botocore.__version__}
    return BackupOutcome(fingerprint.to_dict(), versions, server, stats,
                         fingerprint.incremental_from)


def _estimate_objects(source: BackupRecord | None, buckets: Sequence[str]) -> int | None:
    """The objects of ``buckets`` in the previous snapshot: about what this backup will list
    (for progress; a listing's count is only known at its end)."""
    if source is None:
        return None
    try:
        counts = fingerprint_of(source).buckets
    except (IntegrityError, IdentityError):  # damaged, or sealed without a key: no estimate
        return None
    return sum(counts[b].objects for b in buckets if b in counts) or None


def _previous_entries(copier: _Copier, source: BackupRecord | None, bucket: str,
                      log: Log) -> Iterator[ObjectEntry]:
    if source is None:
        return iter(())
    try:
        if bucket not in snapshot_buckets(source):
            return iter(())
        check_snapshot(copier.repo, source, bucket)
    except IdentityError as exc:  # a backup side with the public key only
        log(f"bucket {bucket}: the snapshot of {source.partition_key} is encrypted and no "
            f"identity opens it, reading every object again ({exc})")
        return iter(())
    except IntegrityError as exc:
        log(f"bucket {bucket}: the snapshot of {source.partition_key} is damaged, copying every "
            f"object again ({exc})")
        return iter(())
    return read_snapshot(copier.repo, source, bucket)


def _backup_bucket(copier: _Copier, pool: ThreadPoolExecutor, pending: PendingBackup,
                   bucket: str, source: BackupRecord | None, log: Log) -> BucketStats:
    stats = BucketStats()
    previous = _Cursor(_previous_entries(copier, source, bucket, log))
    queue: deque[Future | tuple[ObjectEntry | None, str]] = deque()
    try:
        with write_snapshot(pending, bucket, source.partition_key if source else None) as write:

            def emit(result: tuple[ObjectEntry | None, str]) -> None:
                entry, how = result
                progress.advance(1, unit=OBJECTS)
                if entry is None:
                    stats.objects_vanished += 1
                    return
                write(entry)
                stats.objects += 1
                stats.bytes += entry.size
                if how == "copied":
                    stats.objects_copied += 1
                    stats.bytes_copied += entry.size
                else:
                    stats.objects_reused += 1

            def drain(everything: bool) -> None:
                while queue:
                    head = queue[0]
                    if isinstance(head, Future):
                        if not (everything or len(queue) > MAX_QUEUED or head.done()):
                            return
                        result = head.result()
                    else:
                        result = head
                    queue.popleft()
                    emit(result)

            for obj in _list_bucket(copier.reader, copier.endpoint, bucket):
                prev = previous.find(obj.key)
                if prev is not None and prev.size == obj.size and prev.etag == obj.etag \
                        and copier.blob_present(prev.sha256, prev.size):
                    if prev.last_modified == obj.last_modified:
                        queue.append(pool.submit(copier.retag, bucket, prev))
                    else:
                        queue.append(pool.submit(copier.refresh, bucket, obj, prev))
                else:
                    queue.append(pool.submit(copier.copy, bucket, obj))
                drain(False)
            drain(True)
    except BaseException:
        for item in queue:
            if isinstance(item, Future):
                item.cancel()
        raise
    finally:
        previous.close()
    log(f"bucket {bucket}: {stats.objects} objects ({stats.bytes} bytes): "
        f"{stats.objects_copied} copied ({stats.bytes_copied} bytes), {stats.objects_reused} "
        f"unchanged, {stats.objects_vanished} deleted during the backup")
    return stats
