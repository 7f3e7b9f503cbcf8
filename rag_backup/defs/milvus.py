"""Milvus: daily collection backups, their verification, retention, and the restore job."""

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
from rag_backup.defs.resources import BackupRepositoryResource, MilvusResource
from rag_backup.engines import milvus as engine
from rag_backup.errors import InvalidRequest
from rag_backup.repository import LATEST, BackupRepository

STORE = engine.STORE
RETENTION = timedelta(days=7)
GROUP = "milvus"
KINDS = {"milvus"}
POOL = "milvus"
Log = Callable[[str], None]


@dg.asset(partitions_def=DAILY_PARTITIONS, group_name=GROUP, kinds=KINDS, pool=POOL,
          owners=["team:platform"])
def milvus_backup(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                  milvus: MilvusResource) -> dg.MaterializeResult:
    """Daily backup of every configured Milvus collection: its description (schema with every
    field and param, partitions, indexes, properties) as JSON and its rows streamed with
    `query_iterator` into Parquet files per partition, batch by batch (memory bounded by one
    batch, no 16,384-row limit). Row counts are read before and after; a difference means
    writes during the backup."""
    taken: list[engine.BackupOutcome] = []

    def take(pending):
        taken.append(engine.backup(milvus.server(), pending,
                                   collections=milvus.collection_list(),
                                   batch_rows=milvus.batch_rows,
                                   rows_per_file=milvus.rows_per_file, log=context.log.info))
        return taken[-1]

    def counts(outcome: engine.BackupOutcome) -> dict[str, int]:
        fp = engine.fingerprint_of(outcome)
        return {"rows": fp.rows, "rows_before": fp.rows_before, "rows_after": fp.rows_after,
                "collections": len(fp.collections), "parquet_files": fp.parquet_files,
                **{f"rows_{name}": c.rows for name, c in fp.collections.items()}}

    result = commit_backup(context, repository.open(), STORE, RETENTION, take, counts)
    fp = engine.fingerprint_of(taken[-1])
    return dg.MaterializeResult(metadata={
        **result.metadata,
        "consistent": dg.MetadataValue.bool(fp.consistent),
        "collection_table": dg.MetadataValue.md(
            "| collection | partitions | rows before | rows written | rows after | files |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(
                f"| {name} | {len(c.partitions)} | {c.rows_before} | {c.rows} | "
                f"{c.rows_after} | {len(c.files)} |" for name, c in fp.collections.items())),
    })


@dg.asset(deps=[milvus_backup], partitions_def=DAILY_PARTITIONS, group_name=GROUP, kinds=KINDS,
          pool=POOL, owners=["team:platform"],
          freshness_policy=rpo_freshness(timedelta(days=1)))
