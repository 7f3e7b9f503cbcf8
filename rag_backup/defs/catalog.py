"""The catalog heals itself: Dagster's partitions made to agree with the backup repository.

The repository is the truth about which backups exist; Dagster's storage only remembers what
it saw. It drifts when that storage is lost or restored from an older state (the disaster
runbook in the README recreates it empty), and when a backup is taken, replaced or deleted by
the command line. Every tick, for every store, ``catalog_sensor`` compares the two:

- a backup in the repository that Dagster does not know (no materialization of its partition,
  or one of another backup id) is reported as a runless materialization of
  ``<store>_backup`` with the metadata the asset itself reports, read from the manifest; and,
  when the repository says it passed verification, one of ``<store>_backup_verified``;
- a partition Dagster shows as materialized whose backup the repository no longer has is taken
  out of the partition index (``mark_partitions_deleted``, as retention does); a verified
  partition whose current backup is not verified loses its verified mark the same way;
- DAMAGED partitions are left alone (an operator decides; the RPO sensor alerts on them), and
  partitions a run is working on right now are left to that run.

Nothing is remembered between ticks: each compares afresh, so a tick is idempotent and a lost
cursor loses nothing. Dagster cannot back-date an event: a reported materialization carries
the time of the tick, the backup's own start is in ``backup_started_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from rag_backup.defs import milvus, minio, pitr, postgres, redis
from rag_backup.defs.automation import IN_FLIGHT
from rag_backup.defs.common import StorePolicy, backup_metadata
from rag_backup.defs.partition_index import mark_partitions_deleted
from rag_backup.defs.partitions import SENSOR_STATUS
from rag_backup.defs.resources import BackupRepositoryResource
from rag_backup.engines import redis as redis_engine
from rag_backup.engines.milvus import fingerprint as milvus_fingerprint
from rag_backup.engines.minio import snapshot as minio_snapshot
from rag_backup.engines.postgres import fingerprint as pg_fingerprint
from rag_backup.engines.postgres import pitr as pitr_engine
from rag_backup.errors import DamagedBackup, RagBackupError
from rag_backup.repository import BackupRecord, BackupRepository, RetentionDecision

CATALOG_INTERVAL_S = 300
REPORTED_BY = "catalog_sensor"
SHOWN = 5  # partitions named per list in a tick's summary

Counts = Callable[[BackupRecord], dict[str, int]]
Extras = Callable[[BackupRecord], dict[str, Any]]


def _no_extras(record: BackupRecord) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class CatalogedStore:
    """One store as the catalog sees it: where its backups are in the repository, the two
    assets that show them, and the numbers its backup asset plots (read from a manifest)."""

    store: str
    backup_asset: dg.AssetKey
    verified_asset: dg.AssetKey
    partitions_def: dg.PartitionsDefinition
    counts: Counts
    extras: Extras = field(default=_no_extras)


# -- what each store's backup asset reports, read back from its manifest ------------------------

def postgres_counts(record: BackupRecord) -> dict[str, int]:
    fp = pg_fingerprint.fingerprint_of(record)
    return {"tables": fp.tables, "rows": fp.rows, "databases": len(fp.databases)}


def postgres_extras(record: BackupRecord) -> dict[str, Any]:
    point = record.manifest.recovery_point
    if not point:
        return {}
    return {"dump_source": dg.MetadataValue.text(str(point.get("source", "-"))),
            "recovery_point": dg.MetadataValue.json(point)}


def redis_counts(record: BackupRecord) -> dict[str, int]:
    fp = redis_engine.fingerprint_of(record)
    counts = {"keys": fp.keys, "expires": fp.expires, "dbs": len(fp.dbs)}
    if fp.rdb_bytes is not None:
        counts["rdb_bytes"] = fp.rdb_bytes
    return counts


def milvus_counts(record: BackupRecord) -> dict[str, int]:
    fp = milvus_fingerprint.fingerprint_of(record)
    return {"rows": fp.rows, "rows_before": fp.rows_before, "rows_after": fp.rows_after,
            "collections": len(fp.collections), "parquet_files": fp.parquet_files,
            **{f"rows_{name}": c.rows for name, c in fp.collections.items()}}


def milvus_extras(record: BackupRecord) -> dict[str, Any]:
    return {"consistent": dg.MetadataValue.bool(
        milvus_fingerprint.fingerprint_of(record).consistent)}


def minio_counts(record: BackupRecord) -> dict[str, int]:
    """As the asset reports, less ``objects_vanished``: the manifest does not record it."""
    fp = minio_snapshot.fingerprint_of(record)
    return {"objects": fp.objects, "bytes": fp.bytes, "objects_copied": fp.objects_copied,
            "objects_reused": fp.objects_reused, "bytes_copied": fp.bytes_copied,
            "buckets": len(fp.buckets)}


def base_backup_counts(record: BackupRecord) -> dict[str, int]:
    fp = pitr_engine.fingerprint_of(record)
    return {"tar_bytes": fp.tar_bytes, "timeline": fp.timeline,
            "wal_segments_needed": len(fp.wal_segments())}


def cataloged(policy: StorePolicy, counts: Counts, extras: Extras = _no_extras
              ) -> CatalogedStore:
    """A store from its policy; its verified asset is ``<store>_backup_verified``."""
    return CatalogedStore(policy.store, policy.backup_asset,
                          dg.AssetKey(f"{policy.store}_backup_verified"),
                          policy.partitions_def, counts, extras)


CATALOG: tuple[CatalogedStore, ...] = (
    cataloged(postgres.POLICY, postgres_counts, postgres_extras),
    cataloged(redis.POLICY, redis_counts),
    cataloged(milvus.POLICY, milvus_counts, milvus_extras),
    cataloged(minio.POLICY, minio_counts),
    CatalogedStore(pitr_engine.BASE_STORE, pitr.postgres_base_backup.key,
                   pitr.postgres_base_backup_verified.key,
                   pitr.postgres_base_backup.partitions_def, base_backup_counts),
)


# -- events -------------------------------------------------------------------------------

def backup_event(entry: CatalogedStore, record: BackupRecord) -> dg.AssetMaterialization:
    """The materialization ``<store>_backup`` would have reported for this backup."""
    manifest = record.manifest
    metadata = backup_metadata(manifest, record.location, **entry.counts(record))
    metadata.update(entry.extras(record))
    metadata["server_version"] = dg.MetadataValue.text(manifest.server_version)
    metadata["taken_by_run"] = dg.MetadataValue.text(manifest.run_id)
    metadata["backup_started_at"] = dg.MetadataValue.timestamp(manifest.started_at)
    metadata["reported_by"] = dg.MetadataValue.text(REPORTED_BY)
    return dg.AssetMaterialization(
        asset_key=entry.backup_asset, partition=record.partition_key, metadata=metadata,
        description=f"Backup {manifest.backup_id}, found in the repository by {REPORTED_BY}: "
                    f"taken by {manifest.run_id}, unknown to Dagster until now.")


def verified_event(entry: CatalogedStore, record: BackupRecord) -> dg.AssetMaterialization:
    """The materialization ``<store>_backup_verified`` reported when it verified this backup,
    from the verification record (its checks; its duration is not recorded)."""
    verification = record.verification
    assert verification is not None and verification.ok
    checks = {name: dg.MetadataValue.int(value) for name, value in verification.checks.items()
              if isinstance(value, int) and not isinstance(value, bool)}
    return dg.AssetMaterialization(
        asset_key=entry.verified_asset, partition=record.partition_key,
        description=f"Backup {record.backup_id} verified by {verification.run_id}, found in "
                    f"the repository by {REPORTED_BY}.",
        metadata={
            "backup_id": dg.MetadataValue.text(record.backup_id),
            "verified": dg.MetadataValue.bool(True),
            "bytes_checked": dg.MetadataValue.int(record.manifest.size_bytes),
            "verified_at": dg.MetadataValue.timestamp(verification.verified_at),
            "verified_by_run": dg.MetadataValue.text(verification.run_id),
            **checks,
            "reported_by": dg.MetadataValue.text(REPORTED_BY),
        })


# -- what Dagster knows --------------------------------------------------------------------

def known_backup_ids(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                     partitions: Iterable[str]) -> dict[str, str | None]:
    """The backup id in the latest materialization of each of ``partitions`` (``None`` when
    that materialization has none)."""
    wanted = set(partitions)
    if not wanted:
        return {}
    latest = instance.get_latest_storage_id_by_partition(
        asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, wanted)
    if not latest:
        return {}
    found = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=list(latest.values())),
        limit=len(latest)).records
    ids: dict[str, str | None] = {}
    for event in found:
        materialization = event.asset_materialization
        if materialization is None or materialization.partition is None:
            continue
        value = materialization.metadata.get("backup_id")
        ids[materialization.partition] = None if value is None else str(value.value)
    return ids


def busy_partitions(instance: dg.DagsterInstance) -> Callable[[str], bool]:
    """Whether a run that has not finished works on a partition key (single or in a range):
    its backup may be committed and not yet reported, or replaced and not yet verified."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT))
    keys = {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}
    ranges = [(r.tags["dagster/asset_partition_range_start"],
               r.tags["dagster/asset_partition_range_end"]) for r in runs
              if "dagster/asset_partition_range_start" in r.tags
              and "dagster/asset_partition_range_end" in r.tags]
    return lambda key: key in keys or any(low <= key <= high for low, high in ranges)


