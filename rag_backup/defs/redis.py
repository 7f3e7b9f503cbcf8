"""Redis: hourly RDB backup, its verification, retention, and the restore job."""

import contextlib
import os
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
from rag_backup.defs.partitions import HOURLY_PARTITIONS, SCHEDULE_STATUS
from rag_backup.defs.resources import BackupRepositoryResource, RedisResource
from rag_backup.engines import redis as engine
from rag_backup.errors import InvalidRequest
from rag_backup.repository import LATEST, BackupRepository

STORE = engine.STORE
RETENTION = timedelta(days=1)
GROUP = "redis"
KINDS = {"redis"}
POOL = "redis"
Log = Callable[[str], None]


@dg.asset(partitions_def=HOURLY_PARTITIONS, group_name=GROUP, kinds=KINDS, pool=POOL,
          owners=["team:platform"])
def redis_backup(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                 redis: RedisResource) -> dg.MaterializeResult:
    """Hourly RDB of the Redis server, received as a replica receives it (`redis-cli --rdb`, no
    access to the server's disk), fingerprinted (keys and expiring keys per db, read from the
    file itself), zstd-compressed and committed atomically."""
    def take(pending):
        return engine.backup(redis.server(), pending, timeout_s=redis.timeout_s,
                             zstd_level=redis.zstd_level, log=context.log.info)

    return commit_backup(context, repository.open(), STORE, RETENTION, take, counts)


def counts(outcome: engine.BackupOutcome) -> dict[str, int]:
    """The numbers the UI plots for a Redis backup."""
    fp = engine.fingerprint_of(outcome)
    plotted = {"keys": fp.keys, "expires": fp.expires, "dbs": len(fp.dbs)}
    if fp.rdb_bytes is not None:  # always, for a backup this engine takes
        plotted["rdb_bytes"] = fp.rdb_bytes
    return plotted


@dg.asset(deps=[redis_backup], partitions_def=HOURLY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"],
          freshness_policy=rpo_freshness(timedelta(hours=1)))
def redis_backup_verified(context: dg.AssetExecutionContext,
                          repository: BackupRepositoryResource,
                          redis: RedisResource) -> dg.MaterializeResult:
    """The partition's RDB, verified: size and sha256 match the manifest, `redis-check-rdb`
    accepts it, and its key counts equal the fingerprint. The result is recorded in the
    repository (failures too)."""
    repo = repository.open()
    return verify_and_record(context, repo, STORE, lambda record: engine.verify(
        repo, record, timeout_s=redis.timeout_s))


@dg.asset(deps=[redis_backup_verified], partitions_def=HOURLY_PARTITIONS, group_name=GROUP,
          kinds=KINDS, pool=POOL, owners=["team:platform"])
def redis_retention(context: dg.AssetExecutionContext, config: RetentionConfig,
                    repository: BackupRepositoryResource) -> dg.MaterializeResult:
    """Deletes Redis backups older than one day, never the newest verified one, and takes
    their partitions out of the UI."""
    return apply_retention(context, repository.open(), STORE, RETENTION, config,
                           (redis_backup.key, redis_backup_verified.key))


class RestoreRedisConfig(dg.Config):
    partition_key: str = Field(default=LATEST, description="Hourly partition of the backup "
                               "(YYYY-MM-DD-HH:00), or 'latest' for the newest verified backup.")
    repository: str = repository_field()
    mode: str = Field(default="replay", description="'replay': copy keys into a running server "
                      "(DUMP/RESTORE, absolute expiry kept). 'file': place the RDB into a "
                      "STOPPED server's data directory.")
    target_host: str = Field(default="", description="replay: target server; empty: the "
                             "configured Redis.")
    target_port: int = Field(default=0, description="replay: target port; 0: the configured one.")
    target_password_env: str = Field(default="", description="replay: NAME of the environment "
                                     "variable holding the target's password (never the "
                                     "password itself); empty: the configured Redis password.")
    dbs: list[int] = Field(default=[], description="replay: databases of the backup to restore; "
                           "empty: all.")
    target_db: int = Field(default=-1, description="replay: restore a single db into this db "
                           "instead; -1: same db numbers.")
    pattern: str = Field(default="*", description="replay: only keys matching this glob.")
    flush: bool = Field(default=False, description="replay: FLUSHDB each target db first "
                        "(needs confirm).")
    replace: bool = Field(default=False, description="replay: overwrite keys that exist on the "
                          "target (needs confirm); default: keep them.")
    data_dir: str = Field(default="", description="file: the stopped server's data directory.")
    filename: str = Field(default="dump.rdb", description="file: the server's dbfilename.")
    confirm: str = Field(default="", description="Destructive actions need the target's name: "
                         "'host:port/db' (or 'host:port' for several dbs) for replay, the data "
                         "directory's path for file mode.")
    allow_unverified: bool = Field(default=False, description="Allow a backup that has not "
                                   "passed verification (not recommended).")


def _target(config: RestoreRedisConfig, redis: RedisResource) -> engine.RedisServer:
    configured = redis.server()
    if not config.target_host and not config.target_port and not config.target_password_env:
        return configured
    password = configured.password
    if config.target_password_env:
        if config.target_password_env not in os.environ:
            raise InvalidRequest(f"environment variable {config.target_password_env} (the "
                                 "target's password) is not set where the run executes")
        password = os.environ[config.target_password_env]
    return engine.RedisServer(config.target_host or configured.host,
                              config.target_port or configured.port, password,
                              configured.username)


