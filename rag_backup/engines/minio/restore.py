"""MinIO restores: buckets of a snapshot back into themselves or into another bucket.

A restore runs the pre-flight first (``preflight.py``: nothing changes unless every blob it
will write is present and intact). The copy hashes each blob again as it reads it; one damaged
after the pre-flight stops the restore with ``RestoreAborted``, which says how far it got.
Single-part restores send the sha256 along (``ChecksumSHA256``) so that servers which check it
(MinIO, AWS) refuse a body damaged on the way. Afterwards every target is compared with the
snapshot (``compare.py``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import queue
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from rag_backup import progress
from rag_backup.engines.comparison import Comparison
from rag_backup.engines.minio.client import (
    CHANGED,
    MISSING_KEY,
    S3Endpoint,
    _bucket_exists,
    _code,
    check_bucket_name,
    refuse_repository_bucket,
    s3_errors,
)
from rag_backup.engines.minio.common import (
    CHUNK,
    DEFAULT_WORKERS,
    IN_FLIGHT,
    OBJECTS,
    STORE,
    Log,
    _quiet,
)
from rag_backup.engines.minio.compare import _compare
from rag_backup.engines.minio.objects import (
    HEADER_PARAMS,
    _headers,
    _list_bucket,
    _Listed,
    _merge,
    _Objects,
    _tag_header,
)
from rag_backup.engines.minio.preflight import Preflight, _Bits, _preflight
from rag_backup.engines.minio.snapshot import (
    ObjectEntry,
    _snapshot_artifact,
    fingerprint_of,
    read_snapshot,
    snapshot_buckets,
)
from rag_backup.errors import (
    ConfirmationRequired,
    IntegrityError,
    InvalidRequest,
    RagBackupError,
)
from rag_backup.repository import BackupRecord, BackupRepository

SMALL_OBJECT = 8 * 1024 * 1024     # restored with one checked PUT; larger ones multipart
PART_SIZE = 8 * 1024 * 1024        # restore: multipart part size (grown to stay under MAX_PARTS)
MAX_PARTS = 10_000


@dataclass(frozen=True)
class BucketRestore:
    source_bucket: str
    target_bucket: str
    in_snapshot: int
    restored: int
    skipped_identical: int       # identical objects left alone (those with tags corrected too)
    removed: int
    bytes_restored: int
    missing_after: int
    tags_corrected: int = 0      # identical objects whose tags were rewritten
    comparison: Comparison = field(default_factory=Comparison)

    @property
    def matches_snapshot(self) -> bool:
        return self.comparison.matches


@dataclass(frozen=True)
class RestoreReport:
    partition_key: str
    backup_id: str
    buckets: tuple[BucketRestore, ...]
    duration_s: float
    comparison: Comparison = field(default_factory=Comparison)  # every bucket's, together
    preflight: Preflight = field(default_factory=Preflight)

    def total(self, name: str) -> int:
        return sum(getattr(b, name) for b in self.buckets)

    @property
    def matches_snapshot(self) -> bool:
        return self.comparison.matches


class RestoreDiffers(IntegrityError):
    """After a restore, the target differs from the snapshot. The objects were written;
    ``report`` says what was restored and holds the comparison with every difference."""

    def __init__(self, message: str, report: RestoreReport) -> None:
        super().__init__(message)
        self.report = report


class RestoreAborted(IntegrityError):
    """A blob turned out missing or damaged while the restore copied it (it passed the
    pre-flight, so it changed in between): the restore stopped part-way. ``report`` says how
    far it got (the bucket it stopped in is the last, its comparison not run)."""

    def __init__(self, message: str, report: RestoreReport) -> None:
        super().__init__(message)
        self.report = report


class _BlobDamaged(IntegrityError):
    """A blob read during the copy is missing or does not match its sha256."""


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


@dataclass
class _Restorer(_Objects):
    repo: BackupRepository
    record: BackupRecord

    def _damaged(self, bucket: str, entry: ObjectEntry, problem: str) -> _BlobDamaged:
        return _BlobDamaged(
            f"{STORE} backup {self.record.partition_key}: the blob of {bucket}/{entry.key!r} "
            f"({self.repo.blobs.location(entry.sha256)}) {problem}; the object was "
            "not written. Restore it from another snapshot.")

    def upload(self, source_bucket: str, target: str, entry: ObjectEntry) -> None:
        """Write one object from its blob. The bytes are checked against the sha256 before the
        object becomes visible: small objects in memory, large ones before the multipart upload
        completes (aborted otherwise)."""
        extra: dict[str, Any] = {"Metadata": entry.metadata}
        if entry.content_type:
            extra["ContentType"] = entry.content_type
        for param, header in HEADER_PARAMS.items():
            if header in entry.headers:
                extra[param] = entry.headers[header]
        if entry.tags:  # with the object: no moment where it exists untagged
            extra["Tagging"] = _tag_header(entry.tags)
        try:
            stream = self.repo.blobs.open(entry.sha256)
        except FileNotFoundError as exc:
            raise self._damaged(source_bucket, entry, "is missing") from exc
        what = f"restore of {entry.key!r}"
        with stream:
            if entry.size <= SMALL_OBJECT:
                data = _read_exactly(stream, entry.size + 1)
                if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                    raise self._damaged(source_bucket, entry, "does not match its sha256")
                # The sha256 goes along: servers that check it (MinIO, AWS) refuse a body
                # damaged on the way.
                checksum = base64.b64encode(bytes.fromhex(entry.sha256)).decode()
                with s3_errors(self.endpoint, what, target):
                    self.client.put_object(Bucket=target, Key=entry.key, Body=data,
                                           ChecksumSHA256=checksum, **extra)
                return
            part_size = max(PART_SIZE, math.ceil(entry.size / MAX_PARTS / CHUNK) * CHUNK)
            with s3_errors(self.endpoint, what, target):
                upload_id = self.client.create_multipart_upload(
                    Bucket=target, Key=entry.key, **extra)["UploadId"]
            try:
                digest, length, parts = hashlib.sha256(), 0, []
                while True:
                    data = _read_exactly(stream, part_size)
                    if not data:
                        break
                    digest.update(data)
                    length += len(data)
                    with s3_errors(self.endpoint, what, target):
                        resp = self.client.upload_part(
                            Bucket=target, Key=entry.key, UploadId=upload_id,
                            PartNumber=len(parts) + 1, Body=data)
                    parts.append({"PartNumber": len(parts) + 1, "ETag": resp["ETag"]})
                if length != entry.size or digest.hexdigest() != entry.sha256:
                    raise self._damaged(source_bucket, entry, "does not match its sha256")
                with s3_errors(self.endpoint, what, target):
                    self.client.complete_multipart_upload(
                        Bucket=target, Key=entry.key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
            except BaseException:
                try:
                    self.client.abort_multipart_upload(Bucket=target, Key=entry.key,
                                                       UploadId=upload_id)
                except (ClientError, BotoCoreError):
                    pass
                raise

    def identical(self, target: str, entry: ObjectEntry) -> bool:
        """The target's object has the snapshot's bytes (etag, or sha256 when the etags
        differ, e.g. multipart uploads with another part size) and the same headers.
        Reads only (HEAD, and a GET when the etags differ)."""
        with s3_errors(self.endpoint, f"HEAD {entry.key!r}", target):
            try:
                head = self.client.head_object(Bucket=target, Key=entry.key)
            except ClientError as exc:
                if _code(exc) in MISSING_KEY:
                    return False
                raise
        if int(head["ContentLength"]) != entry.size \
                or dict(head.get("Metadata") or {}) != entry.metadata \
                or _headers(head) != entry.headers \
                or (entry.content_type and head.get("ContentType") != entry.content_type):
            return False
        if head["ETag"] == entry.etag:
            return True
        digest = hashlib.sha256()
        with s3_errors(self.endpoint, f"GET {entry.key!r}", target):
            try:
                body = self.client.get_object(Bucket=target, Key=entry.key,
                                              IfMatch=head["ETag"])["Body"]
            except ClientError as exc:
                if _code(exc) in MISSING_KEY | CHANGED:
                    return False
                raise
            with body:
                for chunk in iter(lambda: body.read(CHUNK), b""):
                    digest.update(chunk)
        return digest.hexdigest() == entry.sha256

    def put_tags(self, target: str, entry: ObjectEntry) -> None:
        """Give the target's object exactly the snapshot's tags."""
        with s3_errors(self.endpoint, f"tagging {entry.key!r}", target):
            if entry.tags:
                self.client.put_object_tagging(Bucket=target, Key=entry.key, Tagging={
                    "TagSet": [{"Key": k, "Value": v} for k, v in entry.tags.items()]})
            else:
                self.client.delete_object_tagging(Bucket=target, Key=entry.key)

    def restore_one(self, source_bucket: str, target: str, entry: ObjectEntry,
                    on_target: _Listed | None, identical: bool) -> str:
        """``"restored"`` (written), ``"skipped"`` (identical) or ``"retagged"`` (identical
        bytes and headers, tags corrected). ``identical`` is the pre-flight's finding (it
        compared the target's object, reading only); an object gone since is written. A
        version-1 entry does not know its tags: an identical object keeps the ones it has."""
        if identical and on_target is not None and on_target.size == entry.size:
            if entry.tags is None:
                return "skipped"
            current = self.tags(target, entry.key)
            if current is not None:
                if current == entry.tags:
                    return "skipped"
                self.put_tags(target, entry)
                return "retagged"
        self.upload(source_bucket, target, entry)
        return "restored"


def _ensure_bucket(client: Any, endpoint: S3Endpoint, bucket: str, log: Log) -> bool:
    """Create ``bucket`` if it does not exist; True if it was created."""
    if _bucket_exists(client, endpoint, bucket, "restore target"):
        return False
    with s3_errors(endpoint, "restore target", bucket):
        args: dict[str, Any] = {"Bucket": bucket}
        if endpoint.region and endpoint.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": endpoint.region}
        try:
            client.create_bucket(**args)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou",):
                raise
    log(f"created bucket {bucket!r} on {endpoint.describe()}")
    return True


def restore(repo: BackupRepository, record: BackupRecord, endpoint: S3Endpoint, *,
            buckets: Sequence[str] | None = None, target_bucket: str = "", prefix: str = "",
            remove_extra: bool = False, confirm: str = "", workers: int = DEFAULT_WORKERS,
            accept_differences: bool = False, log: Log = _quiet) -> RestoreReport:
    """Restore buckets of a snapshot: each into itself, or one into ``target_bucket`` (created
    if missing), optionally only keys starting with ``prefix``.

    First a pre-flight that changes nothing (``_preflight``): every snapshot read to its end
    and checked, the target's objects compared (reading only), and every blob the restore will
    write checked by size and sha256. A missing or damaged one refuses the restore with
    ``IntegrityError`` before any bucket is created or any object written, tagged or removed.

    Objects on the target that are identical (size, bytes, headers) are skipped; their tags
    are corrected when they differ. Objects on the target that the snapshot does not have
    (under ``prefix``) are kept, unless ``remove_extra`` with ``confirm`` equal to the target
    bucket's name; they are removed only after every object of the snapshot was restored.
    The copy checks every blob against its sha256 again as it reads it, before its object is
    written; one that changed since the pre-flight stops the restore (``RestoreAborted``,
    saying how far it got).

    Afterwards every target is compared with the snapshot, object by object (see
    ``compare_bucket``; objects not in the snapshot count as differences when
    ``remove_extra``). A difference raises ``RestoreDiffers`` (carrying the report) unless
    ``accept_differences``; an aspect that could not be compared (tags of a version-1
    snapshot) is reported in ``comparison.not_run`` and makes ``matches_snapshot`` false."""
    started = time.monotonic()
    available = snapshot_buckets(record)
    chosen = list(dict.fromkeys(buckets)) if buckets else available
    unknown = [b for b in chosen if b not in available]
    if unknown:
        raise InvalidRequest(f"{STORE} backup {record.partition_key} has no snapshot of "
                             f"bucket(s) {unknown}; it has {available}")
    if target_bucket and len(chosen) != 1:
        raise InvalidRequest(f"target_bucket needs exactly one source bucket (the snapshot has "
                             f"{available}; choose one in buckets)")
    pairs = [(b, target_bucket or b) for b in chosen]
    for _, target in pairs:
        check_bucket_name(target, "target bucket")
        refuse_repository_bucket(repo, target, "target")
        if remove_extra and confirm != target:
            raise ConfirmationRequired(
                f"removing objects of bucket {target!r} that are not in the snapshot of "
                f"{record.partition_key} is destructive: set confirm to {target!r} to proceed "
                f"(or leave remove_extra off to keep them)")
    for source, _ in pairs:
        _snapshot_artifact(record, source)  # listed in the manifest (read by the pre-flight)
    restorer = _Restorer(endpoint.client(), endpoint.reader(), endpoint, repo, record)
    reports: list[BucketRestore] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-restore") \
            as pool:
        counts = fingerprint_of(record).buckets
        with progress.tracking(f"pre-flight of the {STORE} restore of {record.partition_key}",
                               None if prefix else sum(counts[s].objects for s, _ in pairs),
                               OBJECTS):
            preflight, plans = _preflight(restorer, pool, pairs, prefix, log)
        try:
            for (source, target), plan in zip(pairs, plans):
                reports.append(_restore_bucket(restorer, pool, source, target, prefix,
                                               remove_extra, plan, log))
        except _Stopped as stop:
            report = RestoreReport(record.partition_key, record.backup_id,
                                   (*reports, stop.bucket), time.monotonic() - started,
                                   _combined([b.comparison for b in (*reports, stop.bucket)]),
                                   preflight)
            raise RestoreAborted(stop.message, report) from stop.__cause__
    report = RestoreReport(record.partition_key, record.backup_id, tuple(reports),
                           time.monotonic() - started,
                           _combined([b.comparison for b in reports]), preflight)
    comparison = report.comparison
    log(f"comparison with the snapshot: {dict(sorted(comparison.compared.items()))} compared; "
        f"{comparison.summary()}")
    if comparison.differences and not accept_differences:
        raise RestoreDiffers(
            f"{STORE} restore of {record.partition_key} into "
            f"{', '.join(t for _, t in pairs)}: the target differs from the snapshot in "
            f"{len(comparison.differences)} properties: {comparison.summary()}. The objects "
            "were written; find what else writes to the bucket and restore again, or set "
            "accept_differences to accept the restore as it is.", report)
    return report


def _combined(parts: Sequence[Comparison]) -> Comparison:
    """Several buckets' comparisons as one (their items already name their bucket)."""
    total = Comparison()
    for part in parts:
        for aspect, n in part.compared.items():
            total.count(aspect, n)
        total.differences.extend(part.differences)
        for aspect, why in part.not_run.items():
            total.skip(aspect, f"{total.not_run[aspect]}; {why}" if aspect in total.not_run
                       else why)
    return total