# -- one store -----------------------------------------------------------------------------

@dataclass
class Reconciliation:
    """What one tick found for one store."""

    store: str
    events: list[dg.AssetMaterialization] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # partitions of <store>_backup
    reported_verified: list[str] = field(default_factory=list)
    gone: list[RetentionDecision] = field(default_factory=list)  # wiped from both assets
    unverified: list[RetentionDecision] = field(default_factory=list)  # verified mark only
    damaged: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # not keys of the partitions definition
    backups: int = 0

    def summary(self) -> str:
        changes = [f"{n} {what}" for n, what in (
            (len(self.reported), "reported"), (len(self.reported_verified), "verified reported"),
            (len(self.gone), "wiped"), (len(self.unverified), "verified marks wiped")) if n]
        parts = [f"{self.store}: {self.backups} backup(s) in the repository",
                 ", ".join(changes) or "Dagster agrees"]
        for label, keys in (("DAMAGED, left alone", self.damaged),
                            ("a run is working on", self.busy),
                            ("not a partition of its assets", self.foreign)):
            if keys:
                more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
                parts.append(f"{label}: {', '.join(keys[:SHOWN])}{more}")
        return "; ".join(parts)


def _removal(repo: BackupRepository, entry: CatalogedStore, key: str,
             backup_id: str | None) -> RetentionDecision:
    """Why a partition Dagster shows is not in the repository: its tombstone says, if it has
    one; otherwise it was removed by hand or never committed here."""
    try:
        tomb = repo.tombstone(entry.store, key)
    except RagBackupError:
        tomb = None
    if tomb is not None:
        return RetentionDecision(key, tomb.backup_id, True,
                                 f"{tomb.reason} (deleted {tomb.deleted_at:%Y-%m-%d %H:%M} UTC; "
                                 f"found by {REPORTED_BY})")
    return RetentionDecision(key, backup_id or "unknown", True,
                             f"not in the repository: no manifest and no tombstone (removed "
                             f"outside rag-backup, or never committed there); found by "
                             f"{REPORTED_BY}")


