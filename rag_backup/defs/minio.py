"""MinIO: daily incremental snapshots, their verification, retention with garbage collection,
and the restore job."""

import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.defs.freshness import rpo_freshness
from rag_backup.defs.common import (
    RetentionConfig,
    StorePolicy,
    apply_retention,
    commit_backup,
    comparison_metadata,
    retry_when_unreachable,
    run_holder,
    verify_and_record,
)
from rag_backup.defs.offsite_settings import (
    choice_metadata,
    repository_field,
    restore_repository,
)
from rag_backup.defs.partitions import DAILY_PARTITIONS, SCHEDULE_STATUS
from rag_backup.defs.resources import BackupRepositoryResource, MinioResource
from rag_backup.engines import minio as engine
from rag_backup.errors import InvalidRequest
from rag_backup.repository import LATEST, BackupRepository
from rag_backup.repository.manifest import utcnow

STORE = engine.STORE
RETENTION = timedelta(days=14)
GROUP = "minio"
KINDS = {"minio"}
POOL = "minio"
Log = Callable[[str], None]


@dg.asset(partitions_def=DAILY_PARTITIONS, group_name=GROUP, kinds=KINDS, pool=POOL,
          owners=["team:platform"])
def minio_backup(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                 minio: MinioResource) -> dg.MaterializeResult:
    """Daily snapshot of every configured MinIO bucket: each object's key, size, etag, sha256,
    content type, user metadata, other PUT headers and tags, pointing at content-addressed
    blobs in the repository. Only new or changed objects are downloaded (in parallel, streamed
    and hashed); unchanged ones are taken from the previous snapshot, their tags read again
    (a tag change leaves the etag as it was). Every day of the 14-day window stays
    restorable, deleted and overwritten objects included."""
    def take(pending):
        return engine.backup(minio.s3(), pending, minio.bucket_list(), window=RETENTION,
                             gc_grace=minio.gc_grace, workers=minio.workers,
                             log=context.log.info)

    return commit_backup(context, repository.open(), STORE, RETENTION, take, plotted_counts)


def plotted_counts(outcome: engine.BackupOutcome) -> dict[str, int]:
    """What the UI plots for a MinIO backup: its fingerprint's counts, and the objects deleted
    while it ran."""
    fp = engine.fingerprint_of(outcome)
    return {"objects": fp.objects, "bytes": fp.bytes, "objects_copied": fp.objects_copied,
            "objects_reused": fp.objects_reused, "bytes_copied": fp.bytes_copied,
            "objects_vanished": outcome.objects_vanished, "buckets": len(fp.buckets)}


class MinioVerifyConfig(dg.Config):
    full_verify_max_bytes: int = Field(
        default=engine.DEFAULT_FULL_VERIFY_BYTES,
        description="Re-hash every referenced blob while their total size is at most this; "
                    "above it, re-hash a rotating share each day.")
    rotation_days: int = Field(
        default=engine.DEFAULT_ROTATION_DAYS,
        description="With a rotating share: every blob is re-hashed within this many days "
                    "(at most the 14-day retention window).")


@dg.asset(deps=[minio_backup], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"],
          freshness_policy=rpo_freshness(timedelta(days=1)))
def minio_backup_verified(context: dg.AssetExecutionContext, config: MinioVerifyConfig,
                          repository: BackupRepositoryResource,
                          minio: MinioResource) -> dg.MaterializeResult:
    """The partition's snapshot, verified: every bucket snapshot matches the manifest, every
    referenced blob is present with its size, and blob sha256s are re-computed (all of them,
    or on large repositories a rotating share so that every blob is re-read within
    `rotation_days`). The result, with its coverage, is recorded in the repository."""
    if not 1 <= config.rotation_days <= RETENTION.days:
        raise InvalidRequest(f"rotation_days must be between 1 and {RETENTION.days} (the "
                             "retention window), or some blobs would never be re-read")
    repo = repository.open()
    return verify_and_record(context, repo, STORE, lambda record: engine.verify(
        repo, record, full_max_bytes=config.full_verify_max_bytes,
        rotation_days=config.rotation_days, workers=minio.workers, log=context.log.info))


