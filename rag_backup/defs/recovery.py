"""Recovery across stores: every store back to one point in time, and monthly restore drills.

- ``restore_all_job``: for a point in time (default: now), each store's newest verified backup
  taken at or before it; the chosen set and how far apart the backups are; then every store
  restored (every PostgreSQL database of the chosen backup by default), into scratch targets
  named with one timestamp by default, into production only with each store's confirmation.
  Each store reports what its restore compared (``<store>_matches_manifest`` and the
  comparison, field by field); a difference fails the run unless ``accept_differences``.
- ``restore_drill`` (asset, monthly schedule): the newest verified backup of every store
  restored into scratch targets (each store on its own: one failure does not stop the others),
  compared with the manifests, checked with the cross-store consistency rules
  (``rag_backup.consistency``, ``RAG_DRILL_RULES_FILE``), removed; the measured restore time of
  each store is recorded as numeric metadata, so the UI plots the RTO over time, also when the
  drill fails (as an observation of the asset).
"""

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup import consistency
from rag_backup.defs.common import comparison_metadata
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
from rag_backup.engines.comparison import Comparison
from rag_backup.errors import BackupNotFound, ConfirmationRequired, InvalidRequest
from rag_backup.repository import BackupRecord, BackupRepository
from rag_backup.repository.manifest import utcnow

GROUP = "operations"
STORES = ("postgres", "redis", "minio", "milvus")


@dataclass
class Restored:
    """What one store's restore produced, and what it compared with the backup."""

    store: str
    partition_key: str
    backup_id: str
    recovery_point: datetime
    target: str
    seconds: float
    comparison: Comparison
    counts: dict[str, int] = field(default_factory=dict)
    handle: Any = None  # source name -> restored name (drills: where the rules look)

    @property
    def matches_manifest(self) -> bool:
        return self.comparison.matches


def _stamp() -> str:
    """The timestamp in every scratch target name of one run."""
    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")


# -- comparisons of the stores whose engines report counts only ----------------------------

def replay_comparison(report: redis_engine.ReplayReport) -> Comparison:
    """A Redis replay: every key of each db of the backup accounted for (restored, already
    there, or expired since)."""
    comparison = Comparison()
    for db in report.dbs:
        if db.skipped_pattern:
            comparison.skip(f"db {db.db}", "only keys matching a pattern were restored")
            continue
        comparison.check("dbs", f"db {db.db}", "keys (restored, kept or expired)",
                         db.in_backup, db.restored + db.skipped_existing + db.skipped_expired)
    return comparison


def placed_comparison(record: BackupRecord, placed: redis_engine.PlaceReport) -> Comparison:
    comparison = Comparison()
    comparison.check("rdb", f"RDB {placed.path}", "keys", record.manifest.fingerprint["keys"],
                     placed.keys)
    return comparison


def milvus_comparison(report: milvus_engine.RestoreReport) -> Comparison:
    """Rows of every collection and of each of its partitions against the manifest."""
    comparison = Comparison()
    for c in report.collections:
        comparison.check("collections", f"collection {c.source}", "rows", c.rows_expected,
                         c.rows)
        for label, (expected, actual) in sorted(c.partitions.items()):
            comparison.check("partitions", f"collection {c.source} partition {label}", "rows",
                             expected, actual)
    return comparison


# -- PostgreSQL ----------------------------------------------------------------------------

def postgres_targets(record: BackupRecord, databases: list[str] | None, *, production: bool,
                     suffix: str) -> dict[str, str]:
    """Each chosen database of the backup (default: all) and the database it is restored to."""
    available = sorted(record.manifest.fingerprint["databases"])
    chosen = databases or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise InvalidRequest(f"postgres backup {record.partition_key} has no database(s) "
                             f"{unknown}; it has {available}")
    return {db: db if production else f"{db[:40]}_{suffix}" for db in chosen}


def restore_postgres(repo: BackupRepository, record: BackupRecord, postgres: PostgresResource,
                     *, databases: list[str] | None, production: bool, confirm: str,
                     suffix: str, accept_differences: bool = False, log) -> Restored:
    """Every chosen database of the backup (default: all): over itself (production, confirmed)
    or into ``<db>_<suffix>`` scratch databases."""
    server = postgres.server()
    targets = postgres_targets(record, databases, production=production, suffix=suffix)
    if production and confirm != ",".join(targets):
        raise ConfirmationRequired(f"restoring PostgreSQL databases {list(targets)} in place "
                                   f"replaces them: set postgres_confirm to "
                                   f"{','.join(targets)!r}")
    started, rows, comparison = time.monotonic(), 0, Comparison()
    for db, target in targets.items():
        report = pg_engine.restore(repo, record, server, source_database=db,
                                   target_database=target, confirm=target if production else "",
                                   timeout_s=postgres.timeout_s,
                                   accept_differences=accept_differences, log=log)
        rows += report.rows
        comparison.merge(report.comparison, prefix=f"{db}: ")
    return Restored("postgres", record.partition_key, record.backup_id,
                    record.manifest.started_at, ", ".join(targets.values()),
                    time.monotonic() - started, comparison,
                    {"rows": rows, "databases": len(targets)}, handle=targets)


