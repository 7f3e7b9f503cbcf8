"""What every store's assets share: metadata, verification bookkeeping, retention, retries."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.defs.partition_index import mark_partitions_deleted
from rag_backup.defs.partitions import context_window, window_of
from rag_backup.engines.comparison import Comparison
from rag_backup.errors import BackupNotFound, RepositoryError, StoreBusy, StoreUnreachable
from rag_backup.repository.crypto import IdentityError
from rag_backup.repository import (
    DEFAULT_STALE_AGE,
    BackupRecord,
    BackupRepository,
    Manifest,
    PendingBackup,
    StaleWrite,
    Verification,
)
from rag_backup.repository.blobs import TMP_PREFIX as BLOB_TMP_PREFIX
from rag_backup.repository.lease import holder_name
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.retention import ensure_within_window

UNREACHABLE_RETRIES = 3
UNREACHABLE_WAIT_S = 30
# Stores whose backups share content-addressed files outside their partitions: their garbage
# collection must not run while a manifest (the list of what is referenced) is unreadable.
SHARED_CONTENT_STORES = frozenset({"minio"})


@dataclass(frozen=True)
class StorePolicy:
    """What automation needs to know about a store: its job, partitions and objectives."""

    store: str
    job: Any  # the store's asset job (an unresolved asset job definition)
    partitions_def: dg.TimeWindowPartitionsDefinition
    retention: timedelta
    rpo: timedelta
    due_after: timedelta  # how long after a partition starts its scheduled backup is due
    backup_asset: dg.AssetKey


def is_transient(exc: BaseException) -> bool:
    """An unreachable store, a transient repository failure (connection, timeout, 5xx), or a
    store whose lease another writer (the command line) holds."""
    return isinstance(exc, (StoreUnreachable, StoreBusy)) or (
        isinstance(exc, RepositoryError) and exc.transient)


def run_holder(context) -> str:
    """How a Dagster run names itself as a lease holder."""
    return holder_name(f"Dagster run {context.run.run_id} ({context.run.job_name})")


@contextmanager
def retry_when_unreachable() -> Iterator[None]:
    """Turn a transient failure (an unreachable store, a repository connection, timeout or
    5xx) into a Dagster retry with backoff; nothing else (a full disk, refused credentials or a
    damaged backup are not retried)."""
    try:
        yield
    except (StoreUnreachable, StoreBusy, RepositoryError) as exc:
        if not is_transient(exc):
            raise
        raise dg.RetryRequested(max_retries=UNREACHABLE_RETRIES,
                                seconds_to_wait=UNREACHABLE_WAIT_S) from exc


def backup_metadata(manifest: Manifest, location: str, **counts: int) -> dict[str, Any]:
    """Metadata the UI plots over time for a committed backup."""
    return {
        "backup_id": dg.MetadataValue.text(manifest.backup_id),
        "size_bytes": dg.MetadataValue.int(manifest.size_bytes),
        "duration_s": dg.MetadataValue.float(round(manifest.duration_s, 3)),
        "artifacts": dg.MetadataValue.int(len(manifest.artifacts)),
        "location": (dg.MetadataValue.url(location) if location.startswith("s3://")
                     else dg.MetadataValue.path(location)),
        **{name: dg.MetadataValue.int(value) for name, value in counts.items()},
    }


def commit_backup(context: dg.AssetExecutionContext, repo: BackupRepository, store: str,
                  window: timedelta, take: Callable[[PendingBackup], Any],
                  counts: Callable[[Any], dict[str, int]]) -> dg.MaterializeResult:
    """Back up the context's partition: refuse one outside ``window``, run ``take`` (an engine's
    backup) into a pending backup, commit it, and report its metadata.

    ``take`` returns an outcome with ``fingerprint``, ``tool_versions`` and ``server_version``;
    ``counts`` turns it into the numbers the UI plots. Unreachable stores and transient
    repository failures are retried; a clean-up failure never hides the error that caused it.
    A run that loses a race with another writer of the partition fails with
    ``ConcurrentBackup`` naming that run; neither run's files are deleted by the other."""
    key = context.partition_key
    partition = context_window(context)  # recorded in the manifest
    ensure_within_window(store, key, start=partition.start, now=utcnow(), window=window)
    with retry_when_unreachable():
        outcome, record = repo.take(store, key, context.run.run_id, run_holder(context), take,
                                    window=partition)
    metadata = backup_metadata(record.manifest, record.location, **counts(outcome))
    metadata["server_version"] = dg.MetadataValue.text(outcome.server_version)
    return dg.MaterializeResult(metadata=metadata)


