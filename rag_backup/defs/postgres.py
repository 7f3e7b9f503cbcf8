"""PostgreSQL: daily backup, its verification, retention, and the restore job."""

import contextlib
import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
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
    comparison_metadata,
    run_holder,
    verify_and_record,
)
from rag_backup.defs.offsite_settings import (
    choice_metadata,
    repository_field,
    restore_repository,
)
from rag_backup.defs.partitions import DAILY_PARTITIONS, SCHEDULE_STATUS, context_window
from rag_backup.defs.resources import BackupRepositoryResource, PostgresResource
from rag_backup.engines import postgres as engine
from rag_backup.engines.postgres.pitr import backfill
from rag_backup.repository import LATEST, BackupRepository
from rag_backup.repository.manifest import utcnow

STORE = engine.STORE
RETENTION = timedelta(days=30)
GROUP = "postgres"
KINDS = {"postgres"}
POOL = "postgres"
Log = Callable[[str], None]


@dg.asset(partitions_def=DAILY_PARTITIONS, group_name=GROUP, kinds=KINDS, pool=POOL,
          owners=["team:platform"])
def postgres_backup(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                    postgres: PostgresResource) -> dg.MaterializeResult:
    """Daily `pg_dump -Fc` of every configured database (one exported snapshot per database,
    exact row counts read in that snapshot) plus roles and tablespaces, compressed with zstd and
    committed atomically to the backup repository. A backfill (the partition's day is over)
    is dumped from a point-in-time recovery to the end of that day when the WAL archive reaches
    it, so it holds that day's data; otherwise from the live server. The manifest's
    `recovery_point` says which."""
    repo = repository.open()
    chosen, point = backfill.choose_source(repo, context_window(context).end, utcnow())
    context.log.info(f"dump source: {point['source']}"
                     + (f" ({point['why']})" if "why" in point else
                        f", recovered to {point.get('target_time')}"))

    def take(pending):
        if chosen is not None:
            return backfill.backup_at(repo, chosen, postgres.server(), pending, point,
                                      databases=postgres.database_list(),
                                      timeout_s=postgres.timeout_s,
                                      zstd_level=postgres.zstd_level, log=context.log.info)
        outcome = engine.backup(postgres.server(), pending, databases=postgres.database_list(),
                                timeout_s=postgres.timeout_s, zstd_level=postgres.zstd_level,
                                log=context.log.info)
        return dataclasses.replace(outcome, recovery_point=point)

    result = commit_backup(context, repo, STORE, RETENTION, take, counts)
    metadata = dict(result.metadata or {})
    metadata["dump_source"] = dg.MetadataValue.text(point["source"])
    metadata["recovery_point"] = dg.MetadataValue.json(point)
    return dg.MaterializeResult(metadata=metadata)


def counts(outcome: engine.BackupOutcome) -> dict[str, int]:
    """The numbers the UI plots for a PostgreSQL backup."""
    fp = engine.fingerprint_of(outcome)
    return {"tables": fp.tables, "rows": fp.rows, "databases": len(fp.databases)}


@dg.asset(deps=[postgres_backup], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"],
          freshness_policy=rpo_freshness(timedelta(days=1)))
def postgres_backup_verified(context: dg.AssetExecutionContext,
                             repository: BackupRepositoryResource,
                             postgres: PostgresResource) -> dg.MaterializeResult:
    """The partition's backup, verified: every artifact's size and sha256 match the manifest,
    every archive decompresses and `pg_restore --list` parses it with data for every table of
    the fingerprint. The result is recorded in the repository (failures too)."""
    repo = repository.open()
    return verify_and_record(context, repo, STORE, lambda record: engine.verify(
        repo, record, timeout_s=postgres.timeout_s, server=postgres.server()))