def drop_databases(postgres: PostgresResource, targets: dict[str, str]) -> None:
    from psycopg2 import sql

    conn = postgres.server().connect("postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for target in targets.values():
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(target)))
    finally:
        conn.close()


# -- Redis ---------------------------------------------------------------------------------

def restore_redis(repo: BackupRepository, record: BackupRecord, redis: RedisResource, *,
                  production: bool, confirm: str, scratch_dir: str, stamp: str,
                  log) -> Restored:
    """Production: replay into the configured server, flushing each db first (confirmed).
    Scratch: the RDB placed, checked, in a new directory ``redis-<stamp>-<backup id>`` under
    ``scratch_dir``, ready for a redis-server to start on."""
    started = time.monotonic()
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
                        replay_comparison(report), {"keys": report.restored})
    directory = Path(scratch_dir) / f"redis-{stamp}-{record.backup_id}"
    directory.mkdir(parents=True)
    placed = redis_engine.place_rdb(repo, record, str(directory), timeout_s=redis.timeout_s)
    return Restored("redis", record.partition_key, record.backup_id, record.manifest.started_at,
                    placed.path, time.monotonic() - started, placed_comparison(record, placed),
                    {"keys": placed.keys})


def drill_redis(repo: BackupRepository, record: BackupRecord, redis: RedisResource,
                cleanup: ExitStack, log) -> Restored:
    """Replay the backup into a private, empty redis-server (stopped by ``cleanup``)."""
    target = cleanup.enter_context(redis_engine.scratch_target(timeout_s=redis.timeout_s))
    started = time.monotonic()
    report = redis_engine.replay(repo, record, target, timeout_s=redis.timeout_s, log=log)
    return Restored("redis", record.partition_key, record.backup_id, record.manifest.started_at,
                    "private redis-server", time.monotonic() - started,
                    replay_comparison(report), {"keys": report.restored}, handle=target)


# -- MinIO ---------------------------------------------------------------------------------

def minio_targets(record: BackupRecord, *, production: bool, suffix: str) -> dict[str, str]:
    return {b: b if production else f"{b[:40]}-{suffix}"
            for b in minio_engine.snapshot_buckets(record)}


def restore_minio(repo: BackupRepository, record: BackupRecord, minio: MinioResource, *,
                  production: bool, confirm: str, suffix: str, accept_differences: bool = False,
                  log) -> Restored:
    """Production: every bucket of the snapshot back to its state (objects not in the snapshot
    removed; confirmed). Scratch: each bucket into a new bucket ``<bucket>-<suffix>``."""
    started = time.monotonic()
    targets = minio_targets(record, production=production, suffix=suffix)
    if production and confirm != ",".join(targets):
        raise ConfirmationRequired(f"restoring MinIO buckets {list(targets)} in place removes "
                                   f"objects added since the snapshot: set minio_confirm to "
                                   f"{','.join(targets)!r}")
    comparison, objects = Comparison(), 0
    for bucket, target in targets.items():
        report = minio_engine.restore(
            repo, record, minio.s3(), buckets=[bucket], target_bucket=target,
            remove_extra=production, confirm=target if production else "",
            workers=minio.workers, accept_differences=accept_differences, log=log)
        comparison.merge(report.comparison)  # items name the target bucket already
        objects += report.total("in_snapshot")
    return Restored("minio", record.partition_key, record.backup_id, record.manifest.started_at,
                    ", ".join(targets.values()), time.monotonic() - started, comparison,
                    {"objects": objects, "buckets": len(targets)}, handle=targets)


def remove_buckets(minio: MinioResource, targets: dict[str, str]) -> None:
    """Empty and delete each target bucket that exists."""
    endpoint = minio.s3()
    client = endpoint.client()
    for bucket in targets.values():
        with minio_engine.s3_errors(endpoint, "removing a scratch bucket", bucket):
            try:
                client.head_bucket(Bucket=bucket)
            except client.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                    continue
                raise
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys,
                                                                 "Quiet": True})
            client.delete_bucket(Bucket=bucket)


