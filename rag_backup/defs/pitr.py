"""PostgreSQL point-in-time recovery in Dagster: base backups (partitioned, verified with their
WAL, retained for the PITR window), the WAL archive's hourly continuity, the lag sensor (the
RPO, plotted and alerted), and the restore-to-a-time job.

The WAL itself is received by a service outside Dagster (``python -m rag_backup
wal-receiver``): Dagster runs are not long-running processes.
"""

import contextlib
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.alerts import Alert
from rag_backup.defs.common import (
    RetentionConfig,
    collect_stale,
    commit_backup,
    comparison_metadata,
    retry_when_unreachable,
    run_holder,
    verify_and_record,
)
from rag_backup.defs.freshness import cron_period, rpo_freshness
from rag_backup.defs.partition_index import mark_partitions_deleted
from rag_backup.defs.partitions import (
    DAILY_PARTITIONS,
    HOURLY_PARTITIONS,
    SCHEDULE_STATUS,
    SENSOR_STATUS,
    TIMEZONE,
    context_window,
)
from rag_backup.defs.resources import (
    AlertResource,
    BackupRepositoryResource,
    PostgresResource,
)
from rag_backup.engines.postgres import pitr
from rag_backup.errors import IntegrityError, InvalidRequest
from rag_backup.repository import LATEST, BackupRepository
from rag_backup.repository.retention import RetentionDecision
from rag_backup.repository.manifest import utcnow

GROUP = "postgres_pitr"
KINDS = {"postgres"}
POOL = "postgres"
PITR_DAYS = int(os.environ.get("RAG_PG_PITR_DAYS", "7") or 7)
BASE_BACKUP_CRON = os.environ.get("RAG_PG_BASE_BACKUP_CRON", "").strip() or "0 1 * * *"
LAG_ALERT_MINUTES = float(os.environ.get("RAG_PG_WAL_LAG_ALERT_MINUTES", "15") or 15)
WAL_SLOT = os.environ.get("RAG_PG_WAL_SLOT", "").strip() or "rag_backup"
LAG_INTERVAL_S = 60
WAL_WAIT_S = 600.0
Log = Callable[[str], None]


@dg.asset(partitions_def=DAILY_PARTITIONS, group_name=GROUP, kinds=KINDS, pool=POOL,
          owners=["team:platform"])
def postgres_base_backup(context: dg.AssetExecutionContext,
                         repository: BackupRepositoryResource,
                         postgres: PostgresResource) -> dg.MaterializeResult:
    """A physical base backup of the whole PostgreSQL cluster (`pg_basebackup`, backup manifest
    on), streamed through zstd into the repository and committed like every backup. With the
    WAL archive it is the start of every point-in-time recovery. Only the current day's
    partition can be taken: a base backup is always of now."""
    def take(pending):
        return pitr.take_base_backup(postgres.server(), pending, timeout_s=postgres.timeout_s,
                                     zstd_level=postgres.zstd_level, log=context.log.info)

    def counts(outcome: pitr.BaseBackupOutcome) -> dict[str, int]:
        fp = outcome.base
        return {"tar_bytes": fp.tar_bytes, "timeline": fp.timeline,
                "wal_segments_needed": len(fp.wal_segments())}

    return commit_backup(context, repository.open(), pitr.BASE_STORE, timedelta(days=1),
                         take, counts)


@dg.asset(deps=[postgres_base_backup], partitions_def=DAILY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"],
          freshness_policy=rpo_freshness(cron_period(BASE_BACKUP_CRON, TIMEZONE)))
def postgres_base_backup_verified(context: dg.AssetExecutionContext,
                                  repository: BackupRepositoryResource,
                                  postgres: PostgresResource) -> dg.MaterializeResult:
    """The partition's base backup, verified with the WAL that makes it consistent: the
    artifact's sha256, then `pg_verifybackup` checks every file against the backup manifest and
    parses that WAL, taken from the archive with its digests checked (waits up to 10 minutes
    for the WAL receiver to archive the backup's last segment)."""
    repo = repository.open()
    return verify_and_record(context, repo, pitr.BASE_STORE, lambda record: pitr.verify_with_wal(
        repo, record, timeout_s=postgres.timeout_s, wal_wait_s=WAL_WAIT_S,
        log=context.log.info))