def verify_and_record(context: dg.AssetExecutionContext, repo: BackupRepository, store: str,
                      check: Callable[[BackupRecord], dict[str, Any]]) -> dg.MaterializeResult:
    """Run ``check`` on the partition's backup and record the outcome in the repository,
    failed or not, so retention and restores know it."""
    key = context.partition_key
    record = repo.get(store, key)
    if record is None:
        raise BackupNotFound(f"{store}: no committed backup for partition {key} to verify; "
                             f"materialize {store}_backup for it first")
    started = time.monotonic()
    try:
        checks = check(record)
    except IdentityError:  # no key to read the backup with: not run, nothing recorded
        raise
    except Exception as exc:
        repo.record_verification(store, key, Verification(
            record.backup_id, False, utcnow(), context.run.run_id, error=str(exc)))
        raise
    repo.record_verification(store, key, Verification(
        record.backup_id, True, utcnow(), context.run.run_id, checks=checks))
    return dg.MaterializeResult(metadata={
        "backup_id": dg.MetadataValue.text(record.backup_id),
        "verified": dg.MetadataValue.bool(True),
        "bytes_checked": dg.MetadataValue.int(record.manifest.size_bytes),
        "duration_s": dg.MetadataValue.float(round(time.monotonic() - started, 3)),
        **{k: dg.MetadataValue.int(v) for k, v in checks.items() if isinstance(v, int)},
    })


class RetentionConfig(dg.Config):
    dry_run: bool = Field(default=False, description="Report what would be deleted; delete "
                                                     "nothing.")
    stale_after_hours: float = Field(
        default=DEFAULT_STALE_AGE.total_seconds() / 3600, gt=0,
        description="Longer than the longest backup: incomplete multipart uploads, temporary "
                    "files and uncommitted backup directories older than this belong to runs "
                    "that died and are removed.")
    delete_damaged_past_window: bool = Field(
        default=False, description="Remove DAMAGED backups (unreadable manifest or "
                                   "verification record) once older than the retention window. "
                                   "Off: they are kept and reported for an operator.")


def temporary_prefixes(store: str) -> tuple[str, ...]:
    """Repository areas outside the store's partitions where its backups write temporaries: the
    blob store's, for MinIO."""
    return (BLOB_TMP_PREFIX,) if store == "minio" else ()


def collect_stale(repo: BackupRepository, store: str, *, older_than: timedelta,
                  dry_run: bool) -> list[StaleWrite]:
    """What dead runs of ``store`` left behind: multipart uploads, temporary files, uncommitted
    backup directories; and the engine's temporaries (MinIO's ``objectstore/tmp``)."""
    now = utcnow()
    found = repo.collect_stale_writes(store, now=now, older_than=older_than, dry_run=dry_run)
    found += repo.collect_abandoned_backups(store, now=now, older_than=older_than,
                                            dry_run=dry_run)
    for prefix in temporary_prefixes(store):
        found += repo.collect_stale_writes(prefix, now=now, older_than=older_than,
                                           dry_run=dry_run, all_temporary=True)
    return found


