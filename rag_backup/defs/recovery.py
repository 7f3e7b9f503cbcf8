"""Recovery across stores: every store back to one point in time, and monthly restore drills.

- ``restore_all_job``: for a point in time (default: now), each store's newest verified backup
  taken at or before it; the chosen set and how far apart the backups are; then every store
  restored, into scratch targets by default, into production only with each store's
  confirmation.
- ``restore_drill`` (asset, monthly schedule): the newest verified backup of every store
  restored into scratch targets, compared with the manifests' fingerprints, checked for
  consistency across stores, removed; the measured restore time of each store is recorded as
  numeric metadata, so the UI plots the RTO over time.
"""

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.defs.partitions import SCHEDULE_STATUS
from rag_backup.defs.resources import (
    BackupRepositoryResource,
    MilvusResource,
    MinioResource,
    PostgresResource,
    RedisResource,
)
from rag_backup.engines import milvus as milvus_engine
from rag_backup.engines import minio as minio_engine
from rag_backup.engines import postgres as pg_engine
from rag_backup.engines import redis as redis_engine
from rag_backup.errors import BackupNotFound, ConfirmationRequired, InvalidRequest
from rag_backup.repository import BackupRecord, BackupRepository
from rag_backup.repository.manifest import utcnow

GROUP = "operations"


@dataclass
class Restored:
    """What one store's restore produced."""

    store: str
    partition_key: str
    backup_id: str
    recovery_point: datetime
    target: str
    seconds: float
    matches_manifest: bool
    counts: dict[str, int] = field(default_factory=dict)
    handle: Any = None  # store-specific access to the restored data (drills)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")


# -- PostgreSQL ----------------------------------------------------------------------------

def restore_postgres(repo: BackupRepository, record: BackupRecord, postgres: PostgresResource,
                     *, databases: list[str] | None, production: bool, confirm: str,
                     suffix: str, log) -> Restored:
    """Every chosen database of the backup: over itself (production, confirmed) or into
    ``<db>_<suffix>`` scratch databases."""
    server = postgres.server()
    available = sorted(record.manifest.fingerprint["databases"])
    chosen = databases or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise InvalidRequest(f"postgres backup {record.partition_key} has no database(s) "
                             f"{unknown}; it has {available}")
    if production and confirm != ",".join(chosen):
        raise ConfirmationRequired(f"restoring PostgreSQL databases {chosen} in place replaces "
                                   f"them: set postgres_confirm to {','.join(chosen)!r}")
    started, targets, rows, ok = time.monotonic(), {}, 0, True
    for db in chosen:
        target = db if production else f"{db[:40]}_{suffix}"
        report = pg_engine.restore(repo, record, server, source_database=db,
                                   target_database=target, confirm=target if production else "",
                                   timeout_s=postgres.timeout_s, log=log)
        targets[db], rows, ok = target, rows + report.rows, ok and report.matches_manifest
    return Restored("postgres", record.partition_key, record.backup_id,
                    record.manifest.started_at, ", ".join(targets.values()),
                    time.monotonic() - started, ok, {"rows": rows, "databases": len(targets)},
                    handle=targets)


def drop_postgres(postgres: PostgresResource, restored: Restored) -> None:
    from psycopg2 import sql

    conn = postgres.server().connect("postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for target in restored.handle.values():
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(target)))
    finally:
        conn.close()


# -- Redis ---------------------------------------------------------------------------------

def restore_redis(repo: BackupRepository, record: BackupRecord, redis: RedisResource, *,
                  production: bool, confirm: str, scratch_dir: str, log) -> Restored:
    """Production: replay into the configured server, flushing each db first (confirmed).
    Scratch: the RDB placed, checked, in a new directory under ``scratch_dir``, ready for a
    redis-server to start on."""
    started = time.monotonic()
    fingerprint = record.manifest.fingerprint
    if production:
        server = redis.server()
        name = f"{server.host}:{server.port}"
        if confirm != name:
            raise ConfirmationRequired(f"restoring Redis in place flushes every db of the "
                                       f"backup on {name}: set redis_confirm to {name!r}")
        report = redis_engine.replay(repo, record, server, flush=True, confirm=name,
                                     timeout_s=redis.timeout_s, log=log)
        return Restored("redis", record.partition_key, record.backup_id,
                        record.manifest.started_at, name, time.monotonic() - started,
                        report.matches_manifest, {"keys": report.restored})
    directory = Path(scratch_dir) / f"redis-{_stamp()}-{record.backup_id}"
    directory.mkdir(parents=True)
    placed = redis_engine.place_rdb(repo, record, str(directory), timeout_s=redis.timeout_s)
    return Restored("redis", record.partition_key, record.backup_id, record.manifest.started_at,
                    placed.path, time.monotonic() - started, placed.keys == fingerprint["keys"],
                    {"keys": placed.keys})


