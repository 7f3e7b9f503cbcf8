"""Recovery across stores in Dagster: every store back to one point in time, and monthly
restore drills. The work is done by ``rag_backup.recovery`` (plain Python, no Dagster); this
module reads config and resources, calls it and reports metadata.

- ``restore_all_job``: for a point in time (default: now), each store's newest verified backup
  taken at or before it; the chosen set and how far apart the backups are; then every store
  restored (every PostgreSQL database of the chosen backup by default), into scratch targets
  named with one timestamp by default, into production only with each store's confirmation;
  all stores at once unless ``one_store_at_a_time`` (``restore_wall_s``: the run's restore time).
  Each store reports what its restore compared (``<store>_matches_manifest`` and the
  comparison, field by field); a difference fails the run unless ``accept_differences``.
- ``restore_drill`` (asset, monthly schedule): the newest verified backup of every store
  restored into scratch targets (each store on its own: one failure does not stop the others),
  compared with the manifests, checked with the cross-store consistency rules
  (``rag_backup.consistency``, ``RAG_DRILL_RULES_FILE``), removed; the measured restore time of
  each store is recorded as numeric metadata, so the UI plots the RTO over time, also when the
  drill fails (as an observation of the asset); the stores are restored all at once, as
  ``restore_all_job`` does, and ``restore_wall_s`` is the drill's measured RTO.
"""

import time
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup import consistency, recovery
from rag_backup.defs.common import comparison_metadata, run_holder
from rag_backup.defs.offsite_settings import choice_metadata, pick_repository, repository_field
from rag_backup.defs.partitions import SCHEDULE_STATUS
from rag_backup.defs.resources import (
    BackupRepositoryResource,
    MilvusResource,
    MinioResource,
    PostgresResource,
    RedisResource,
)

GROUP = "operations"


ONE_AT_A_TIME = ("Restore the stores one after the other (the first failure stops the "
                 "rest) instead of all at once; for stores that share one host's CPU or disks.")


class RestoreAllConfig(dg.Config):
    point_in_time: str = Field(default="", description="ISO 8601 time, e.g. "
                               "2026-11-24T09:30:00Z; empty: now. Each store gets its newest "
                               "verified backup taken at or before it.")
    stores: list[str] = Field(default=[], description="Stores to restore; empty: all.")
    repository: str = repository_field()
    into_production: bool = Field(default=False, description="Restore over the production "
                                  "stores (each needs its confirmation below); default: scratch "
                                  "targets named with one timestamp for the whole run (new "
                                  "PostgreSQL databases <db>_pit_<time>, an RDB file in "
                                  "scratch_dir, collections <name>_pit_<time>, buckets "
                                  "<bucket>-pit-<time>).")
    postgres_databases: list[str] = Field(default=[], description="PostgreSQL databases to "
                                          "restore; empty: every database of the chosen "
                                          "backup.")
    postgres_confirm: str = Field(default="", description="Production: the comma-separated "
                                  "database list, exactly.")
    redis_confirm: str = Field(default="", description="Production: 'host:port' of the Redis "
                               "server (every db of the backup is flushed and replayed).")
    minio_confirm: str = Field(default="", description="Production: the comma-separated bucket "
                               "list of the snapshot (objects added since are removed).")
    milvus_confirm: str = Field(default="", description="Production: the comma-separated "
                                "collection list of the backup (each is replaced).")
    scratch_dir: str = Field(default="/tmp/rag-backup-restores", description="Scratch "
                             "restores of Redis: where the RDB is placed.")
    accept_differences: bool = Field(default=False, description="Keep going when a restored "
                                     "store differs from its backup (every difference is still "
                                     "reported and <store>_matches_manifest is false); default: "
                                     "a difference fails the run.")
    dry_run: bool = Field(default=False, description="Only report the chosen backups.")
    postgres_pitr: bool = Field(default=True, description="With a point_in_time: PostgreSQL "
                                "lands on exactly that time by point-in-time recovery (base "
                                "backup and WAL) when the archive reaches it; otherwise, or "
                                "when false, its newest daily dump before it.")
    one_store_at_a_time: bool = Field(default=False, description=ONE_AT_A_TIME)


