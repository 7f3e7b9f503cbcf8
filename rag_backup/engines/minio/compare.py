"""The comparison of a bucket with a snapshot, after every restore (and on its own).

After every restore, the target is compared with the snapshot object by object
(``compare_bucket``): presence, size, sha256 of the bytes the server returns (re-read in
parallel and hashed as they stream: moto, the test server, stores a client-sent
``x-amz-checksum-sha256`` without checking it and returns none unless asked for the algorithm,
so a server-side checksum would prove nothing there), content type, user metadata, the PUT
headers and tags (GetObjectTagging, except where the GET's ``x-amz-tagging-count`` proves an
object has none, once the comparison has seen that header match on a tagged object: see
``objects._TagCountTrust``). A difference fails the restore (``RestoreDiffers``, which carries the
report) unless ``accept_differences``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from rag_backup import progress
from rag_backup.engines.comparison import Comparison
from rag_backup.engines.minio.client import S3Endpoint, check_bucket_name
from rag_backup.engines.minio.common import DEFAULT_WORKERS, MAX_QUEUED, STORE
from rag_backup.engines.minio.objects import _list_bucket, _merge, _Objects, _Observed
from rag_backup.engines.minio.snapshot import (
    ObjectEntry,
    check_snapshot,
    fingerprint_of,
    read_snapshot,
    snapshot_buckets,
)
from rag_backup.errors import InvalidRequest
from rag_backup.repository import BackupRecord, BackupRepository


def _compare_dicts(comparison: Comparison, aspect: str, item: str, label: str,
                   expected: dict[str, str], actual: dict[str, str]) -> None:
    """One comparison of ``aspect``; a difference per name whose value differs."""
    comparison.count(aspect)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            comparison.differ(item, f"{label} {name}", expected.get(name), actual.get(name))


def _compare_object(comparison: Comparison, item: str, entry: ObjectEntry,
                    seen: _Observed | None) -> None:
    comparison.count("objects")
    progress.advance(entry.size)  # read back and hashed (or found missing)
    if seen is None:
        comparison.differ(item, "object", f"present ({entry.size} bytes)", None)
        return
    comparison.check("sizes", item, "size", entry.size, seen.size)
    comparison.check("sha256", item, "sha256", entry.sha256, seen.sha256)
    if entry.content_type:  # always recorded: S3 gives every object one
        comparison.check("content_type", item, "content type", entry.content_type,
                         seen.head.content_type)
    _compare_dicts(comparison, "metadata", item, "metadata", entry.metadata, seen.head.metadata)
    _compare_dicts(comparison, "headers", item, "header", entry.headers, seen.head.headers)
    if entry.tags is not None:
        _compare_dicts(comparison, "tags", item, "tag", entry.tags, seen.tags)


def _compare(objects: _Objects, pool: ThreadPoolExecutor, repo: BackupRepository,
             record: BackupRecord, source: str, target: str, prefix: str, *,
             extra_objects: bool) -> Comparison:
    """Walk the snapshot of ``source`` alongside the listing of ``target`` (both in key
    order, memory bounded); every object present on both is read back by the pool (bytes
    hashed as they stream, headers, tags) and compared field by field."""
    comparison = Comparison()
    entries = (e for e in read_snapshot(repo, record, source) if e.key.startswith(prefix))
    listed = _list_bucket(objects.reader, objects.endpoint, target, prefix)
    pending: deque[tuple[Future, ObjectEntry]] = deque()
    untagged = 0

    def settle(block: bool) -> None:
        while pending and (block or pending[0][0].done() or len(pending) > MAX_QUEUED):
            future, entry = pending.popleft()
            _compare_object(comparison, f"{target}/{entry.key}", entry, future.result())

    try:
        for entry, obj in _merge(entries, listed):
            if entry is None:
                assert obj is not None
                if extra_objects:
                    comparison.count("objects")
                    comparison.differ(f"{target}/{obj.key}", "object", None,
                                      f"present ({obj.size} bytes), not in the snapshot")
                continue
            untagged += entry.tags is None
            if obj is None:
                _compare_object(comparison, f"{target}/{entry.key}", entry, None)
                continue
            pending.append((pool.submit(objects.observe, target, entry.key), entry))
            settle(False)
        settle(True)
    except BaseException:
        for future, _ in pending:
            future.cancel()
        raise
    if untagged:
        comparison.skip("tags", f"the snapshot of bucket {source!r} ({record.partition_key}) "
                                f"is format version 1, which did not record object tags "
                                f"({untagged} objects)")
    return comparison


def compare_bucket(repo: BackupRepository, record: BackupRecord, endpoint: S3Endpoint,
                   bucket: str, target_bucket: str = "", *, prefix: str = "",
                   extra_objects: bool = False, workers: int = DEFAULT_WORKERS) -> Comparison:
    """Compare what ``target_bucket`` (default: ``bucket`` itself) has now with the snapshot
    of ``bucket``, object by object: presence, size, sha256 of the bytes the server returns,
    content type, user metadata, the PUT headers and tags (not run for a version-1
    snapshot). Objects only on the target are differences when ``extra_objects``. Items are
    named ``<target bucket>/<key>``, properties e.g. ``sha256``, ``tag project``,
    ``metadata source``, ``header Cache-Control``. Reads only."""
    if bucket not in snapshot_buckets(record):
        raise InvalidRequest(f"{STORE} backup {record.partition_key} has no snapshot of "
                             f"bucket {bucket!r}; it has {snapshot_buckets(record)}")
    target = check_bucket_name(target_bucket or bucket, "target bucket")
    check_snapshot(repo, record, bucket)
    objects = _Objects(endpoint.client(), endpoint.reader(), endpoint)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-compare") \
            as pool, progress.tracking(f"comparing {target} with the snapshot of {bucket}",
                                       None if prefix else
                                       fingerprint_of(record).buckets[bucket].bytes):
        return _compare(objects, pool, repo, record, bucket, target, prefix,
                        extra_objects=extra_objects)
