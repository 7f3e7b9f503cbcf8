"""MinIO's part of garbage collection: which blobs the committed snapshots reference (every
snapshot read completely and checked; one that cannot be read refuses the collection, so
nothing is deleted). The rest (listing, grace period, temporaries, deletion) is the
repository's blob store (``BlobStore.collect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from rag_backup.engines.minio.common import DEFAULT_GC_GRACE, STORE, Log, _quiet
from rag_backup.engines.minio.snapshot import check_snapshot, read_snapshot, snapshot_buckets
from rag_backup.errors import IntegrityError
from rag_backup.repository import BackupRecord, BackupRepository, BlobCollection
from rag_backup.repository.manifest import utcnow


@dataclass(frozen=True)
class GcReport(BlobCollection):
    """What the blob store collected, and how many snapshots (referencing how many blobs) were
    read to know which blobs are referenced."""

    snapshots: int = 0
    blobs_referenced: int = 0


def referenced_blobs(repo: BackupRepository) -> tuple[int, set[str]]:
    """Every sha256 referenced by a committed snapshot (read completely and checked)."""
    referenced: set[str] = set()
    snapshots = 0
    for record in repo.list_backups(STORE):
        current: BackupRecord | None = record
        for _ in range(3):  # a re-run of the partition may replace it while we read it
            try:
                for bucket in snapshot_buckets(current):
                    check_snapshot(repo, current, bucket)
                    referenced.update(e.sha256 for e in read_snapshot(repo, current, bucket))
                snapshots += 1
                break
            except IntegrityError as exc:
                fresh = repo.get(STORE, record.partition_key)
                if fresh is None:  # deleted meanwhile (retention)
                    break
                if fresh.backup_id == current.backup_id:
                    raise IntegrityError(
                        f"{STORE} garbage collection refused, nothing deleted: the snapshot of "
                        f"partition {record.partition_key} cannot be read, so the blobs it "
                        f"references are unknown ({exc}). Re-run minio_backup for that "
                        "partition, or delete that backup if it is expendable.") from exc
                current = fresh
    return snapshots, referenced


def collect_garbage(repo: BackupRepository, *, grace: timedelta = DEFAULT_GC_GRACE,
                    now: datetime | None = None, dry_run: bool = False,
                    log: Log = _quiet) -> GcReport:
    """Delete blobs that no snapshot references, safely while a backup runs.

    The rule: a blob is deleted only when (1) no committed snapshot references it, read after
    retention has deleted the expired snapshots, and (2) its modification time (from the
    repository's listing) is older than ``grace``. Stale temporary files (of crashed backups) older
    than ``grace`` go too; files under the blob prefix that are not named like blobs are left
    alone. If any snapshot cannot be read, nothing is deleted.

    Why a backup running at the same time loses nothing, provided ``grace`` is longer than the
    longest backup (default 48 h):

    - every blob the backup writes gets a fresh mtime: a blob is written (or rewritten, when
      the same content exists already) whenever its object is downloaded, so it is younger than
      ``grace`` until the backup has committed the snapshot that references it;
    - every blob it reuses without writing is referenced by its reuse source, the newest
      snapshot whose age is at most ``window - grace``; retention cannot delete that snapshot
      before ``grace`` has passed, so it is one of the snapshots read here.
    """
    now = now or utcnow()  # before the snapshots are read: the grace counts from here
    snapshots, referenced = referenced_blobs(repo)
    found = repo.blobs.collect(referenced, grace=grace, now=now, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    log(f"{snapshots} snapshots reference {len(referenced)} blobs; {found.blobs_seen} blobs "
        f"stored; {verb} {found.blobs_deleted} unreferenced blobs ({found.bytes_deleted} bytes) "
        f"and {found.temporaries_deleted} stale temporary files; kept "
        f"{found.blobs_kept_in_grace} unreferenced blobs younger than {grace}")
    return GcReport(**asdict(found), snapshots=snapshots, blobs_referenced=len(referenced))