@contextmanager
def drill_redis(repo: BackupRepository, record: BackupRecord, redis: RedisResource,
                log) -> Iterator[Restored]:
    """Replay the backup into a private, empty redis-server; compare per-db counts."""
    with redis_engine.scratch_target(timeout_s=redis.timeout_s) as target:
        started = time.monotonic()
        report = redis_engine.replay(repo, record, target, timeout_s=redis.timeout_s, log=log)
        yield Restored("redis", record.partition_key, record.backup_id,
                       record.manifest.started_at, "private redis-server",
                       time.monotonic() - started, report.matches_manifest,
                       {"keys": report.restored}, handle=target)


# -- MinIO ---------------------------------------------------------------------------------

def restore_minio(repo: BackupRepository, record: BackupRecord, minio: MinioResource, *,
                  production: bool, confirm: str, suffix: str, log) -> Restored:
    """Production: every bucket of the snapshot back to its state (objects not in the snapshot
    removed; confirmed). Scratch: each bucket into a new bucket ``<bucket>-<suffix>``."""
    started = time.monotonic()
    buckets = minio_engine.snapshot_buckets(record)
    if production and confirm != ",".join(buckets):
        raise ConfirmationRequired(f"restoring MinIO buckets {buckets} in place removes objects "
                                   f"added since the snapshot: set minio_confirm to "
                                   f"{','.join(buckets)!r}")
    targets, ok, objects = {}, True, 0
    for bucket in buckets:
        target = bucket if production else f"{bucket[:40]}-{suffix}"
        report = minio_engine.restore(
            repo, record, minio.s3(), buckets=[bucket], target_bucket=target,
            remove_extra=production, confirm=target if production else "",
            workers=minio.workers, log=log)
        targets[bucket] = target
        ok = ok and report.matches_snapshot
        objects += report.total("in_snapshot")
    return Restored("minio", record.partition_key, record.backup_id, record.manifest.started_at,
                    ", ".join(targets.values()), time.monotonic() - started, ok,
                    {"objects": objects, "buckets": len(targets)}, handle=targets)


def remove_buckets(minio: MinioResource, restored: Restored) -> None:
    client = minio.s3().client()
    for bucket in restored.handle.values():
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)


# -- Milvus --------------------------------------------------------------------------------

def restore_milvus(repo: BackupRepository, record: BackupRecord, milvus: MilvusResource, *,
                   production: bool, confirm: str, suffix: str, log) -> Restored:
    """Production: every collection over itself (confirmed). Scratch: ``<name><suffix>``."""
    started = time.monotonic()
    names = sorted(record.manifest.fingerprint["collections"])
    if production and confirm != ",".join(names):
        raise ConfirmationRequired(f"restoring Milvus collections {names} in place drops them: "
                                   f"set milvus_confirm to {','.join(names)!r}")
    targets = {name: name if production else f"{name[:180]}{suffix}" for name in names}
    report = milvus_engine.restore(repo, record, milvus.server(), targets=targets,
                                   confirm=names if production else (), log=log)
    return Restored("milvus", record.partition_key, record.backup_id,
                    record.manifest.started_at, ", ".join(targets.values()),
                    time.monotonic() - started, report.matches_manifest,
                    {"rows": report.rows, "collections": len(targets)}, handle=targets)


def drop_collections(milvus: MilvusResource, restored: Restored) -> None:
    with milvus.server().session() as client:
        for name in restored.handle.values():
            client.drop_collection(name)


def milvus_ids_without_documents(postgres: PostgresResource, database: str,
                                 milvus: MilvusResource, restored: Restored) -> list[int]:
    """Primary keys of the restored ``ministry_*`` collections with no ``documents`` row."""
    conn = postgres.server().connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM documents")
            documents = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    orphans: set[int] = set()
    with milvus.server().session() as client:
        for source, target in restored.handle.items():
            if not source.startswith("ministry_"):
                continue
            iterator = client.query_iterator(target, batch_size=4096, output_fields=["id"])
            try:
                while batch := iterator.next():
                    orphans.update(row["id"] for row in batch if row["id"] not in documents)
            finally:
                iterator.close()
    return sorted(orphans)


# -- consistency across stores -------------------------------------------------------------

def referenced_objects_missing(postgres: PostgresResource, database: str,
                               repo: BackupRepository, minio_record: BackupRecord) -> list[str]:
    """Object keys (``bucket/key``) referenced by ``documents`` that the MinIO snapshot lacks."""
    conn = postgres.server().connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT object_key FROM documents WHERE object_key IS NOT NULL "
                        "UNION SELECT image_key FROM documents WHERE image_key IS NOT NULL")
            wanted = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    present = set()
    for bucket in minio_engine.snapshot_buckets(minio_record):
        present.update(f"{bucket}/{e.key}" for e in minio_engine.read_snapshot(
            repo, minio_record, bucket) if f"{bucket}/{e.key}" in wanted)
    return sorted(wanted - present)