def store_recoveries(postgres: PostgresResource, redis: RedisResource, minio: MinioResource,
                     milvus: MilvusResource, *, databases: list[str] | None = None,
                     scratch_dir: str | None = None, point: datetime | None = None
                     ) -> list[recovery.StoreRecovery]:
    """The recovery table of a run: each store's engine connection and options, from its
    resource (``scratch_dir`` None: Redis scratch restores replay into a private server;
    ``point``: PostgreSQL by point-in-time recovery when the archive reaches it)."""
    return [recovery.PostgresRecovery(postgres.server(), postgres.timeout_s, databases or None,
                                      point),
            recovery.RedisRecovery(redis.server(), redis.timeout_s, scratch_dir),
            recovery.MinioRecovery(minio.s3(), minio.workers),
            recovery.MilvusRecovery(milvus.server(), milvus.batch_rows)]


def store_metadata(r: recovery.Restored) -> dict[str, Any]:
    """What one store's restore reports: time, target, counts and its comparison."""
    metadata: dict[str, Any] = {
        f"{r.store}_restore_s": dg.MetadataValue.float(round(r.seconds, 3)),
        f"{r.store}_target": dg.MetadataValue.text(r.target),
        f"{r.store}_partition": dg.MetadataValue.text(r.partition_key),
        f"{r.store}_matches_manifest": dg.MetadataValue.bool(r.matches_manifest),
        **{f"{r.store}_{name}": dg.MetadataValue.int(value) for name, value in r.counts.items()},
    }
    metadata.update(comparison_metadata(r.comparison, prefix=f"{r.store}_"))
    return metadata


@dg.op(out=dg.Out(dict))
def restore_all_stores(context: dg.OpExecutionContext, config: RestoreAllConfig,
                       repository: BackupRepositoryResource, postgres: PostgresResource,
                       redis: RedisResource, minio: MinioResource,
                       milvus: MilvusResource) -> dict:
    """Choose each store's backup for the point in time, report the set, and restore it."""
    choice = pick_repository(repository, config.repository, lambda r: recovery.plan(
        r, config.stores, config.point_in_time), context.log.info)
    repo = choice.repo
    plan = recovery.plan(repo, config.stores, config.point_in_time)
    chosen = plan.chosen
    for store, record in chosen.items():
        context.log.info(f"{store}: partition {record.partition_key} (backup "
                         f"{record.backup_id}), recovery point "
                         f"{record.manifest.started_at:%Y-%m-%d %H:%M:%S} UTC")
    metadata: dict[str, Any] = {
        **choice_metadata(choice),
        "point_in_time": dg.MetadataValue.text(plan.point.isoformat()),
        "spread_s": dg.MetadataValue.float(plan.spread_s),
        "chosen": dg.MetadataValue.md("| store | partition | backup | recovery point |\n"
                                      "|---|---|---|---|\n" + "\n".join(
            f"| {s} | {r.partition_key} | {r.backup_id} | {r.manifest.started_at:%F %T} |"
            for s, r in chosen.items())),
    }
    summary: dict[str, Any] = {"chosen": {s: r.partition_key for s, r in chosen.items()},
                               "spread_s": plan.spread_s}
    if config.dry_run:
        context.add_output_metadata(metadata)
        return summary
    started = time.monotonic()
    with ExitStack() as held:
        if config.into_production:  # one writer per store: the command line waits meanwhile
            for store in chosen:
                held.enter_context(repo.lease(store, run_holder(context),
                                              "a restore of every store into production"))
        results = recovery.restore_all(
            repo, store_recoveries(postgres, redis, minio, milvus,
                                   databases=config.postgres_databases,
                                   scratch_dir=config.scratch_dir,
                                   point=plan.point if config.point_in_time
                                   and config.postgres_pitr else None),
            chosen, production=config.into_production,
            confirm={"postgres": config.postgres_confirm, "redis": config.redis_confirm,
                     "minio": config.minio_confirm, "milvus": config.milvus_confirm},
            accept_differences=config.accept_differences,
            concurrent=not config.one_store_at_a_time, log=context.log.info)
    metadata["restore_wall_s"] = dg.MetadataValue.float(round(time.monotonic() - started, 3))
    for r in results:
        metadata.update(store_metadata(r))
    summary["restored"] = {r.store: {"target": r.target, "seconds": r.seconds,
                                     "matches_manifest": r.matches_manifest,
                                     "comparison": r.comparison.to_dict(), **r.counts}
                           for r in results}
    differing = [r for r in results if not r.matches_manifest]
    if differing and not config.accept_differences:
        raise dg.Failure(description="restored stores differ from their backups (set "
                         "accept_differences to keep them anyway): " + "; ".join(
                             f"{r.store}: {r.comparison.summary()}" for r in differing),
                         metadata=metadata)
    for r in differing:
        context.log.warning(f"{r.store} differs from its backup (accepted): "
                            f"{r.comparison.summary()}")
    context.add_output_metadata(metadata)
    return summary