def reconcile(entry: CatalogedStore, repo: BackupRepository, instance: dg.DagsterInstance,
              busy: Callable[[str], bool]) -> Reconciliation:
    """Compare one store's repository with Dagster's partitions: the events to report and
    the partitions to wipe. Dagster is read before the repository, so a backup committed in
    between is at worst reported twice, never wiped."""
    known = instance.get_materialized_partitions(entry.backup_asset)
    known_verified = instance.get_materialized_partitions(entry.verified_asset)
    ids = known_backup_ids(instance, entry.backup_asset, known)
    verified_ids = known_backup_ids(instance, entry.verified_asset, known_verified)
    listing = repo.scan(entry.store)
    found = Reconciliation(entry.store, backups=len(listing.backups))
    found.damaged = [d.partition_key for d in listing.damaged]
    present = {r.partition_key: r for r in listing.backups}
    for key, record in present.items():
        if not entry.partitions_def.has_partition_key(key):
            found.foreign.append(key)
        elif busy(key):
            found.busy.append(key)
        else:
            try:
                _report(entry, record, found, ids, verified_ids)
            except DamagedBackup:  # its fingerprint cannot be read: left like the others
                found.damaged.append(key)
    for key in sorted((known | known_verified) - present.keys() - set(found.damaged)):
        if busy(key):
            found.busy.append(key)
        else:
            found.gone.append(_removal(repo, entry, key, ids.get(key) or verified_ids.get(key)))
    return found


