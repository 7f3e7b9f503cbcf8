"""Restoring every store to one point in time, and the automated restore drill."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from rag_backup.defs import milvus as milvus_defs
from rag_backup.defs import minio as minio_defs
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs import recovery
from rag_backup.defs import redis as redis_defs
from rag_backup.defs.resources import (
    BackupRepositoryResource,
    MilvusResource,
    MinioResource,
    PostgresResource,
    RedisResource,
)
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil

DAY = utcnow().strftime("%Y-%m-%d")
HOUR = utcnow().strftime("%Y-%m-%d-%H:00")


@pytest.fixture(scope="module")
def shared_repo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recovery-repository")


@pytest.fixture
def repo(shared_repo_dir):
    return BackupRepository(FilesystemBackend(shared_repo_dir))


@pytest.fixture(scope="module")
def resources(pg, stack_env, shared_repo_dir):
    return {
        "repository": BackupRepositoryResource(location=str(shared_repo_dir)),
        "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                     password=pg.password, databases="ragqa"),
        "redis": RedisResource(host=stack_env["RAG_REDIS_HOST"],
                               port=int(stack_env["RAG_REDIS_PORT"]),
                               password=stack_env["RAG_REDIS_PASSWORD"]),
        "milvus": MilvusResource(uri=stack_env["RAG_MILVUS_URI"],
                                 collections="ministry_text,ministry_images"),
        "minio": MinioResource(endpoint=stack_env["RAG_S3_ENDPOINT"],
                               access_key=stack_env["RAG_S3_ACCESS_KEY"],
                               secret_key=stack_env["RAG_S3_SECRET_KEY"]),
    }


@pytest.fixture(scope="session")
def s3(stack_env):
    import boto3

    return boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                        aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                        aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                        region_name="us-east-1")


def buckets(s3) -> set[str]:
    return {b["Name"] for b in s3.list_buckets()["Buckets"]}


@pytest.fixture(scope="module")
def backed_up(resources):
    """Verified backups of PostgreSQL (ragqa), Redis and MinIO, taken by the real assets once
    for the module (the tests only read them)."""
    instance = dg.DagsterInstance.ephemeral()
    for assets, key in (([pg_defs.postgres_backup, pg_defs.postgres_backup_verified], DAY),
                        ([redis_defs.redis_backup, redis_defs.redis_backup_verified], HOUR),
                        ([minio_defs.minio_backup, minio_defs.minio_backup_verified], DAY),
                        ([milvus_defs.milvus_backup, milvus_defs.milvus_backup_verified], DAY)):
        assert dg.materialize(assets, partition_key=key, instance=instance,
                              resources=resources).success
    return instance


def run_restore_all(resources, instance, **config):
    return recovery.restore_all_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_all_stores": recovery.RestoreAllConfig(**config)}),
        resources=resources, instance=instance, raise_on_error=False)


def test_dry_run_reports_the_chosen_set_and_its_spread(resources, backed_up, repo):
    result = run_restore_all(resources, backed_up, dry_run=True)
    assert result.success
    out = result.output_for_node("restore_all_stores")
    assert out["chosen"] == {"postgres": DAY, "redis": HOUR, "milvus": DAY, "minio": DAY}
    points = [repo.get(store, key).manifest.started_at
              for store, key in (("postgres", DAY), ("redis", HOUR), ("minio", DAY),
                                 ("milvus", DAY))]
    assert out["spread_s"] == pytest.approx((max(points) - min(points)).total_seconds())
    assert "restored" not in out


def test_a_point_before_every_backup_is_refused(resources, backed_up):
    before = (utcnow() - timedelta(days=2)).isoformat()
    result = run_restore_all(resources, backed_up, point_in_time=before)
    assert not result.success
    assert "no verified backup at or before" in str(
        result.failure_data_for_node("restore_all_stores").error)


def test_restore_all_into_scratch_targets(pg, s3, resources, backed_up, repo, tmp_path):
    databases_before, buckets_before = pgutil.databases(pg), buckets(s3)
    result = run_restore_all(resources, backed_up, scratch_dir=str(tmp_path / "scratch"))
    assert result.success, result.failure_data_for_node("restore_all_stores")
    restored = result.output_for_node("restore_all_stores")["restored"]
    created = pgutil.databases(pg) - databases_before
    try:
        assert created == {restored["postgres"]["target"]}
        [scratch_db] = created
        assert pgutil.execute(pg, scratch_db, "SELECT count(*) FROM documents") == \
            pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")
        assert restored["postgres"]["matches_manifest"]
        rdb = Path(restored["redis"]["target"])
        assert rdb.name == "dump.rdb" and rdb.stat().st_size > 0
        assert restored["redis"]["keys"] == repo.get("redis", HOUR).manifest.fingerprint["keys"]
        assert restored["redis"]["matches_manifest"]
        scratch_buckets = buckets(s3) - buckets_before
        assert scratch_buckets == set(restored["minio"]["target"].split(", "))
        assert restored["minio"]["matches_manifest"] and restored["minio"]["buckets"] == 2
        assert restored["milvus"]["matches_manifest"] and restored["milvus"]["collections"] == 2
        for bucket in scratch_buckets:
            source = bucket.split("-pit-")[0]
            assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == \
                s3.list_objects_v2(Bucket=source)["KeyCount"]
    finally:
        if "milvus" in restored:
            targets = restored["milvus"]["target"].split(", ")
            recovery.drop_collections(resources["milvus"], recovery.Restored(
                "milvus", "", "", utcnow(), "", 0, True, handle=dict(zip(targets, targets))))
        for name in created:
            pgutil.drop_database(pg, name)
        for bucket in buckets(s3) - buckets_before:
            recovery.remove_buckets(resources["minio"], recovery.Restored(
                "minio", "", "", utcnow(), "", 0, True, handle={bucket: bucket}))


def test_production_needs_every_confirmation(pg, resources, backed_up):
    before = pgutil.databases(pg)
    result = run_restore_all(resources, backed_up, into_production=True, stores=["postgres"])
    assert not result.success
    assert "set postgres_confirm to 'ragqa'" in str(
        result.failure_data_for_node("restore_all_stores").error)
    result = run_restore_all(resources, backed_up, into_production=True, stores=["redis"])
    assert "set redis_confirm to '127.0.0.1:" in str(
        result.failure_data_for_node("restore_all_stores").error)
    result = run_restore_all(resources, backed_up, into_production=True, stores=["minio"])
    assert "set minio_confirm to 'documents,models'" in str(
        result.failure_data_for_node("restore_all_stores").error)
    result = run_restore_all(resources, backed_up, into_production=True, stores=["milvus"])
    assert "set milvus_confirm to 'ministry_images,ministry_text'" in str(
        result.failure_data_for_node("restore_all_stores").error)
    assert pgutil.databases(pg) == before


def test_restore_drill_records_restore_times_and_leaves_nothing_behind(pg, s3, resources,
                                                                       backed_up):
    before, buckets_before = pgutil.databases(pg), buckets(s3)
    result = dg.materialize([recovery.restore_drill], instance=backed_up, resources=resources)
    assert result.success
    [mat] = result.asset_materializations_for_node("restore_drill")
    meta = mat.metadata
    assert meta["postgres_restore_s"].value > 0 and meta["redis_restore_s"].value > 0
    assert meta["consistent"].value is True
    assert meta["postgres_rows"].value > 0 and meta["redis_keys"].value > 0
    assert meta["minio_restore_s"].value > 0 and meta["minio_objects"].value > 0
    assert meta["objects_missing"].value == 0
    assert meta["milvus_restore_s"].value > 0 and meta["milvus_rows"].value > 0
    assert meta["vectors_without_document"].value == 0
    assert pgutil.databases(pg) == before and buckets(s3) == buckets_before