@dg.job(tags={"kind": "restore"})
def restore_all_job():
    """Bring every store back to one point in time: each store's newest verified backup taken
    at or before it, the chosen set and its spread reported, restored into scratch targets by
    default or over production with each store's confirmation."""
    restore_all_stores()


# -- the drill -----------------------------------------------------------------------------

def rules_metadata(results: list[consistency.RuleResult], source: str) -> dict[str, Any]:
    """Per rule: its status, what it checked (numbers) and its violations; and a table."""
    metadata: dict[str, Any] = {"rules_source": dg.MetadataValue.text(source)}
    for status in (consistency.PASSED, consistency.FAILED, consistency.NOT_RUN):
        metadata[f"rules_{status.replace(' ', '_')}"] = dg.MetadataValue.int(
            sum(r.status == status for r in results))
    for r in results:
        metadata[f"rule_{r.name}_status"] = dg.MetadataValue.text(r.status)
        for what, n in r.checked.items():
            metadata[f"rule_{r.name}_checked_{what}"] = dg.MetadataValue.int(n)
        if r.status != consistency.NOT_RUN:
            metadata[f"rule_{r.name}_violations"] = dg.MetadataValue.int(r.violations)
    metadata["rules"] = dg.MetadataValue.md(
        "| rule | checks | status | checked | violations | examples / reason |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(
            f"| {r.name} | {r.statement} | {r.status} | "
            f"{', '.join(f'{n} {what}' for what, n in r.checked.items())} | "
            f"{'' if r.status == consistency.NOT_RUN else r.violations} | "
            f"{r.reason if r.status == consistency.NOT_RUN else ', '.join(r.examples)} |"
            for r in results))
    return metadata


class RestoreDrillConfig(dg.Config):
    repository: str = repository_field()
    one_store_at_a_time: bool = Field(default=False, description=ONE_AT_A_TIME.replace(
        " (the first failure stops the rest)", ""))


@dg.asset(group_name=GROUP, kinds={"python"}, owners=["team:platform"],
          pool="restore_drill")
def restore_drill(context: dg.AssetExecutionContext, config: RestoreDrillConfig,
                  repository: BackupRepositoryResource,
                  postgres: PostgresResource, redis: RedisResource,
                  minio: MinioResource, milvus: MilvusResource) -> dg.MaterializeResult:
    """The monthly restore test, automated: the newest verified backup of every store restored
    into scratch targets, compared with its manifest, checked with the consistency rules
    (RAG_DRILL_RULES_FILE; default: the RAG service's), removed. Records each store's measured
    restore time (the RTO, plotted over time), also when the drill fails."""
    choice = pick_repository(repository, config.repository, lambda r: recovery.choose(
        r, list(recovery.STORES), recovery.utcnow()), context.log.info)
    rules, rules_source = consistency.rules_from_environment()
    result = recovery.drill(choice.repo, store_recoveries(postgres, redis, minio, milvus), rules,
                            concurrent=not config.one_store_at_a_time, log=context.log.info,
                            log_error=context.log.error)
    metadata: dict[str, Any] = {"spread_s": dg.MetadataValue.float(result.spread_s),
                                **choice_metadata(choice)}
    for r in result.restored.values():
        metadata.update(store_metadata(r))
    metadata.update(rules_metadata(result.rules, rules_source))
    metadata["total_restore_s"] = dg.MetadataValue.float(round(result.total_restore_s, 3))
    metadata["restore_wall_s"] = dg.MetadataValue.float(round(result.wall_s, 3))
    metadata["consistent"] = dg.MetadataValue.bool(result.consistent)
    if result.problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in result.problems))
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata=metadata))
        raise dg.Failure(description="restore drill found problems: " + "; ".join(
                             result.problems), metadata={"problems": metadata["problems"]})
    return dg.MaterializeResult(metadata=metadata)


restore_drill_job = dg.define_asset_job("restore_drill_job", selection=[restore_drill],
                                        description="The monthly automated restore test.")
restore_drill_schedule = dg.ScheduleDefinition(
    job=restore_drill_job, cron_schedule="0 4 1 * *", default_status=SCHEDULE_STATUS,
    description="04:00 on the first of every month, after the nightly backups.")

defs = dg.Definitions(assets=[restore_drill], jobs=[restore_all_job, restore_drill_job],
                      schedules=[restore_drill_schedule])