@dg.asset(deps=[postgres_base_backup_verified], partitions_def=DAILY_PARTITIONS,
          group_name=GROUP, kinds=KINDS, pool=POOL, owners=["team:platform"])
def postgres_pitr_retention(context: dg.AssetExecutionContext, config: RetentionConfig,
                            repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """Keeps point-in-time recovery possible for the PITR window (`RAG_PG_PITR_DAYS`, default
    7): deletes base backups that are not needed for it (keeping the newest verified one, and
    the newest one from before the window's start, the anchor of its first hours), then the WAL
    that no retained base backup needs."""
    repo = repository.open()
    now = utcnow()
    window_start = now - timedelta(days=PITR_DAYS)
    with retry_when_unreachable(), repo.lease(pitr.BASE_STORE, run_holder(context),
                                              "retention"):
        decisions = plan_base_retention(repo, window_start)
        for decision in decisions:
            if decision.delete and not config.dry_run:
                repo.delete(pitr.BASE_STORE, decision.partition_key, decision.reason)
        pruned = pitr.prune_wal(repo, dry_run=config.dry_run)
        stale = collect_stale(repo, pitr.BASE_STORE, dry_run=config.dry_run,
                              older_than=timedelta(hours=config.stale_after_hours))
    deleted = [d for d in decisions if d.delete]
    for d in decisions:
        verb = ("would delete" if config.dry_run else "deleted") if d.delete else "kept"
        context.log.info(f"base backup {d.partition_key} ({d.backup_id}): {verb}: {d.reason}")
    context.log.info(f"WAL: {'would delete' if config.dry_run else 'deleted'} "
                     f"{len(pruned.deleted)} segment(s) before {pruned.keep_from or '-'}")
    if deleted and not config.dry_run:
        mark_partitions_deleted(context.instance,
                                (postgres_base_backup.key, postgres_base_backup_verified.key),
                                deleted)
    return dg.MaterializeResult(metadata={
        "dry_run": dg.MetadataValue.bool(config.dry_run),
        "pitr_window_days": dg.MetadataValue.int(PITR_DAYS),
        "base_backups_kept": dg.MetadataValue.int(len(decisions) - len(deleted)),
        "base_backups_deleted": dg.MetadataValue.int(0 if config.dry_run else len(deleted)),
        "wal_segments_deleted": dg.MetadataValue.int(0 if config.dry_run
                                                     else len(pruned.deleted)),
        "wal_bytes_deleted": dg.MetadataValue.int(0 if config.dry_run else pruned.bytes),
        "wal_kept_from": dg.MetadataValue.text(pruned.keep_from or "-"),
        "stale_writes_collected": dg.MetadataValue.int(0 if config.dry_run else len(stale)),
    })


def plan_base_retention(repo, window_start: datetime) -> list[RetentionDecision]:
    """Which base backups go: those that consistent before ``window_start``, except the newest
    of them (recovery to the window's first hours starts there) and the newest verified."""
    bases = [(r, pitr.fingerprint_of(r)) for r in repo.list_backups(pitr.BASE_STORE)]
    bases.sort(key=lambda pair: pair[1].consistent_at)
    before = [r for r, fp in bases if fp.consistent_at <= window_start]
    anchor = before[-1].backup_id if before else None
    verified = [r for r, _ in bases if r.verified]
    newest_verified = verified[-1].backup_id if verified else None
    decisions = []
    for record, fp in bases:
        old = fp.consistent_at <= window_start
        if not old:
            why, delete = "inside the PITR window", False
        elif record.backup_id == newest_verified:
            why, delete = "the newest verified base backup", False
        elif record.backup_id == anchor:
            why, delete = "the start of recovery to the window's first hours", False
        else:
            why, delete = (f"consistent at {fp.consistent_at:%Y-%m-%d %H:%M}, before the "
                           f"{PITR_DAYS}-day PITR window"), True
        decisions.append(RetentionDecision(record.partition_key, record.backup_id, delete, why))
    return decisions


@dg.asset(partitions_def=HOURLY_PARTITIONS, group_name=GROUP, kinds=KINDS,
          owners=["team:platform"])
def postgres_wal(context: dg.AssetExecutionContext,
                 repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """The WAL archived during this hour, checked: every segment present with the right
    checksums, and no gap from the last segment of the hour before to the first of the hour
    after. A gap fails the partition with the missing segments' names. The WAL itself is
    received continuously by the WAL receiver service, not by this asset."""
    window = context_window(context)
    if window.end > utcnow():
        raise InvalidRequest(f"hour {context.partition_key} is not over yet: its WAL is still "
                             "being archived; check it after "
                             f"{window.end.astimezone(timezone.utc):%H:%M} UTC")
    with retry_when_unreachable():
        found = pitr.check_hour(repository.open(), window.start, window.end)
    metadata = {
        "segments": dg.MetadataValue.int(len(found.segments)),
        "bytes": dg.MetadataValue.int(found.bytes),
        "stored_bytes": dg.MetadataValue.int(found.stored_bytes),
        "commits": dg.MetadataValue.int(found.commits),
        "first_segment": dg.MetadataValue.text(found.segments[0] if found.segments else "-"),
        "last_segment": dg.MetadataValue.text(found.segments[-1] if found.segments else "-"),
        "previous_segment": dg.MetadataValue.text(found.previous or "-"),
        "next_segment": dg.MetadataValue.text(found.following or "-"),
    }
    if not found.ok:
        raise IntegrityError(f"WAL of hour {context.partition_key}: {found.problems()}")
    if not found.segments:
        context.log.info(f"no WAL segment was completed in hour {context.partition_key} (an "
                         "idle server); the continuity across it is checked")
    return dg.MaterializeResult(metadata=metadata)


@dg.sensor(name="postgres_wal_lag_sensor", minimum_interval_seconds=LAG_INTERVAL_S,
           default_status=SENSOR_STATUS, asset_selection=[postgres_wal],
           description="Measures the WAL archive's lag behind the server (the PostgreSQL RPO) "
                       "every minute, records it on postgres_wal (plotted as lag_seconds), and "
                       "alerts once past RAG_PG_WAL_LAG_ALERT_MINUTES (default 15), once when it "
                       "cannot be measured or the replication slot risks the server's disk, and "
                       "once on recovery.")
def postgres_wal_lag_sensor(context: dg.SensorEvaluationContext,
                            repository: BackupRepositoryResource, postgres: PostgresResource,
                            alerts: AlertResource) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    lag = pitr.current_lag(repository.open(), postgres.server(), slot=WAL_SLOT)
    threshold = LAG_ALERT_MINUTES * 60
    breached = lag.seconds is None or lag.seconds > threshold or bool(lag.problems)
    details = {k: str(v) for k, v in lag.to_dict().items() if k != "problems"}
    details["threshold_s"] = str(threshold)
    if lag.problems:
        details["problems"] = " | ".join(lag.problems)
    notifier = alerts.notifier()
    if breached and not state.get("breached"):
        said = (f"{lag.seconds:.0f} s" if lag.seconds is not None else "unknown")
        notifier.send(Alert("rpo_breached", "postgres WAL archive lagging",
                            f"The PostgreSQL WAL archive is {said} behind the server (alert "
                            f"threshold {threshold:.0f} s). {' '.join(lag.problems)} Check the "
                            "WAL receiver service (python -m rag_backup wal-receiver).",
                            "postgres", details))
    elif state.get("breached") and not breached:
        notifier.send(Alert("rpo_recovered", "postgres WAL archive caught up",
                            f"The PostgreSQL WAL archive is {lag.seconds:.0f} s behind the "
                            "server again, within the threshold.", "postgres", details))
    state["breached"] = breached
    metadata = {"lag_seconds": dg.MetadataValue.float(float(lag.seconds))
                if lag.seconds is not None else dg.MetadataValue.text("unknown"),
                "server_lsn": dg.MetadataValue.text(lag.server_lsn or "-"),
                "archived_lsn": dg.MetadataValue.text(lag.archived_lsn or "-"),
                "status_age_s": dg.MetadataValue.float(float(lag.status_age_s or 0.0))}
    if lag.slot and lag.slot.get("retained_bytes") is not None:
        metadata["slot_retained_bytes"] = dg.MetadataValue.int(int(lag.slot["retained_bytes"]))
    if lag.problems:
        metadata["problems"] = dg.MetadataValue.text(" | ".join(lag.problems))
    return dg.SensorResult(
        asset_events=[dg.AssetObservation(asset_key=postgres_wal.key, metadata=metadata)],
        cursor=json.dumps(state),
        skip_reason=f"lag {lag.seconds if lag.seconds is not None else 'unknown'} s"
                    f"{'; ' + '; '.join(lag.problems) if lag.problems else ''}")


# -- restore to a point in time ------------------------------------------------------------
class RestorePostgresPitrConfig(dg.Config):
    target_time: str = Field(default=LATEST, description="ISO 8601 time to recover to (e.g. "
                             "2026-11-30T14:32:00+00:00; without an offset: UTC), or 'latest' "
                             "for everything the archive holds.")
    target_lsn: str = Field(default="", description="Instead of a time: a WAL position "
                            "(e.g. 16/B374D848).")
    target_name: str = Field(default="", description="Instead of a time: a restore point made "
                             "with pg_create_restore_point().")
    timeline: int = Field(default=0, description="The timeline to follow (0: the newest).")
    inclusive: bool = Field(default=True, description="Stop just after the target (true) or "
                            "just before it.")
    mode: str = Field(default="scratch", description="scratch: a recovered instance on its own "
                      "port; databases: copy chosen databases into the configured server; "
                      "in_place: replace a stopped server's data directory.")
    port: int = Field(default=0, description="scratch: the port of the recovered instance "
                      "(0: a free one).")
    keep_running: bool = Field(default=True, description="scratch: leave the instance running "
                               "for inspection (false: stop and remove it).")
    work_directory: str = Field(default="", description="scratch: where the recovered "
                                "instance lives (default: RAG_PG_PITR_WORK_DIR or the temp dir).")
    databases: list[str] = Field(default=[], description="databases: which databases.")
    target_names: dict[str, str] = Field(default={}, description="databases: new name per "
                                         "database (default <db>_pitr_<timestamp>); an existing "
                                         "database only with confirm.")
    data_directory: str = Field(default="", description="in_place: the stopped server's data "
                                "directory.")
    confirm: str = Field(default="", description="in_place: the data directory, exactly; "
                         "databases: the existing database's name to replace it.")
    allow_unverified: bool = Field(default=False, description="Allow base backups that have not "
                                   "passed verification (not recommended).")


def run_restore(config: RestorePostgresPitrConfig, repo: BackupRepository,
                postgres: PostgresResource, log: Log, holder: str
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recovery of ``restore_postgres_pitr``, without Dagster (the job and the command line
    both run it): plan first (a refused target changes nothing), then recover; returns the
    summary (the op's output) and the run's metadata. ``holder`` names this writer in the
    PostgreSQL lease, taken when the recovery replaces a data directory or a database."""
    target = pitr.PitrTarget.parse(config.target_time, config.target_lsn, config.target_name,
                                   config.timeline or None, config.inclusive)
    work = config.work_directory or os.environ.get("RAG_PG_PITR_WORK_DIR", "")
    server = postgres.server()
    into = pitr.Into(mode=config.mode, work_dir=Path(work) if work else None, port=config.port,
                     keep_running=config.keep_running, databases=tuple(config.databases),
                     target_server=server, target_names=dict(config.target_names),
                     data_directory=Path(config.data_directory) if config.data_directory
                     else None, confirm=config.confirm, slot=WAL_SLOT)
    into.check()
    chosen = pitr.plan(repo, target, allow_unverified=config.allow_unverified)
    log(f"plan: base backup {chosen.base.partition_key} ({chosen.base.backup_id}, "
        f"consistent at {chosen.base_fp.consistent_at:%Y-%m-%d %H:%M:%S} UTC), "
        f"{len(chosen.segments)} WAL segment(s) on timeline {chosen.timeline}; "
        f"{chosen.reachable.describe()}")
    replaces = config.mode == "in_place" or (config.mode == "databases" and config.confirm)
    lease = (repo.lease("postgres", holder, f"a point-in-time recovery ({config.mode})")
             if replaces else contextlib.nullcontext())
    with lease:
        report = pitr.restore(repo, chosen, into, server, timeout_s=postgres.timeout_s, log=log)
    metadata = {
        "target": dg.MetadataValue.text(report.target),
        "reached_at": dg.MetadataValue.text(report.reached_at.isoformat()
                                            if report.reached_at else "unknown"),
        "stop": dg.MetadataValue.text(report.stop or "end of the archived WAL"),
        "base_backup": dg.MetadataValue.text(f"{report.base_partition} ({report.base_backup})"),
        "wal_segments_replayed": dg.MetadataValue.int(report.wal_segments),
        "wal_bytes": dg.MetadataValue.int(report.wal_bytes),
        "replay_s": dg.MetadataValue.float(report.replay_s),
        "duration_s": dg.MetadataValue.float(report.duration_s),
        "new_timeline": dg.MetadataValue.int(report.timeline),
        "mode": dg.MetadataValue.text(report.mode),
    }
    if report.port:
        metadata["port"] = dg.MetadataValue.int(report.port)
    if report.data_directory:
        metadata["data_directory"] = dg.MetadataValue.path(report.data_directory)
    if report.kept_aside:
        metadata["previous_data_directory"] = dg.MetadataValue.path(report.kept_aside)
    for database, target_db in report.databases.items():
        metadata[f"database_{database}"] = dg.MetadataValue.text(target_db)
        metadata.update(comparison_metadata(report.comparisons[database], prefix=f"{database}_"))
    if report.comparisons:
        metadata["matches_backup"] = dg.MetadataValue.bool(report.matches)
    return report.to_dict(), metadata


@dg.op(pool=POOL)
def restore_postgres_pitr(context: dg.OpExecutionContext, config: RestorePostgresPitrConfig,
                          repository: BackupRepositoryResource,
                          postgres: PostgresResource) -> dict:
    """Recover PostgreSQL to a point in time (plan first: a refused target changes nothing)."""
    summary, metadata = run_restore(config, repository.open(), postgres, context.log.info,
                                    run_holder(context))
    context.add_output_metadata(metadata)
    return summary


@dg.job(tags={"store": "postgres", "kind": "restore"})
def restore_postgres_pitr_job():
    """Restore PostgreSQL to a point in time (a time, an LSN, a restore point, or latest) from a
    base backup and the WAL archive: into a scratch instance for inspection, chosen databases
    into the configured server, or a stopped server's data directory in place (confirmed).
    Targets that cannot be reached are refused before anything changes, with the reachable
    times."""
    restore_postgres_pitr()


postgres_pitr_job = dg.define_asset_job(
    "postgres_pitr_job",
    selection=dg.AssetSelection.assets(postgres_base_backup, postgres_base_backup_verified,
                                       postgres_pitr_retention),
    description="Take, verify and retain a PostgreSQL base backup for point-in-time recovery.")

postgres_wal_job = dg.define_asset_job(
    "postgres_wal_job", selection=dg.AssetSelection.assets(postgres_wal),
    description="Check the continuity of one hour of archived PostgreSQL WAL.")


@dg.schedule(job=postgres_pitr_job, cron_schedule=BASE_BACKUP_CRON, execution_timezone=TIMEZONE,
             default_status=SCHEDULE_STATUS, name="postgres_base_backup_schedule",
             description="A base backup at RAG_PG_BASE_BACKUP_CRON (default daily at 01:00); "
                         "for the day it runs in.")
def postgres_base_backup_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    when = context.scheduled_execution_time or datetime.now(timezone.utc)
    key = DAILY_PARTITIONS.get_partition_key_for_timestamp(when.timestamp())
    return dg.RunRequest(run_key=key, partition_key=key)


postgres_wal_schedule = dg.build_schedule_from_partitioned_job(
    postgres_wal_job, minute_of_hour=5, default_status=SCHEDULE_STATUS)

defs = dg.Definitions(
    assets=[postgres_base_backup, postgres_base_backup_verified, postgres_pitr_retention,
            postgres_wal],
    jobs=[postgres_pitr_job, postgres_wal_job, restore_postgres_pitr_job],
    schedules=[postgres_base_backup_schedule, postgres_wal_schedule],
    sensors=[postgres_wal_lag_sensor],
)