def apply_retention(context: dg.AssetExecutionContext, repo: BackupRepository, store: str,
                    window: timedelta, config: RetentionConfig,
                    asset_keys: tuple[dg.AssetKey, ...]) -> dg.MaterializeResult:
    """Delete expired backups (never the newest verified one), wipe their partitions from the
    listed assets so the UI stops showing them as present, report DAMAGED backups (kept for an
    operator unless ``delete_damaged_past_window``), and collect what dead runs left behind
    (older than ``stale_after_hours``). Transient repository failures are retried."""
    dry_run = config.dry_run
    partitions_def = context.assets_def.partitions_def

    def damaged_start(key: str):  # a damaged partition's manifest cannot say: Dagster does
        found = window_of(partitions_def, key)
        return found.start if found is not None else None

    with retry_when_unreachable(), repo.lease(store, run_holder(context), "retention"):
        decisions = repo.apply_retention(
            store, now=utcnow(), window=window, dry_run=dry_run, damaged_start=damaged_start,
            delete_damaged_past_window=config.delete_damaged_past_window)
        stale = collect_stale(repo, store, dry_run=dry_run,
                              older_than=timedelta(hours=config.stale_after_hours))
    deleted = [d for d in decisions if d.delete]
    damaged = [d for d in decisions if d.damaged]
    for d in decisions:
        verb = ("would delete" if dry_run else "deleted") if d.delete else "kept"
        message = f"{store} {d.partition_key} ({d.backup_id}): {verb}: {d.reason}"
        (context.log.warning if d.damaged else context.log.info)(message)
    stale_verb = "would remove" if dry_run else "removed"
    for item in stale:
        context.log.info(f"{store}: {stale_verb} stale {item.describe()}")
    if deleted and not dry_run:
        mark_partitions_deleted(context.instance, asset_keys, deleted)
    metadata = {
        "dry_run": dg.MetadataValue.bool(dry_run),
        "backups_kept": dg.MetadataValue.int(len(decisions) - len(deleted)),
        "backups_deleted": dg.MetadataValue.int(0 if dry_run else len(deleted)),
        "backups_expired": dg.MetadataValue.int(len(deleted)),
        "backups_damaged": dg.MetadataValue.int(len(damaged)),
        "stale_writes_collected": dg.MetadataValue.int(0 if dry_run else len(stale)),
        "decisions": dg.MetadataValue.md(
            "| partition | backup | action | reason |\n|---|---|---|---|\n" + "\n".join(
                f"| {d.partition_key} | {d.backup_id} | "
                f"{'delete' if d.delete else ('keep (DAMAGED)' if d.damaged else 'keep')} | "
                f"{d.reason} |" for d in decisions)),
    }
    if stale:
        metadata["stale_writes"] = dg.MetadataValue.md("\n".join(
            f"- {stale_verb}: {item.describe()}" for item in stale[:50]))
    unreadable = [d for d in damaged
                  if not d.delete and d.reason.startswith("DAMAGED: its manifest ")]
    if store in SHARED_CONTENT_STORES and unreadable and not dry_run:
        first = unreadable[0]
        raise RepositoryError(
            f"{store} retention applied ({len(deleted)} deleted), but garbage collection of "
            f"shared files is refused while {len(unreadable)} manifest(s) are DAMAGED, e.g. "
            f"partition {first.partition_key}: {first.reason}. The files they reference are "
            f"unknown. Re-run {store}_backup for that partition, or remove the damaged backup "
            "(retention with delete_damaged_past_window once it is past the window).",
            operation="retention", store=store, partition=first.partition_key)
    return dg.MaterializeResult(metadata=metadata)


def comparison_metadata(comparison: Comparison, prefix: str = "") -> dict[str, Any]:
    """A restore's comparison as metadata: ``matches_<what>`` is set by the caller; here the
    numbers compared per aspect (plotted), what did not run, and every difference named."""
    metadata: dict[str, Any] = {
        f"{prefix}compared_{aspect}": dg.MetadataValue.int(n)
        for aspect, n in sorted(comparison.compared.items())}
    metadata[f"{prefix}differences"] = dg.MetadataValue.int(len(comparison.differences))
    if comparison.differences:
        rows = "\n".join(f"| {d.item} | {d.property} | {d.expected!r} | {d.actual!r} |"
                         for d in comparison.differences[:50])
        more = (f"\n\n... and {len(comparison.differences) - 50} more"
                if len(comparison.differences) > 50 else "")
        metadata[f"{prefix}differences_found"] = dg.MetadataValue.md(
            "| item | property | backup | restored |\n|---|---|---|---|\n" + rows + more)
    if comparison.not_run:
        metadata[f"{prefix}not_compared"] = dg.MetadataValue.md("\n".join(
            f"- **{aspect}**: {why}" for aspect, why in sorted(comparison.not_run.items())))
    return metadata