# -- Milvus --------------------------------------------------------------------------------

def milvus_targets(record: BackupRecord, *, production: bool, suffix: str) -> dict[str, str]:
    return {name: name if production else f"{name[:180]}{suffix}"
            for name in sorted(record.manifest.fingerprint["collections"])}


def restore_milvus(repo: BackupRepository, record: BackupRecord, milvus: MilvusResource, *,
                   production: bool, confirm: str, suffix: str, log) -> Restored:
    """Production: every collection over itself (confirmed). Scratch: ``<name><suffix>``."""
    started = time.monotonic()
    targets = milvus_targets(record, production=production, suffix=suffix)
    if production and confirm != ",".join(targets):
        raise ConfirmationRequired(f"restoring Milvus collections {list(targets)} in place "
                                   f"drops them: set milvus_confirm to {','.join(targets)!r}")
    report = milvus_engine.restore(repo, record, milvus.server(), targets=targets,
                                   confirm=list(targets) if production else (), log=log)
    return Restored("milvus", record.partition_key, record.backup_id,
                    record.manifest.started_at, ", ".join(targets.values()),
                    time.monotonic() - started, milvus_comparison(report),
                    {"rows": report.rows, "collections": len(targets)}, handle=targets)


def drop_collections(milvus: MilvusResource, targets: dict[str, str]) -> None:
    """Drop each target collection that exists."""
    server = milvus.server()
    with server.session() as client:
        for name in targets.values():
            with milvus_engine.calls(server, f"dropping scratch collection {name!r}"):
                if client.has_collection(name, timeout=server.timeout_s):
                    client.drop_collection(name, timeout=server.timeout_s)


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


def restore_store(store: str, repo: BackupRepository, record: BackupRecord, resource: Any,
                  config: RestoreAllConfig, stamp: str, log) -> Restored:
    """One store of a restore-all run, into its scratch target (named with ``stamp``) or over
    production."""
    common = {"production": config.into_production, "log": log}
    if store == "postgres":
        return restore_postgres(repo, record, resource, databases=config.postgres_databases,
                                confirm=config.postgres_confirm, suffix=f"pit_{stamp}",
                                accept_differences=config.accept_differences, **common)
    if store == "redis":
        return restore_redis(repo, record, resource, confirm=config.redis_confirm,
                             scratch_dir=config.scratch_dir, stamp=stamp, **common)
    if store == "minio":
        return restore_minio(repo, record, resource, confirm=config.minio_confirm,
                             suffix=f"pit-{stamp}", accept_differences=config.accept_differences,
                             **common)
    return restore_milvus(repo, record, resource, confirm=config.milvus_confirm,
                          suffix=f"_pit_{stamp}", **common)


def store_metadata(r: Restored) -> dict[str, Any]:
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
    repo = repository.open()
    stores = config.stores or list(STORES)
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        raise InvalidRequest(f"unknown store(s) {unknown}; known: {sorted(STORES)}")
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
    if config.dry_run:
        context.add_output_metadata(metadata)
        return summary
    resources = {"postgres": postgres, "redis": redis, "minio": minio, "milvus": milvus}
    stamp = _stamp()
    results = [restore_store(store, repo, record, resources[store], config, stamp,
                             context.log.info) for store, record in chosen.items()]
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

def _failed_comparison(exc: Exception) -> Comparison:
    """What a failed restore compared: the comparison its error carries (a restore that
    differs), else nothing (not run)."""
    report = getattr(exc, "report", None)
    comparison = getattr(report, "comparison", None)
    if isinstance(comparison, Comparison):
        return comparison
    failed = Comparison()
    failed.skip("restore", f"the restore failed: {exc}")
    return failed


def _removing(problems: list[str], what: str, remove: Callable[..., None], *args: Any
              ) -> Callable[[], None]:
    def run() -> None:
        try:
            remove(*args)
        except Exception as exc:  # noqa: BLE001 - every problem is reported, the rest cleaned
            problems.append(f"{what} could not be removed (remove them by hand if they "
                            f"exist): {exc}")
    return run


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


@dg.asset(group_name=GROUP, kinds={"python"}, owners=["team:platform"],
          pool="restore_drill")