def run_restore(config: RestoreRedisConfig, repo: BackupRepository, redis: RedisResource,
                log: Log, holder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The restore of ``restore_redis``, without Dagster (the job and the command line both
    run it): returns the summary (the op's output) and the run's metadata. ``holder`` names
    this writer in the store's lease, taken by a destructive restore of the configured server
    (flush or replace) and by a confirmed file placement."""
    record = repo.resolve(STORE, config.partition_key,
                          require_verified=not config.allow_unverified)
    metadata = {"partition_key": dg.MetadataValue.text(record.partition_key),
                "backup_id": dg.MetadataValue.text(record.backup_id),
                "keys_in_backup": dg.MetadataValue.int(engine.fingerprint_of(record).keys)}
    if config.mode == "file":
        if not config.data_dir:
            raise InvalidRequest("file mode needs data_dir: the stopped server's data directory")
        lease = (repo.lease(STORE, holder, f"placing an RDB into {config.data_dir}")
                 if config.confirm else contextlib.nullcontext())
        with lease:
            placed = engine.place_rdb(repo, record, config.data_dir, filename=config.filename,
                                      confirm=config.confirm, timeout_s=redis.timeout_s)
        log(f"placed {placed.path} ({placed.keys} keys); moved aside: "
            f"{', '.join(placed.moved_aside) or 'nothing'}")
        metadata.update({"path": dg.MetadataValue.path(placed.path),
                         "keys": dg.MetadataValue.int(placed.keys),
                         "moved_aside": dg.MetadataValue.text(", ".join(placed.moved_aside))})
        return {"mode": "file", "path": placed.path, "keys": placed.keys}, metadata
    if config.mode != "replay":
        raise InvalidRequest(f"mode must be 'replay' or 'file', not {config.mode!r}")
    target, configured = _target(config, redis), redis.server()
    in_place = (config.flush or config.replace) and (
        (target.host, target.port) == (configured.host, configured.port))
    lease = (repo.lease(STORE, holder, f"a replay into {target.host}:{target.port}")
             if in_place else contextlib.nullcontext())
    with lease:  # a replay repeated is the same replay
        report = engine.replay(
            repo, record, target, dbs=config.dbs or None,
            target_db=None if config.target_db < 0 else config.target_db,
            pattern=config.pattern, flush=config.flush, replace=config.replace,
            confirm=config.confirm, timeout_s=redis.timeout_s, log=log)
    metadata.update({
        "target": dg.MetadataValue.text(report.target),
        "keys_restored": dg.MetadataValue.int(report.restored),
        "keys_kept_existing": dg.MetadataValue.int(sum(d.skipped_existing for d in report.dbs)),
        "keys_expired_skipped": dg.MetadataValue.int(sum(d.skipped_expired for d in report.dbs)),
        "matches_manifest": dg.MetadataValue.bool(report.matches_manifest),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    })
    summary = {"mode": "replay", "target": report.target, "keys_restored": report.restored,
               "matches_manifest": report.matches_manifest,
               "dbs": {d.db: {"restored": d.restored, "existing": d.skipped_existing,
                              "expired": d.skipped_expired, "in_backup": d.in_backup}
                       for d in report.dbs}}
    return summary, metadata


@dg.op(pool=POOL)
def restore_redis(context: dg.OpExecutionContext, config: RestoreRedisConfig,
                  repository: BackupRepositoryResource, redis: RedisResource) -> dict:
    """Restore a Redis backup by replay into a running server or as a file for a stopped one."""
    with retry_when_unreachable():  # a replay repeated is the same replay
        choice = restore_repository(repository, config, STORE, context.log.info)
        summary, metadata = run_restore(config, choice.repo, redis, context.log.info,
                                        run_holder(context))
    context.add_output_metadata({**metadata, **choice_metadata(choice)})
    return summary


@dg.job(tags={"store": STORE, "kind": "restore"})
def restore_redis_job():
    """Restore a Redis backup. Replay mode copies keys into a running server with DUMP/RESTORE,
    keeping absolute expiry times, optionally only some dbs or keys; flushing or replacing needs
    confirmation. File mode places the RDB atomically into a stopped server's data directory
    (the runbook's method, made safe); it refuses while a server runs there."""
    restore_redis()


redis_backup_job = dg.define_asset_job(
    "redis_backup_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Back up, verify and apply retention for one hourly Redis partition.",
)

redis_backup_schedule = dg.build_schedule_from_partitioned_job(
    redis_backup_job, minute_of_hour=5, default_status=SCHEDULE_STATUS)

POLICY = StorePolicy(
    store=STORE, job=redis_backup_job, partitions_def=HOURLY_PARTITIONS, retention=RETENTION,
    rpo=timedelta(hours=1), due_after=timedelta(minutes=5), backup_asset=redis_backup.key)

defs = dg.Definitions(
    assets=[redis_backup, redis_backup_verified, redis_retention],
    jobs=[redis_backup_job, restore_redis_job],
    schedules=[redis_backup_schedule],
)