class _Stopped(Exception):
    """A bucket's copy stopped on a blob damaged after the pre-flight: how far it got."""

    def __init__(self, message: str, bucket: BucketRestore) -> None:
        super().__init__(message)
        self.message, self.bucket = message, bucket


def _restore_bucket(restorer: _Restorer, pool: ThreadPoolExecutor, source: str, target: str,
                    prefix: str, remove_extra: bool, plan: _Bits, log: Log) -> BucketRestore:
    client, endpoint, repo, record = (restorer.client, restorer.endpoint, restorer.repo,
                                      restorer.record)
    _ensure_bucket(client, endpoint, target, log)
    entries = (e for e in read_snapshot(repo, record, source) if e.key.startswith(prefix))
    listed = _list_bucket(restorer.reader, endpoint, target, prefix)
    in_snapshot = restored = skipped = retagged = restored_bytes = 0
    extra: list[str] = []
    # Each transfer is counted when it ends, in any order (the counts are all it gives), so a
    # large object still moving holds back neither the small ones after it nor memory:
    # at most IN_FLIGHT entries wait, whatever the bucket's size.
    pending: dict[Future, ObjectEntry] = {}
    ended: queue.SimpleQueue[Future] = queue.SimpleQueue()

    def count(outcome: str, entry: ObjectEntry) -> None:
        nonlocal restored, skipped, retagged, restored_bytes
        progress.advance(entry.size)
        if outcome == "restored":
            restored += 1
            restored_bytes += entry.size
        else:
            skipped += 1
            retagged += outcome == "retagged"

    def settle(block: bool) -> None:
        while pending and (block or len(pending) > IN_FLIGHT or not ended.empty()):
            future = ended.get()
            count(future.result(), pending.pop(future))

    with progress.tracking(f"{STORE} restore of {source} into {target}",
                           None if prefix else fingerprint_of(record).buckets[source].bytes):
        try:
            for entry, obj in _merge(entries, listed):
                if entry is None:
                    assert obj is not None
                    extra.append(obj.key)
                    continue
                index = in_snapshot
                in_snapshot += 1
                future = pool.submit(restorer.restore_one, source, target, entry, obj,
                                     plan[index])
                pending[future] = entry
                future.add_done_callback(ended.put)
                settle(False)
            settle(True)
        except _BlobDamaged as exc:
            # Let the transfers already running finish (they were checked), then say how far.
            for future in pending:
                future.cancel()
            for future, entry in pending.items():
                if not future.cancelled():
                    try:
                        count(future.result(), entry)
                    except Exception:  # noqa: BLE001 - the first failure is the one reported
                        pass
            stopped = Comparison()
            stopped.skip("objects", f"the restore of {source} into {target} stopped part-way")
            message = (
                f"{STORE} restore of {record.partition_key} into {target} stopped part-way: {exc} "
                f"The blob passed the pre-flight, so it was damaged or removed since. The target "
                f"WAS changed: {restored} of the {plan.count} objects of {source}"
                f"{' under ' + repr(prefix) if prefix else ''} written ({restored_bytes} bytes), "
                f"{skipped} found identical and left alone ({retagged} re-tagged); nothing was "
                "removed. Restore again from another snapshot (another partition_key).")
            log(message)
            raise _Stopped(message, BucketRestore(
                source, target, plan.count, restored, skipped, 0, restored_bytes, 0, retagged,
                stopped)) from exc
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    removed = 0
    if remove_extra and extra:
        with s3_errors(endpoint, "removing objects not in the snapshot", target):
            for start in range(0, len(extra), 1000):
                batch = extra[start:start + 1000]
                resp = client.delete_objects(Bucket=target, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise RagBackupError(f"{endpoint.describe(target)} refused to delete "
                                         f"{len(resp['Errors'])} objects, e.g. {first}")
                removed += len(batch)
    # Independent check: what the target now has, object by object, against the snapshot.
    with progress.tracking(f"comparing {target} with the snapshot of {source}",
                           None if prefix else fingerprint_of(record).buckets[source].bytes):
        comparison = _compare(restorer, pool, repo, record, source, target, prefix,
                              extra_objects=remove_extra)
    missing = sum(1 for d in comparison.differences
                  if d.property == "object" and d.actual is None)
    log(f"{source} -> {target}: {in_snapshot} objects in the snapshot"
        f"{' under ' + repr(prefix) if prefix else ''}: {restored} restored ({restored_bytes} "
        f"bytes), {skipped} identical skipped ({retagged} of them re-tagged), {removed} not in "
        f"the snapshot removed, {len(extra) - removed} not in the snapshot kept, {missing} "
        f"missing afterwards, {len(comparison.differences)} differences")
    return BucketRestore(source, target, in_snapshot, restored, skipped, removed,
                         restored_bytes, missing, retagged, comparison)