@dg.asset(deps=[minio_backup_verified], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"])
def minio_retention(context: dg.AssetExecutionContext, config: RetentionConfig,
                    repository: BackupRepositoryResource,
                    minio: MinioResource) -> dg.MaterializeResult:
    """Deletes MinIO snapshots older than 14 days (never the newest verified one), then
    collects the blobs that no remaining snapshot references and that are older than the grace
    period (`gc_grace_hours`, longer than any backup), so a backup running at the same time
    loses nothing."""
    repo = repository.open()
    result = apply_retention(context, repo, STORE, RETENTION, config,
                             (minio_backup.key, minio_backup_verified.key))
    with retry_when_unreachable():
        gc = engine.collect_garbage(repo, grace=minio.gc_grace, now=utcnow(),
                                    dry_run=config.dry_run, log=context.log.info)
    return dg.MaterializeResult(metadata={
        **(result.metadata or {}),
        "snapshots": dg.MetadataValue.int(gc.snapshots),
        "blobs_referenced": dg.MetadataValue.int(gc.blobs_referenced),
        "blobs_stored": dg.MetadataValue.int(gc.blobs_seen - (0 if gc.dry_run
                                                              else gc.blobs_deleted)),
        "blobs_collected": dg.MetadataValue.int(gc.blobs_deleted),
        "bytes_collected": dg.MetadataValue.int(gc.bytes_deleted),
        "blobs_kept_in_grace": dg.MetadataValue.int(gc.blobs_kept_in_grace),
        "temporaries_deleted": dg.MetadataValue.int(gc.temporaries_deleted),
    })


class RestoreMinioConfig(dg.Config):
    partition_key: str = Field(default=LATEST, description="The snapshot: its daily partition "
                               "(YYYY-MM-DD), or 'latest' for the newest verified snapshot.")
    repository: str = repository_field()
    buckets: list[str] = Field(default=[], description="Buckets of the snapshot to restore; "
                               "empty: every bucket in it.")
    target_bucket: str = Field(default="", description="Bucket to restore into (created if "
                               "missing); needs exactly one source bucket. Empty: each bucket "
                               "into itself.")
    prefix: str = Field(default="", description="Only restore objects whose key starts with "
                        "this prefix (removal, if asked, is limited to it too).")
    remove_extra: bool = Field(default=False, description="Delete objects of the target (under "
                               "prefix) that are not in the snapshot. Needs confirm.")
    confirm: str = Field(default="", description="To remove objects, type the target bucket's "
                         "name here.")
    workers: int = Field(default=8, description="Parallel object transfers.")
    allow_unverified: bool = Field(default=False, description="Allow a snapshot that has not "
                                   "passed verification (not recommended).")
    accept_differences: bool = Field(
        default=False, description="After the restore, every object of the target is compared "
        "with the snapshot (size, sha256, content type, metadata, headers, tags). A difference "
        "fails the run unless this is set; the objects are written either way.")


def restore_in_place(config: RestoreMinioConfig, snapshot_buckets: list[str]) -> bool:
    """Whether the restore writes into a bucket the snapshot was taken of (objects there may
    be overwritten) or removes objects: such a restore holds the store's writer lease."""
    sources = config.buckets or snapshot_buckets
    return (config.remove_extra or not config.target_bucket
            or config.target_bucket in sources)


def run_restore(config: RestoreMinioConfig, repo: BackupRepository, minio: MinioResource,
                log: Log, holder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The restore of ``restore_minio``, without Dagster (the job and the command line both
    run it): returns the summary (the op's output) and the run's metadata. ``holder`` names
    this writer in the store's lease, taken when the restore writes into a source bucket."""
    record = repo.resolve(STORE, config.partition_key,
                          require_verified=not config.allow_unverified)
    log(f"restoring snapshot {record.partition_key} ({record.backup_id})")
    lease = (repo.lease(STORE, holder, "a restore into the snapshot's own buckets")
             if restore_in_place(config, engine.snapshot_buckets(record))
             else contextlib.nullcontext())
    with lease:
        report = engine.restore(
            repo, record, minio.s3(config.workers), buckets=config.buckets or None,
            target_bucket=config.target_bucket, prefix=config.prefix,
            remove_extra=config.remove_extra, confirm=config.confirm, workers=config.workers,
            accept_differences=config.accept_differences, log=log)
    metadata = {
        "partition_key": dg.MetadataValue.text(record.partition_key),
        "backup_id": dg.MetadataValue.text(record.backup_id),
        "targets": dg.MetadataValue.text(", ".join(
            f"{b.source_bucket} -> {b.target_bucket}" for b in report.buckets)),
        "objects_in_snapshot": dg.MetadataValue.int(report.total("in_snapshot")),
        "objects_restored": dg.MetadataValue.int(report.total("restored")),
        "objects_skipped_identical": dg.MetadataValue.int(report.total("skipped_identical")),
        "objects_removed": dg.MetadataValue.int(report.total("removed")),
        "objects_tags_corrected": dg.MetadataValue.int(report.total("tags_corrected")),
        "bytes_restored": dg.MetadataValue.int(report.total("bytes_restored")),
        "matches_snapshot": dg.MetadataValue.bool(report.matches_snapshot),
        **comparison_metadata(report.comparison),
        "preflight_blobs_checked": dg.MetadataValue.int(report.preflight.blobs_checked),
        "preflight_bytes_hashed": dg.MetadataValue.int(report.preflight.bytes_hashed),
        "preflight_objects_identical": dg.MetadataValue.int(
            report.preflight.objects_identical),
        "preflight_s": dg.MetadataValue.float(round(report.preflight.duration_s, 3)),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    }
    summary = {"partition_key": record.partition_key, "backup_id": record.backup_id,
               "matches_snapshot": report.matches_snapshot,
               "comparison": report.comparison.to_dict(),
               "preflight": report.preflight.to_dict(),
               "buckets": {b.source_bucket: {
                   "target": b.target_bucket, "in_snapshot": b.in_snapshot,
                   "restored": b.restored, "skipped_identical": b.skipped_identical,
                   "tags_corrected": b.tags_corrected, "removed": b.removed,
                   "bytes_restored": b.bytes_restored, "missing_after": b.missing_after}
                   for b in report.buckets}}
    return summary, metadata


@dg.op(pool=POOL)
def restore_minio(context: dg.OpExecutionContext, config: RestoreMinioConfig,
                  repository: BackupRepositoryResource, minio: MinioResource) -> dict:
    """Restore buckets of a MinIO snapshot, skipping identical objects (their tags corrected),
    then compare every object of the target with the snapshot, field by field. A pre-flight
    first checks the snapshot and every blob the restore will write (size and sha256); a
    missing or damaged one fails the run before the target is changed at all."""
    with retry_when_unreachable():
        choice = restore_repository(repository, config, STORE, context.log.info)
        summary, metadata = run_restore(config, choice.repo, minio, context.log.info,
                                        run_holder(context))
    context.add_output_metadata({**metadata, **choice_metadata(choice)})
    return summary


@dg.job(tags={"store": STORE, "kind": "restore"})
def restore_minio_job():
    """Restore MinIO buckets from a snapshot (a day of the 14-day window, or the latest
    verified) into the same buckets or another one, optionally under a key prefix. Nothing is
    changed unless every blob it needs is present and intact (checked first). Content
    type, user metadata, headers and tags are restored; identical objects are skipped (their
    tags corrected); objects not in the snapshot are only removed with confirmation. Every
    object is then compared with the snapshot; a difference fails the run unless
    accept_differences."""
    restore_minio()


minio_backup_job = dg.define_asset_job(
    "minio_backup_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Snapshot, verify and apply retention (with garbage collection) for one daily "
                "MinIO partition.",
)

minio_backup_schedule = dg.build_schedule_from_partitioned_job(
    minio_backup_job, hour_of_day=2, minute_of_hour=0, default_status=SCHEDULE_STATUS)

POLICY = StorePolicy(
    store=STORE, job=minio_backup_job, partitions_def=DAILY_PARTITIONS, retention=RETENTION,
    rpo=timedelta(days=1), due_after=timedelta(hours=2), backup_asset=minio_backup.key)

defs = dg.Definitions(
    assets=[minio_backup, minio_backup_verified, minio_retention],
    jobs=[minio_backup_job, restore_minio_job],
    schedules=[minio_backup_schedule],
)