# -- choosing one recovery point -----------------------------------------------------------

def parse_point(text: str) -> datetime:
    if not text:
        return utcnow()
    try:
        point = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequest(f"point_in_time {text!r} is not an ISO 8601 time, e.g. "
                             "2026-11-24T09:30:00Z") from exc
    return point if point.tzinfo else point.replace(tzinfo=timezone.utc)


def choose(repo: BackupRepository, stores: list[str], point: datetime
           ) -> dict[str, BackupRecord]:
    """Each store's newest verified backup taken at or before ``point``; an error naming the
    stores that have none."""
    chosen = {store: repo.latest_verified(store, at_or_before=point) for store in stores}
    missing = [store for store, record in chosen.items() if record is None]
    if missing:
        raise BackupNotFound(f"no verified backup at or before {point:%Y-%m-%d %H:%M} UTC for "
                             f"{', '.join(missing)}; choose a later point in time")
    return chosen  # type: ignore[return-value]


def spread_s(records: dict[str, BackupRecord]) -> float:
    points = [r.manifest.started_at for r in records.values()]
    return (max(points) - min(points)).total_seconds() if points else 0.0


class RestoreAllConfig(dg.Config):
    point_in_time: str = Field(default="", description="ISO 8601 time, e.g. "
                               "2026-11-24T09:30:00Z; empty: now. Each store gets its newest "
                               "verified backup taken at or before it.")
    stores: list[str] = Field(default=[], description="Stores to restore; empty: all.")
    into_production: bool = Field(default=False, description="Restore over the production "
                                  "stores (each needs its confirmation below); default: scratch "
                                  "targets (new PostgreSQL databases, an RDB file in "
                                  "scratch_dir).")
    postgres_databases: list[str] = Field(default=["ragqa"], description="PostgreSQL "
                                          "databases to restore (the backup may also hold "
                                          "others, e.g. Dagster's own).")
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
    dry_run: bool = Field(default=False, description="Only report the chosen backups.")


@dg.op(out=dg.Out(dict))
def restore_all_stores(context: dg.OpExecutionContext, config: RestoreAllConfig,
                       repository: BackupRepositoryResource, postgres: PostgresResource,
                       redis: RedisResource, minio: MinioResource,
                       milvus: MilvusResource) -> dict:
    """Choose each store's backup for the point in time, report the set, and restore it."""
    repo = repository.open()
    stores = config.stores or list(RESTORERS)
    unknown = sorted(set(stores) - set(RESTORERS))
    if unknown:
        raise InvalidRequest(f"unknown store(s) {unknown}; known: {sorted(RESTORERS)}")
    point = parse_point(config.point_in_time)
    chosen = choose(repo, stores, point)
    for store, record in chosen.items():
        context.log.info(f"{store}: partition {record.partition_key} (backup "
                         f"{record.backup_id}), recovery point "
                         f"{record.manifest.started_at:%Y-%m-%d %H:%M:%S} UTC")
    metadata: dict[str, Any] = {
        "point_in_time": dg.MetadataValue.text(point.isoformat()),
        "spread_s": dg.MetadataValue.float(spread_s(chosen)),
        "chosen": dg.MetadataValue.md("| store | partition | backup | recovery point |\n"
                                      "|---|---|---|---|\n" + "\n".join(
            f"| {s} | {r.partition_key} | {r.backup_id} | {r.manifest.started_at:%F %T} |"
            for s, r in chosen.items())),
    }
    summary: dict[str, Any] = {"chosen": {s: r.partition_key for s, r in chosen.items()},
                               "spread_s": spread_s(chosen)}
    if not config.dry_run:
        resources = {"postgres": postgres, "redis": redis, "minio": minio, "milvus": milvus}
        results = [RESTORERS[store](repo, record, resources[store], config, context.log.info)
                   for store, record in chosen.items()]
        for r in results:
            metadata[f"{r.store}_restore_s"] = dg.MetadataValue.float(round(r.seconds, 3))
            metadata[f"{r.store}_target"] = dg.MetadataValue.text(r.target)
            metadata[f"{r.store}_matches_manifest"] = dg.MetadataValue.bool(r.matches_manifest)
        summary["restored"] = {r.store: {"target": r.target, "seconds": r.seconds,
                                         "matches_manifest": r.matches_manifest, **r.counts}
                               for r in results}
    context.add_output_metadata(metadata)
    return summary


