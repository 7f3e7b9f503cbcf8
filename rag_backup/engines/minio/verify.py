"""Verification of a MinIO backup: every bucket's snapshot against the manifest (size, sha256,
key order, counts and bytes against the fingerprint), every referenced blob present with its
size, and the blobs' sha256 re-computed: all of them, or on large repositories a share that
rotates with the partition's day so that every blob is re-read within ``rotation_days``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any

from rag_backup import progress
from rag_backup.engines.minio.common import DEFAULT_WORKERS, EXAMPLES, STORE, Log, _quiet
from rag_backup.engines.minio.snapshot import fingerprint_of, read_snapshot, snapshot_buckets
from rag_backup.errors import IntegrityError, InvalidRequest
from rag_backup.pool import in_pool
from rag_backup.repository import BackupRecord, BackupRepository

DEFAULT_FULL_VERIFY_BYTES = 50 * 1024**3
DEFAULT_ROTATION_DAYS = 7


def _rotation_slot(partition_key: str, rotation_days: int) -> int:
    """Consecutive days get consecutive slots (modulo ``rotation_days``)."""
    return date.fromisoformat(partition_key[:10]).toordinal() % rotation_days


def _in_slot(sha: str, rotation_days: int, slot: int) -> bool:
    return int(sha[:8], 16) % rotation_days == slot


def _where_used(repo: BackupRepository, record: BackupRecord, shas: set[str],
                limit: int = EXAMPLES) -> dict[str, list[str]]:
    """For error messages: ``sha -> ["bucket/key", ...]`` (a few per blob)."""
    found: dict[str, list[str]] = {}
    for bucket in snapshot_buckets(record):
        for entry in read_snapshot(repo, record, bucket):
            if entry.sha256 in shas and len(found.setdefault(entry.sha256, [])) < limit:
                found[entry.sha256].append(f"{bucket}/{entry.key}")
    return found


def _rehash(repo: BackupRepository, sha: str, size: int) -> str | None:
    """None when the blob's bytes hash to its name and its size is right, else what is wrong."""
    return repo.blobs.check(sha, size)[0]


def verify(repo: BackupRepository, record: BackupRecord, *,
           full_max_bytes: int = DEFAULT_FULL_VERIFY_BYTES,
           rotation_days: int = DEFAULT_ROTATION_DAYS, workers: int = DEFAULT_WORKERS,
           log: Log = _quiet) -> dict[str, Any]:
    """Check a snapshot: every bucket's snapshot file against the manifest (size, sha256,
    order, counts and bytes against the fingerprint), every referenced blob present with its
    size, and the sha256 of blobs re-computed: all of them when the referenced content is at
    most ``full_max_bytes``, otherwise the share whose slot (first 32 bits of the hash modulo
    ``rotation_days``) is that of the partition's day, so consecutive daily verifications
    re-read every blob within ``rotation_days`` days."""
    if rotation_days < 1:
        raise InvalidRequest("rotation_days must be at least 1")
    part = record.partition_key
    fp = fingerprint_of(record)
    refs: dict[str, int] = {}
    objects = total = 0
    for bucket, counts in sorted(fp.buckets.items()):
        n = size = 0
        for entry in read_snapshot(repo, record, bucket):
            n += 1
            size += entry.size
            if refs.setdefault(entry.sha256, entry.size) != entry.size:
                raise IntegrityError(f"{STORE} backup {part}: bucket {bucket} key {entry.key!r} "
                                     f"has size {entry.size}, another object with the same "
                                     f"sha256 {entry.sha256} has {refs[entry.sha256]}")
        if n != counts.objects or size != counts.bytes:
            raise IntegrityError(f"{STORE} backup {part}: the snapshot of bucket {bucket} lists "
                                 f"{n} objects / {size} bytes, the fingerprint records "
                                 f"{counts.objects} / {counts.bytes}")
        objects += n
        total += size
    log(f"{objects} objects in {len(fp.buckets)} bucket snapshots reference "
        f"{len(refs)} blobs")

    unseen, wrong_size = dict(refs), {}
    for blob in repo.blobs.list():
        if blob.sha256 in unseen:
            if blob.size != unseen.pop(blob.sha256):
                wrong_size[blob.sha256] = f"{blob.size} bytes, {refs[blob.sha256]} expected"
    problems = {**{sha: "missing" for sha in unseen}, **wrong_size}
    if problems:
        _raise_blob_problems(repo, record, problems, "referenced blobs are missing or of the "
                             "wrong size")

    blob_bytes = sum(refs.values())
    if blob_bytes <= full_max_bytes:
        chosen, slot, coverage = list(refs), -1, "all referenced blobs"
    else:
        slot = _rotation_slot(part, rotation_days)
        chosen = [sha for sha in refs if _in_slot(sha, rotation_days, slot)]
        coverage = (f"share {slot + 1} of {rotation_days} (the partition's day): every blob is "
                    f"re-read within {rotation_days} days")
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="minio-verify") as pool, \
            progress.tracking(f"re-hashing the blobs of {STORE} backup {part}",
                              sum(refs[sha] for sha in chosen)):
        for sha, problem in in_pool(pool, lambda sha: (sha, _rehash(repo, sha, refs[sha])),
                                    chosen):
            progress.advance(refs[sha])
            if problem is not None:
                bad[sha] = problem
    if bad:
        _raise_blob_problems(repo, record, bad, "blobs do not match their sha256")
    rehashed_bytes = sum(refs[sha] for sha in chosen)
    log(f"re-hashed {len(chosen)} blobs ({rehashed_bytes} bytes): {coverage}")
    return {
        "buckets": len(fp.buckets),
        "objects_checked": objects,
        "bytes_in_snapshot": total,
        "blobs_referenced": len(refs),
        "blob_bytes_referenced": blob_bytes,
        "blobs_present": len(refs),
        "blobs_rehashed": len(chosen),
        "bytes_rehashed": rehashed_bytes,
        "rotation_days": 0 if slot < 0 else rotation_days,
        "rehash_coverage": coverage,
    }


def _raise_blob_problems(repo: BackupRepository, record: BackupRecord,
                         problems: dict[str, str], summary: str) -> None:
    used = _where_used(repo, record, set(problems))
    lines = []
    for sha, problem in sorted(problems.items())[:EXAMPLES]:
        keys = ", ".join(used.get(sha, [])) or "?"
        lines.append(f"{repo.blob_location(sha)}: {problem} (used by {keys})")
    more = f" (and {len(problems) - EXAMPLES} more)" if len(problems) > EXAMPLES else ""
    raise IntegrityError(
        f"{STORE} backup {record.partition_key}: {len(problems)} {summary}{more}: "
        + "; ".join(lines)
        + ". Delete the damaged blob files and run minio_backup for today's partition: objects "
          "still in the source are copied again; this snapshot cannot restore them.")