def restore_drill(context: dg.AssetExecutionContext, repository: BackupRepositoryResource,
                  postgres: PostgresResource, redis: RedisResource,
                  minio: MinioResource, milvus: MilvusResource) -> dg.MaterializeResult:
    """The monthly restore test, automated: the newest verified backup of every store restored
    into scratch targets, compared with its manifest, checked with the consistency rules
    (RAG_DRILL_RULES_FILE; default: the RAG service's), removed. Records each store's measured
    restore time (the RTO, plotted over time), also when the drill fails."""
    repo = repository.open()
    rules, rules_source = consistency.rules_from_environment()
    chosen = choose(repo, list(STORES), utcnow())
    stamp = _stamp()
    planned = {"postgres": postgres_targets(chosen["postgres"], None, production=False,
                                            suffix=f"drill_{stamp}"),
               "minio": minio_targets(chosen["minio"], production=False,
                                      suffix=f"drill-{stamp}"),
               "milvus": milvus_targets(chosen["milvus"], production=False,
                                        suffix=f"_drill_{stamp}")}
    restorers: dict[str, Callable[[ExitStack], Restored]] = {
        "postgres": lambda _: restore_postgres(
            repo, chosen["postgres"], postgres, databases=None, production=False, confirm="",
            suffix=f"drill_{stamp}", log=context.log.info),
        "redis": lambda stack: drill_redis(repo, chosen["redis"], redis, stack,
                                           context.log.info),
        "minio": lambda _: restore_minio(repo, chosen["minio"], minio, production=False,
                                         confirm="", suffix=f"drill-{stamp}",
                                         log=context.log.info),
        "milvus": lambda _: restore_milvus(repo, chosen["milvus"], milvus, production=False,
                                           confirm="", suffix=f"_drill_{stamp}",
                                           log=context.log.info),
    }
    removers = {"postgres": (drop_databases, postgres), "minio": (remove_buckets, minio),
                "milvus": (drop_collections, milvus)}
    problems: list[str] = []
    metadata: dict[str, Any] = {"spread_s": dg.MetadataValue.float(spread_s(chosen))}
    restored: dict[str, Restored] = {}
    failed: dict[str, str] = {}
    with ExitStack() as cleanup:
        for store in STORES:
            if store in removers:  # registered first: a half-done restore is removed too
                remove, resource = removers[store]
                cleanup.callback(_removing(problems, f"{store} scratch target(s) "
                                           f"{', '.join(planned[store].values())}", remove,
                                           resource, planned[store]))
            started = time.monotonic()
            try:
                restored[store] = restorers[store](cleanup)
            except Exception as exc:  # noqa: BLE001 - the other stores are still drilled
                context.log.error(f"{store}: the restore failed: {exc}")
                failed[store] = f"its restore failed: see {store}_not_compared"
                record = chosen[store]
                restored[store] = Restored(store, record.partition_key, record.backup_id,
                                           record.manifest.started_at,
                                           ", ".join(planned.get(store, {}).values()), 0.0,
                                           _failed_comparison(exc))
                problems.append(f"{store}: the restore failed: {exc}")
            restored[store].seconds = restored[store].seconds or time.monotonic() - started
        data = consistency.RestoredData(
            postgres=postgres.server(), databases=dict(restored["postgres"].handle or {}),
            milvus=milvus.server(), collections=dict(restored["milvus"].handle or {}),
            s3=minio.s3(), buckets=dict(restored["minio"].handle or {}), not_restored=failed)
        results = consistency.evaluate(rules, data)
    for r in restored.values():
        metadata.update(store_metadata(r))
        if r.store not in failed and not r.matches_manifest:
            problems.append(f"{r.store}: the restored data differ from the backup: "
                            f"{r.comparison.summary()}")
    metadata.update(rules_metadata(results, rules_source))
    problems += [r.summary() for r in results if not r.passed]
    total = sum(r.seconds for r in restored.values())
    metadata["total_restore_s"] = dg.MetadataValue.float(round(total, 3))
    metadata["consistent"] = dg.MetadataValue.bool(not problems)
    if problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in problems))
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, metadata=metadata))
        raise dg.Failure(description="restore drill found problems: " + "; ".join(problems),
                         metadata={"problems": metadata["problems"]})
    return dg.MaterializeResult(metadata=metadata)


restore_drill_job = dg.define_asset_job("restore_drill_job", selection=[restore_drill],
                                        description="The monthly automated restore test.")
restore_drill_schedule = dg.ScheduleDefinition(
    job=restore_drill_job, cron_schedule="0 4 1 * *", default_status=SCHEDULE_STATUS,
    description="04:00 on the first of every month, after the nightly backups.")

defs = dg.Definitions(assets=[restore_drill], jobs=[restore_all_job, restore_drill_job],
                      schedules=[restore_drill_schedule])