@dg.asset(deps=[postgres_backup_verified], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"])
def postgres_retention(context: dg.AssetExecutionContext, config: RetentionConfig,
                       repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """Deletes PostgreSQL backups older than 30 days, never the newest verified one, and
    wipes their partitions so the UI no longer shows them as present."""
    return apply_retention(context, repository.open(), STORE, RETENTION, config,
                           (postgres_backup.key, postgres_backup_verified.key))


class RestorePostgresConfig(dg.Config):
    partition_key: str = Field(default=LATEST, description="Daily partition of the backup "
                               "(YYYY-MM-DD), or 'latest' for the newest verified backup.")
    repository: str = repository_field()
    source_database: str = Field(default="ragqa", description="Which database of the backup "
                                 "to restore.")
    target_database: str = Field(default="", description="Database to restore into. Empty: a "
                                 "new scratch database <source>_restore_<timestamp>.")
    confirm: str = Field(default="", description="Restoring over an EXISTING database replaces "
                         "it: type that database's name here to allow it.")
    jobs: int = Field(default=4, description="Parallel pg_restore jobs.")
    no_owner: bool = Field(default=False, description="Skip ownership: everything, the "
                           "database included, is owned by the connecting user (for a server "
                           "that lacks the backup's roles; prefer restore_roles).")
    restore_roles: bool = Field(default=False, description="Before restoring, create the "
                                "backup's roles (from its globals) that this server lacks, with "
                                "their attributes, settings, memberships and, if the backup has "
                                "them, password hashes. Existing roles are not changed. Use it "
                                "on a new, empty server.")
    update_existing_roles: bool = Field(default=False, description="With restore_roles: also "
                                        "reset the attributes, settings and memberships of roles "
                                        "that already exist to the backup's (never the "
                                        "connecting user's).")
    accept_differences: bool = Field(default=False, description="The restored copy is compared "
                                     "with the backup (objects, sequence values, database "
                                     "properties, row counts) before the target is touched; a "
                                     "difference stops the restore. Set this to restore anyway "
                                     "and only report the differences.")
    allow_unverified: bool = Field(default=False, description="Allow a backup that has not "
                                   "passed verification (not recommended).")


def restore_in_place(config: RestorePostgresConfig) -> bool:
    """Whether the restore may replace a database of the configured server (a confirmed
    target, or the source's own name): such a restore holds the store's writer lease."""
    return bool(config.confirm) or config.target_database == config.source_database


def run_restore(config: RestorePostgresConfig, repo: BackupRepository,
                postgres: PostgresResource, log: Log, holder: str
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The restore of ``restore_postgres``, without Dagster (the job and the command line both
    run it): returns the summary (the op's output) and the run's metadata. ``holder`` names
    this writer in the store's lease, taken when the restore may replace a database."""
    record = repo.resolve(STORE, config.partition_key, require_verified=not config.allow_unverified)
    target = config.target_database or (
        f"{config.source_database[:30]}_restore_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}")
    log(f"restoring {config.source_database!r} from backup {record.backup_id} "
        f"(partition {record.partition_key}) into {target!r}")
    lease = (repo.lease(STORE, holder, f"a restore into database {target!r}")
             if restore_in_place(config) else contextlib.nullcontext())
    with lease:
        report = engine.restore(
            repo, record, postgres.server(), source_database=config.source_database,
            target_database=target, confirm=config.confirm, jobs=config.jobs,
            no_owner=config.no_owner, timeout_s=postgres.timeout_s, log=log,
            restore_roles=config.restore_roles, update_existing_roles=config.update_existing_roles,
            accept_differences=config.accept_differences)
    metadata = {
        "partition_key": dg.MetadataValue.text(record.partition_key),
        "backup_id": dg.MetadataValue.text(record.backup_id),
        "target_database": dg.MetadataValue.text(report.target_database),
        "replaced_existing": dg.MetadataValue.bool(report.replaced_existing),
        "tables": dg.MetadataValue.int(report.tables),
        "rows": dg.MetadataValue.int(report.rows),
        "large_objects": dg.MetadataValue.int(report.large_objects),
        "matches_manifest": dg.MetadataValue.bool(report.matches_manifest),
        "roles_created": dg.MetadataValue.json(report.roles_created),
        "roles_updated": dg.MetadataValue.json(report.roles_updated),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
        **comparison_metadata(report.comparison),
    }
    summary = {"target_database": report.target_database, "rows": report.rows,
               "tables": report.tables, "backup_id": record.backup_id,
               "matches_manifest": report.matches_manifest, "roles_created": report.roles_created,
               "comparison": report.comparison.to_dict()}
    return summary, metadata


@dg.op(pool=POOL)
def restore_postgres(context: dg.OpExecutionContext, config: RestorePostgresConfig,
                     repository: BackupRepositoryResource,
                     postgres: PostgresResource) -> dict:
    """Restore one database of a PostgreSQL backup, optionally with its roles, and compare the
    restored copy with the backup before the target is touched."""
    with retry_when_unreachable():  # staged: a retry starts from a new staging database
        choice = restore_repository(repository, config, STORE, context.log.info)
        summary, metadata = run_restore(config, choice.repo, postgres, context.log.info,
                                        run_holder(context))
    context.add_output_metadata({**metadata, **choice_metadata(choice)})
    return summary


@dg.job(tags={"store": STORE, "kind": "restore"})
def restore_postgres_job():
    """Restore a PostgreSQL backup (a partition or the latest verified) into a scratch database,
    or over an existing one with explicit confirmation, on this or a new server (restore_roles).
    The restored copy (objects, sequence values, large objects, database comment, settings,
    role settings, privileges, owner, row counts) is compared with the backup before the target
    is touched."""
    restore_postgres()


postgres_backup_job = dg.define_asset_job(
    "postgres_backup_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Back up, verify and apply retention for one daily PostgreSQL partition.",
)

postgres_backup_schedule = dg.build_schedule_from_partitioned_job(
    postgres_backup_job, hour_of_day=2, minute_of_hour=0,
    default_status=SCHEDULE_STATUS)

POLICY = StorePolicy(
    store=STORE, job=postgres_backup_job, partitions_def=DAILY_PARTITIONS, retention=RETENTION,
    rpo=timedelta(days=1), due_after=timedelta(hours=2), backup_asset=postgres_backup.key)

defs = dg.Definitions(
    assets=[postgres_backup, postgres_backup_verified, postgres_retention],
    jobs=[postgres_backup_job, restore_postgres_job],
    schedules=[postgres_backup_schedule],
)