def _report(entry: CatalogedStore, record: BackupRecord, found: Reconciliation,
            ids: dict[str, str | None], verified_ids: dict[str, str | None]) -> None:
    """One healthy backup: what Dagster lacks about it, or shows wrongly."""
    key = record.partition_key
    if key not in ids or ids[key] not in (None, record.backup_id):
        found.events.append(backup_event(entry, record))
        found.reported.append(key)
    shown = key in verified_ids and verified_ids[key] in (None, record.backup_id)
    if record.verified and not shown:
        found.events.append(verified_event(entry, record))
        found.reported_verified.append(key)
    elif not record.verified and key in verified_ids:
        state = ("failed verification" if record.verification is not None
                 else "not verified yet")
        found.unverified.append(RetentionDecision(
            key, verified_ids[key] or "unknown", True,
            f"the repository's backup {record.backup_id} of this partition is {state}; "
            f"found by {REPORTED_BY}"))


# -- the sensor ----------------------------------------------------------------------------

@dg.sensor(name="catalog_sensor", minimum_interval_seconds=CATALOG_INTERVAL_S,
           default_status=SENSOR_STATUS,
           description="Keeps the partitions Dagster shows equal to the backup repository (the "
                       "truth): reports every backup Dagster does not know (Dagster's storage "
                       "lost or restored older, a backup taken by the command line) as a "
                       "materialization with its manifest's metadata and verification, and "
                       "wipes partitions whose backup the repository no longer has. DAMAGED "
                       "partitions are left alone; one store's failure never stops the others.")
def catalog_sensor(context: dg.SensorEvaluationContext,
                   repository: BackupRepositoryResource) -> dg.SensorResult:
    instance = context.instance
    busy = busy_partitions(instance)
    repo: BackupRepository | None = None
    events: list[dg.AssetMaterialization] = []
    summary: list[str] = []
    for entry in CATALOG:
        try:
            if repo is None:  # opened here: a failure is this store's, the next retries
                repo = repository.open()
            found = reconcile(entry, repo, instance, busy)
            if found.gone:
                mark_partitions_deleted(instance, (entry.backup_asset, entry.verified_asset),
                                        found.gone, cause="is not in the repository")
            if found.unverified:
                mark_partitions_deleted(instance, (entry.verified_asset,), found.unverified,
                                        cause="is not verified in the repository")
        except Exception as exc:  # noqa: BLE001 - one store never stops the others
            text = f"{type(exc).__name__}: {exc}"
            context.log.error(f"catalog of {entry.store} not checked: {text}")
            summary.append(f"{entry.store}: NOT CHECKED ({text[:200]})")
            continue
        for decision in found.gone + found.unverified:
            context.log.info(f"{entry.store} {decision.partition_key}: wiped from Dagster: "
                             f"{decision.reason}")
        events += found.events
        summary.append(found.summary())
    return dg.SensorResult(asset_events=events, skip_reason="; ".join(summary))


defs = dg.Definitions(sensors=[catalog_sensor])