def milvus_backup_verified(context: dg.AssetExecutionContext,
                           repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """The partition's Milvus backup, verified without the server: every artifact's size and
    sha256 match the manifest; every Parquet file is read in batches and has the schema its
    collection description implies and the recorded row count; every description builds a
    pymilvus CollectionSchema and IndexParams offline and passes the server's first checks.
    The result is recorded in the repository (failures too)."""
    repo = repository.open()
    return verify_and_record(context, repo, STORE, lambda record: engine.verify(repo, record))


@dg.asset(deps=[milvus_backup_verified], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"])
def milvus_retention(context: dg.AssetExecutionContext, config: RetentionConfig,
                     repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """Deletes Milvus backups older than 7 days, never the newest verified one, and takes
    their partitions out of the UI."""
    return apply_retention(context, repository.open(), STORE, RETENTION, config,
                           (milvus_backup.key, milvus_backup_verified.key))


class RestoreMilvusConfig(dg.Config):
    partition_key: str = Field(default=LATEST, description="Daily partition of the backup "
                               "(YYYY-MM-DD), or 'latest' for the newest verified backup.")
    repository: str = repository_field()
    collections: list[str] = Field(default=[], description="Collections of the backup to "
                                   "restore; empty: all of them.")
    target_collection: str = Field(default="", description="Restore a single collection under "
                                   "this new name (overrides suffix).")
    suffix: str = Field(default="", description="Appended to each collection's name to form "
                        "its target; empty: _restored_<yyyymmdd of the backup's partition>.")
    in_place: bool = Field(default=False, description="Restore under the ORIGINAL names. An "
                           "existing collection is dropped (after the restored copy has been "
                           "checked) only if confirm names it.")
    confirm: str = Field(default="", description="Comma-separated names of EXISTING target "
                         "collections you allow to be dropped and replaced.")
    auto_id_mode: str = Field(default="import", description="auto_id collections only. "
                              "'import': keep ids and auto_id via the server's backup-mode bulk "
                              "import (needs the resource's storage_root). 'explicit_ids': keep "
                              "ids, the restored primary key is not auto_id. 'new_ids': keep "
                              "the schema, the server assigns new ids (references break).")
    batch_rows: int = Field(default=0, description="Rows per insert batch (64-16384); 0: the "
                            "resource's setting (automatic by default).")
    allow_unverified: bool = Field(default=False, description="Allow a backup that has not "
                                   "passed verification (not recommended).")


def restore_targets(config: RestoreMilvusConfig, available: list[str],
                    partition_key: str) -> dict[str, str]:
    """Source collection -> target name, from the config."""
    chosen = list(dict.fromkeys(config.collections)) or available
    if config.target_collection:
        if len(chosen) != 1:
            raise InvalidRequest(f"target_collection names one collection, but {len(chosen)} "
                                 f"are selected ({', '.join(chosen)}); set collections to one")
        if config.in_place:
            raise InvalidRequest("set either target_collection or in_place, not both")
        return {chosen[0]: config.target_collection}
    if config.in_place:
        return {name: name for name in chosen}
    suffix = config.suffix or f"_restored_{partition_key.replace('-', '')}"
    return {name: f"{name}{suffix}" for name in chosen}


def run_restore(config: RestoreMilvusConfig, repo: BackupRepository, milvus: MilvusResource,
                log: Log, holder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The restore of ``restore_milvus``, without Dagster (the job and the command line both
    run it): returns the summary (the op's output) and the run's metadata. ``holder`` names
    this writer in the store's lease, taken by an in-place restore (or one allowed to replace
    collections)."""
    record = repo.resolve(STORE, config.partition_key, require_verified=not config.allow_unverified)
    targets = restore_targets(config, sorted(engine.fingerprint_of(record).collections),
                              record.partition_key)
    log(f"restoring from backup {record.backup_id} (partition {record.partition_key}): "
        f"{targets}")
    lease = (repo.lease(STORE, holder, f"a restore into {', '.join(targets.values())}")
             if config.in_place or config.confirm else contextlib.nullcontext())
    with lease:
        report = engine.restore(
            repo, record, milvus.server(), targets=targets,
            confirm=[c.strip() for c in config.confirm.split(",") if c.strip()],
            auto_id_mode=config.auto_id_mode, batch_rows=config.batch_rows or milvus.batch_rows,
            log=log)
    metadata = {
        "partition_key": dg.MetadataValue.text(record.partition_key),
        "backup_id": dg.MetadataValue.text(record.backup_id),
        "targets": dg.MetadataValue.text(", ".join(f"{c.source} -> {c.target}"
                                                   for c in report.collections)),
        "collections": dg.MetadataValue.int(len(report.collections)),
        "rows": dg.MetadataValue.int(report.rows),
        "rows_in_manifest": dg.MetadataValue.int(sum(c.rows_expected
                                                     for c in report.collections)),
        "matches_manifest": dg.MetadataValue.bool(report.matches_manifest),
        "search_probes": dg.MetadataValue.int(sum(c.probes for c in report.collections)),
        "search_probes_same_nearest": dg.MetadataValue.int(sum(c.probes_top1
                                                               for c in report.collections)),
        "search_probes_identical": dg.MetadataValue.int(sum(c.probes_identical
                                                            for c in report.collections)),
        "replaced_existing": dg.MetadataValue.text(", ".join(
            c.target for c in report.collections if c.replaced_existing) or "none"),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
        "rows_per_s": dg.MetadataValue.float(round(report.rows / max(report.duration_s, 1e-9),
                                                   1)),
    }
    summary = {"backup_id": record.backup_id, "rows": report.rows,
               "matches_manifest": report.matches_manifest,
               "collections": {c.source: {"target": c.target, "rows": c.rows,
                                          "rows_in_manifest": c.rows_expected,
                                          "replaced_existing": c.replaced_existing,
                                          "auto_id_mode": c.auto_id_mode,
                                          "probes": c.probes,
                                          "probes_same_nearest": c.probes_top1}
                               for c in report.collections}}
    return summary, metadata


@dg.op(pool=POOL)
def restore_milvus(context: dg.OpExecutionContext, config: RestoreMilvusConfig,
                   repository: BackupRepositoryResource, milvus: MilvusResource) -> dict:
    """Restore collections of a Milvus backup, then compare with its manifest."""
    with retry_when_unreachable():
        choice = restore_repository(repository, config, STORE, context.log.info)
        summary, metadata = run_restore(config, choice.repo, milvus, context.log.info,
                                        run_holder(context))
    context.add_output_metadata({**metadata, **choice_metadata(choice)})
    return summary


@dg.job(tags={"store": STORE, "kind": "restore"})
def restore_milvus_job():
    """Restore Milvus collections of a backup (a partition or the latest verified) under new
    names (a suffix, default _restored_<yyyymmdd>, or a new name) or in place. Each is
    re-created with the same schema, partitions and index params in a staging collection,
    filled from the Parquet files in batches with its primary keys kept, indexed, loaded and
    compared with the manifest (row counts per partition, and probe searches that must return
    the same nearest ids as on the source, or find the source's nearest row in the copy at its
    distance) before it takes the target's name; an existing
    target is dropped only when confirm names it. auto_id collections: Milvus refuses explicit
    ids on insert, so by default (auto_id_mode 'import') the rows go through a loader collection
    whose binlogs the server bulk-imports in backup mode (as milvus-backup does), keeping both
    the ids and auto_id; this needs the resource's storage_root."""
    restore_milvus()


milvus_backup_job = dg.define_asset_job(
    "milvus_backup_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Back up, verify and apply retention for one daily Milvus partition.",
)

milvus_backup_schedule = dg.build_schedule_from_partitioned_job(
    milvus_backup_job, hour_of_day=2, minute_of_hour=0, default_status=SCHEDULE_STATUS)

POLICY = StorePolicy(
    store=STORE, job=milvus_backup_job, partitions_def=DAILY_PARTITIONS, retention=RETENTION,
    rpo=timedelta(days=1), due_after=timedelta(hours=2), backup_asset=milvus_backup.key)

defs = dg.Definitions(
    assets=[milvus_backup, milvus_backup_verified, milvus_retention],
    jobs=[milvus_backup_job, restore_milvus_job],
    schedules=[milvus_backup_schedule],
)
