"""The catalog heals itself: backups taken outside Dagster become materializations of their
partitions, partitions whose backup is gone are wiped, DAMAGED ones are left alone; and the
verified assets carry their store's RPO as a freshness policy."""

from __future__ import annotations

import shutil
from datetime import timedelta

import dagster as dg
import pytest

from rag_backup.definitions import defs
from rag_backup.defs import catalog, milvus, minio, pitr, postgres, redis
from rag_backup.defs.freshness import RPO_GRACE, cron_period
from rag_backup.defs.resources import BackupRepositoryResource
from rag_backup.engines import postgres as pg_engine
from rag_backup.engines import redis as redis_engine
from rag_backup.repository import BackupRecord, BackupRepository
from rag_backup_tests.conftest import take_backup

STACK_SERVICES = ("postgres", "redis")
PG_BACKUP = postgres.POLICY.backup_asset
PG_VERIFIED = dg.AssetKey("postgres_backup_verified")


@pytest.fixture(scope="module")
def redis_server(stack_env: dict[str, str]) -> redis_engine.RedisServer:
    return redis_engine.RedisServer(stack_env["RAG_REDIS_HOST"], int(stack_env["RAG_REDIS_PORT"]),
                                    stack_env["RAG_REDIS_PASSWORD"])


def days(n: int) -> list[str]:
    """The last ``n`` daily partition keys (today's included)."""
    return postgres.POLICY.partitions_def.get_partition_keys()[-n:]


def pg_backup(repo: BackupRepository, pg, day: str, verified: bool = True) -> BackupRecord:
    """A PostgreSQL backup of ``ragqa`` taken with the engine alone, as the CLI would."""
    verify = (lambda record: pg_engine.verify(repo, record, server=pg)) if verified else None
    return take_backup(repo, "postgres", day,
                       lambda pending: pg_engine.backup(pg, pending, databases=["ragqa"]),
                       verify, run_id="cli")[1]


def tick(instance: dg.DagsterInstance, repo_dir) -> dg.SensorResult:
    """One evaluation of the sensor, its events then reported as the daemon reports them."""
    context = dg.build_sensor_context(instance=instance, resources={
        "repository": BackupRepositoryResource(location=str(repo_dir))})
    result = catalog.catalog_sensor(context)
    assert isinstance(result, dg.SensorResult)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def reported(result: dg.SensorResult) -> set[tuple[str, str]]:
    return {(e.asset_key.to_user_string(), e.partition) for e in result.asset_events}


def latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> dict:
    """The metadata of the partition's newest materialization, as plain values."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
    assert records, f"{key.to_user_string()} {partition} has no materialization"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_backups_taken_outside_dagster_become_materializations_once(repo, repo_dir, pg,
                                                                   redis_server):
    instance = dg.DagsterInstance.ephemeral()
    old, new = days(2)
    hour = redis.POLICY.partitions_def.get_partition_keys()[-1]
    pg_old = pg_backup(repo, pg, old)
    pg_new = pg_backup(repo, pg, new, verified=False)
    rd = take_backup(repo, "redis", hour, lambda p: redis_engine.backup(redis_server, p),
                     lambda r: redis_engine.verify(repo, r), run_id="cli")[1]

    first = tick(instance, repo_dir)
    assert reported(first) == {("postgres_backup", old), ("postgres_backup", new),
                               ("postgres_backup_verified", old),
                               ("redis_backup", hour), ("redis_backup_verified", hour)}
    assert instance.get_materialized_partitions(PG_BACKUP) == {old, new}
    assert instance.get_materialized_partitions(PG_VERIFIED) == {old}
    for key, record in ((PG_BACKUP, pg_old), (PG_BACKUP, pg_new),
                        (redis.POLICY.backup_asset, rd)):
        shown = latest(instance, key, record.partition_key)
        assert shown["backup_id"] == record.backup_id
        assert shown["size_bytes"] == record.manifest.size_bytes > 0
        assert shown["reported_by"] == "catalog_sensor"
        assert shown["taken_by_run"] == "cli"
    fp = pg_engine.fingerprint_of(pg_old)
    assert latest(instance, PG_BACKUP, old)["rows"] == fp.rows > 0
    assert latest(instance, redis.POLICY.backup_asset, hour)["keys"] == \
        redis_engine.fingerprint_of(rd).keys
    checked = latest(instance, PG_VERIFIED, old)
    assert checked["backup_id"] == pg_old.backup_id and checked["verified"] is True

    second = tick(instance, repo_dir)
    assert second.asset_events == []
    assert "postgres: 2 backup(s) in the repository; Dagster agrees" in \
        second.skip_reason.skip_message

    # The command line replaces the verified backup of `old`: Dagster learns the new backup,
    # and stops showing the partition as verified until it is verified again.
    replaced = pg_backup(repo, pg, old, verified=False)
    third = tick(instance, repo_dir)
    assert reported(third) == {("postgres_backup", old)}
    assert latest(instance, PG_BACKUP, old)["backup_id"] == replaced.backup_id
    assert instance.get_materialized_partitions(PG_VERIFIED) == set()
    assert tick(instance, repo_dir).asset_events == []


def test_a_deleted_backup_is_wiped_and_a_damaged_one_left_alone(repo, repo_dir, pg):
    instance = dg.DagsterInstance.ephemeral()
    by_retention, by_hand, damaged = days(3)
    for day in (by_retention, by_hand, damaged):
        pg_backup(repo, pg, day)
    tick(instance, repo_dir)
    assert instance.get_materialized_partitions(PG_VERIFIED) == {by_retention, by_hand,
                                                                 damaged}

    repo.delete("postgres", by_retention, "expired: test")
    for path in (repo_dir / "postgres" / by_hand).iterdir():  # no tombstone: gone by hand
        path.unlink() if path.is_file() else shutil.rmtree(path)
    (repo_dir / "postgres" / damaged / "manifest.json").write_bytes(b"{not json")
    unknown = postgres.POLICY.partitions_def.get_partition_keys()[-5]
    (repo_dir / "postgres" / unknown).mkdir()
    (repo_dir / "postgres" / unknown / "manifest.json").write_bytes(b"[]")

    result = tick(instance, repo_dir)
    assert result.asset_events == []
    for key in (PG_BACKUP, PG_VERIFIED):
        assert instance.get_materialized_partitions(key) == {damaged}
    message = result.skip_reason.skip_message
    assert f"DAMAGED, left alone: {unknown}, {damaged}" in message
    assert "2 wiped" in message
    gone = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=PG_BACKUP, asset_partitions=[by_retention, by_hand]),
        limit=10).records
    why = {r.partition_key: r.asset_observation.metadata for r in gone}
    assert why[by_retention]["deleted_because"].value.startswith("expired: test")
    assert "no manifest and no tombstone" in why[by_hand]["deleted_because"].value
    assert all(m["present"].value is False for m in why.values())
    assert tick(instance, repo_dir).asset_events == []


def test_one_store_failing_does_not_stop_the_others(repo, repo_dir, pg, monkeypatch):
    instance = dg.DagsterInstance.ephemeral()
    (day,) = days(1)
    pg_backup(repo, pg, day, verified=False)
    real = catalog.reconcile

    def failing_for_redis(entry, *args):
        if entry.store == "redis":
            raise RuntimeError("the redis area cannot be listed")
        return real(entry, *args)

    monkeypatch.setattr(catalog, "reconcile", failing_for_redis)
    result = tick(instance, repo_dir)
    assert reported(result) == {("postgres_backup", day)}
    message = result.skip_reason.skip_message
    assert "redis: NOT CHECKED (RuntimeError: the redis area cannot be listed)" in message
    for later in ("milvus", "minio", "postgres_base"):
        assert f"{later}: 0 backup(s) in the repository; Dagster agrees" in message


def test_a_partition_a_run_is_working_on_is_left_to_that_run(repo, repo_dir, pg):
    instance = dg.DagsterInstance.ephemeral()
    (day,) = days(1)
    pg_backup(repo, pg, day)  # committed; the run has not reported it yet
    run = dg.DagsterRun(job_name=postgres.POLICY.job.name, status=dg.DagsterRunStatus.STARTED,
                        tags={"dagster/partition": day})
    instance.add_run(run)
    busy = tick(instance, repo_dir)
    assert busy.asset_events == []
    assert f"a run is working on: {day}" in busy.skip_reason.skip_message

    instance.report_run_failed(run)  # it died before reporting: the catalog reports it
    assert reported(tick(instance, repo_dir)) == {("postgres_backup", day),
                                                  ("postgres_backup_verified", day)}


def test_catalog_covers_every_store_and_its_assets():
    graph = defs.resolve_asset_graph()
    stores = {entry.store: entry for entry in catalog.CATALOG}
    assert set(stores) == {"postgres", "redis", "milvus", "minio", "postgres_base"}
    for entry in catalog.CATALOG:
        for key in (entry.backup_asset, entry.verified_asset):
            assert graph.get(key).partitions_def == entry.partitions_def
    assert "catalog_sensor" in {s.name for s in defs.sensors}


def test_verified_assets_are_fresh_for_their_rpo():
    graph = defs.resolve_asset_graph()
    expected = {dg.AssetKey(f"{p.store}_backup_verified"): p.rpo
                for p in (postgres.POLICY, redis.POLICY, milvus.POLICY, minio.POLICY)}
    expected[pitr.postgres_base_backup_verified.key] = cron_period(pitr.BASE_BACKUP_CRON)
    assert expected[dg.AssetKey("redis_backup_verified")] == timedelta(hours=1)
    for key, window in expected.items():
        policy = graph.get(key).freshness_policy
        assert isinstance(policy, dg.FreshnessPolicy), key
        assert policy.warn_window.to_timedelta() == window, key  # warned at the RPO
        assert policy.fail_window.to_timedelta() == window + RPO_GRACE, key  # failed past it


@pytest.mark.parametrize(("cron", "period"), [
    ("0 1 * * *", timedelta(days=1)), ("0 1 * * 0", timedelta(days=7)),
    ("0 1 * * 1-5", timedelta(days=3)), ("*/15 1 * * *", timedelta(hours=23, minutes=15)),
])
def test_a_base_backup_schedule_is_fresh_for_its_longest_gap(cron, period):
    assert cron_period(cron, "Europe/Berlin") == period