RESTORERS = {
    "postgres": lambda repo, record, res, cfg, log: restore_postgres(
        repo, record, res, databases=cfg.postgres_databases, production=cfg.into_production,
        confirm=cfg.postgres_confirm, suffix=f"pit_{_stamp()}", log=log),
    "redis": lambda repo, record, res, cfg, log: restore_redis(
        repo, record, res, production=cfg.into_production, confirm=cfg.redis_confirm,
        scratch_dir=cfg.scratch_dir, log=log),
    "milvus": lambda repo, record, res, cfg, log: restore_milvus(
        repo, record, res, production=cfg.into_production, confirm=cfg.milvus_confirm,
        suffix=f"_pit_{_stamp()}", log=log),
    "minio": lambda repo, record, res, cfg, log: restore_minio(
        repo, record, res, production=cfg.into_production, confirm=cfg.minio_confirm,
        suffix=f"pit-{_stamp()}", log=log),
}


@dg.job(tags={"kind": "restore"})
def restore_all_job():
    """Bring every store back to one point in time: each store's newest verified backup taken
    at or before it, the chosen set and its spread reported, restored into scratch targets by
    default or over production with each store's confirmation."""
    restore_all_stores()


# -- the drill -----------------------------------------------------------------------------

@dg.asset(group_name=GROUP, kinds={"python"}, owners=["team:platform"],
          pool="restore_drill")
def restore_drill(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                  postgres: PostgresResource, redis: RedisResource,
                  minio: MinioResource, milvus: MilvusResource) -> dg.MaterializeResult:
    """The monthly restore test, automated: the newest verified backup of every store restored
    into scratch targets, compared with its manifest, checked for consistency across stores,
    removed. Records each store's measured restore time (the RTO, plotted over time)."""
    repo = repository.open()
    chosen = choose(repo, list(RESTORERS), utcnow())
    metadata: dict[str, Any] = {"spread_s": dg.MetadataValue.float(spread_s(chosen))}
    problems = []
    with ExitStack() as cleanup:
        pg_restored = restore_postgres(repo, chosen["postgres"], postgres, databases=None,
                                       production=False, confirm="", suffix=f"drill_{_stamp()}",
                                       log=context.log.info)
        cleanup.callback(drop_postgres, postgres, pg_restored)
        redis_restored = cleanup.enter_context(drill_redis(repo, chosen["redis"], redis,
                                                           context.log.info))
        minio_restored = restore_minio(repo, chosen["minio"], minio, production=False,
                                       confirm="", suffix=f"drill-{_stamp()}",
                                       log=context.log.info)
        cleanup.callback(remove_buckets, minio, minio_restored)
        milvus_restored = restore_milvus(repo, chosen["milvus"], milvus, production=False,
                                         confirm="", suffix=f"_drill_{_stamp()}",
                                         log=context.log.info)
        cleanup.callback(drop_collections, milvus, milvus_restored)
        if "ragqa" in pg_restored.handle:
            missing = referenced_objects_missing(postgres, pg_restored.handle["ragqa"], repo,
                                                 chosen["minio"])
            metadata["objects_missing"] = dg.MetadataValue.int(len(missing))
            if missing:
                problems.append(f"{len(missing)} object(s) referenced by documents are not in "
                                f"the MinIO snapshot, e.g. {missing[:3]}")
            orphans = milvus_ids_without_documents(postgres, pg_restored.handle["ragqa"],
                                                   milvus, milvus_restored)
            metadata["vectors_without_document"] = dg.MetadataValue.int(len(orphans))
            if orphans:
                problems.append(f"{len(orphans)} Milvus id(s) have no documents row, e.g. "
                                f"{orphans[:3]}")
        for r in (pg_restored, redis_restored, minio_restored, milvus_restored):
            metadata[f"{r.store}_restore_s"] = dg.MetadataValue.float(round(r.seconds, 3))
            metadata[f"{r.store}_partition"] = dg.MetadataValue.text(r.partition_key)
            for name, value in r.counts.items():
                metadata[f"{r.store}_{name}"] = dg.MetadataValue.int(value)
            if not r.matches_manifest:
                problems.append(f"{r.store}: restored counts differ from the manifest")
    total = sum(v.value for k, v in metadata.items() if k.endswith("_restore_s"))
    metadata["total_restore_s"] = dg.MetadataValue.float(round(total, 3))
    metadata["consistent"] = dg.MetadataValue.bool(not problems)
    if problems:
        raise InvalidRequest("restore drill found problems: " + "; ".join(problems))
    return dg.MaterializeResult(metadata=metadata)


restore_drill_job = dg.define_asset_job("restore_drill_job", selection=[restore_drill],
                                        description="The monthly automated restore test.")
restore_drill_schedule = dg.ScheduleDefinition(
    job=restore_drill_job, cron_schedule="0 4 1 * *", default_status=SCHEDULE_STATUS,
    description="04:00 on the first of every month, after the nightly backups.")

defs = dg.Definitions(assets=[restore_drill], jobs=[restore_all_job, restore_drill_job],
                      schedules=[restore_drill_schedule])
