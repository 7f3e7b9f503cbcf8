"""Faults: damaged records stay contained to their partition, repository outages and a full disk
are first-class errors, and what an interrupted backup leaves behind is collected.

Real stores: PostgreSQL and the stack's S3 server, reached through a TCP proxy that the test
cuts (the S3 server keeps its data in memory and must not be restarted), and a small tmpfs that
fills up.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import boto3
import dagster as dg
import pytest

from rag_backup.defs import automation, common
from rag_backup.defs import minio as minio_defs
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs import redis as redis_defs
from rag_backup.defs.resources import (
    AlertResource,
    AutomationResource,
    BackupRepositoryResource,
    PostgresResource,
)
from rag_backup.errors import DamagedBackup
from rag_backup.repository import BackupOutcome, BackupRepository, Verification, backends
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil
from rag_backup_tests.receivers import webhook_server
from rag_backup_tests.tcpproxy import TcpProxy

STACK_SERVICES = ("postgres", "s3")
DAY = timedelta(days=1)
FAULT_DB = "faultdb"
FAULT_DB_MIB = 12  # random (incompressible) bytes: its dump spans several 5 MiB parts


def days_ago(n: int) -> str:
    return (utcnow() - n * DAY).strftime("%Y-%m-%d")


def fake_backup(repo: BackupRepository, store: str, partition: str, payload: bytes = b"x",
                verified: bool = True) -> str:
    """A committed (and verified) backup record: the sensors and retention read only these."""
    with repo.begin(store, partition, "t") as pending:
        with pending.artifact("data") as out:
            out.write(payload)
        manifest = pending.commit(BackupOutcome({}, {}, "x"))
    if verified:
        repo.record_verification(store, partition,
                                 Verification(manifest.backup_id, True, utcnow(), "t"))
    return manifest.backup_id


def truncate(repo: BackupRepository, key: str) -> str:
    raw = repo.backend.read_bytes(key)
    repo.backend.write_bytes(key, raw[: len(raw) // 3])
    return repo.backend.location(key)


def events(result, event_type: dg.DagsterEventType) -> list:
    return [e for e in result.all_events if e.event_type == event_type]


def error_chain(error) -> list:
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause
    return chain


@pytest.fixture
def hooks():
    with webhook_server() as (url, received):
        yield AlertResource(webhook_url=url), received


# -- damaged records ----------------------------------------------------------------------------

def test_a_damaged_manifest_or_verification_is_contained_to_its_partition(repo, repo_dir):
    good, bad_manifest, bad_verification, old_bad = days_ago(4), days_ago(3), days_ago(2), \
        days_ago(40)
    good_id = fake_backup(repo, "postgres", good, b"the good backup")
    for key in (bad_manifest, bad_verification, old_bad):
        fake_backup(repo, "postgres", key)
    manifest_file = truncate(repo, f"postgres/{bad_manifest}/manifest.json")
    truncate(repo, f"postgres/{old_bad}/manifest.json")
    repo.backend.write_bytes(f"postgres/{bad_verification}/verification.json", b'{"ok": tru')

    # listed as DAMAGED with the file and the parse error; every other backup keeps working
    damaged = {d.partition_key: d for d in repo.damaged("postgres")}
    assert set(damaged) == {bad_manifest, bad_verification, old_bad}
    assert damaged[bad_manifest].file == manifest_file
    assert damaged[bad_manifest].error.startswith("JSONDecodeError: ")
    assert damaged[bad_verification].file.endswith(f"{bad_verification}/verification.json")
    latest = repo.resolve("postgres", "latest")
    assert latest.partition_key == good and latest.backup_id == good_id
    chunks: list[bytes] = []
    repo.stream_artifact(latest, latest.manifest.artifacts[0], chunks.append)
    assert b"".join(chunks) == b"the good backup"

    # asked for by key: an error naming the file and the parse error, through the restore job
    result = pg_defs.restore_postgres_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_postgres": pg_defs.RestorePostgresConfig(
            partition_key=bad_manifest)}),
        resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                   "postgres": PostgresResource(host="127.0.0.1", port=1, user="nobody")},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    [failure] = events(result, dg.DagsterEventType.STEP_FAILURE)
    message = automation.root_message(failure.step_failure_data.error)
    assert f"{bad_manifest} is DAMAGED" in message and manifest_file in message
    assert "JSONDecodeError" in message and "re-run postgres_backup" in message
    with pytest.raises(DamagedBackup, match="verification record .* cannot be read"):
        repo.resolve("postgres", bad_verification)

    # retention keeps and reports every damaged backup; it deletes nothing of theirs
    instance = dg.DagsterInstance.ephemeral()
    resources = {"repository": BackupRepositoryResource(location=str(repo_dir))}
    def files() -> list:  # the backups' files (retention's lease comes and goes beside them)
        return sorted(p.relative_to(repo_dir) for p in repo_dir.rglob("*")
                      if p.relative_to(repo_dir).parts[0] != "leases")

    before = files()
    kept = dg.materialize([pg_defs.postgres_retention], partition_key=days_ago(1),
                          resources=resources, instance=instance)
    meta = kept.asset_materializations_for_node("postgres_retention")[0].metadata
    assert meta["backups_damaged"].value == 3 and meta["backups_deleted"].value == 0
    table = meta["decisions"].value
    assert table.count("keep (DAMAGED)") == 3 and manifest_file in table
    assert "left for an operator" in table
    assert files() == before

    # ... and removes one only past the window, when told to, saying so
    removed = dg.materialize(
        [pg_defs.postgres_retention], partition_key=days_ago(1), resources=resources,
        instance=instance, run_config=dg.RunConfig(ops={"postgres_retention": common.
                                                        RetentionConfig(
                                                            delete_damaged_past_window=True)}))
    meta = removed.asset_materializations_for_node("postgres_retention")[0].metadata
    assert meta["backups_deleted"].value == 1 and meta["backups_damaged"].value == 3
    tomb = repo.tombstone("postgres", old_bad)
    assert "DAMAGED" in tomb.reason and "removed (delete_damaged_past_window" in tomb.reason
    assert {d.partition_key for d in repo.damaged("postgres")} == {bad_manifest,
                                                                   bad_verification}


def test_catchup_retakes_a_damaged_partition_in_its_window(repo, repo_dir):
    now = utcnow()
    hours = [(now - timedelta(hours=n)).strftime("%Y-%m-%d-%H:00") for n in range(1, 4)]
    for key in hours:
        fake_backup(repo, "redis", key)
    truncate(repo, f"redis/{hours[1]}/manifest.json")
    repo.backend.write_bytes(f"redis/{hours[2]}/verification.json", b"")
    sensor = automation.build_catchup_sensor(redis_defs.POLICY)
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        cursor=json.dumps({"since": (now - timedelta(hours=5)).isoformat()}),
        resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                   "automation": AutomationResource(catchup_window_hours=4)})
    requests = {r.partition_key: r for r in sensor(context)}
    assert hours[1] in requests and hours[2] in requests and hours[0] not in requests
    assert requests[hours[1]].tags["rag_backup/retake"] == "damaged manifest"
    assert requests[hours[2]].tags["rag_backup/retake"] == "damaged verification record"


def test_the_rpo_sensor_checks_every_store_and_alerts_once_per_damaged_file(repo, repo_dir,
                                                                              hooks):
    resource, received = hooks
    fresh = utcnow().strftime("%Y-%m-%d-%H:00")
    fake_backup(repo, "redis", fresh)
    fake_backup(repo, "redis", (utcnow() - timedelta(hours=2)).strftime("%Y-%m-%d-%H:00"))
    damaged_file = truncate(
        repo, f"redis/{(utcnow() - timedelta(hours=2)):%Y-%m-%d-%H:00}/manifest.json")
    # the postgres area fails to read: a symlink loop (ELOOP), a real filesystem fault
    loop = repo_dir / "postgres" / days_ago(1)
    loop.parent.mkdir(parents=True)
    loop.symlink_to(loop)
    sensor = automation.build_rpo_sensor([pg_defs.POLICY, redis_defs.POLICY, minio_defs.POLICY])

    def tick(cursor):
        context = dg.build_sensor_context(
            cursor=cursor, instance=dg.DagsterInstance.ephemeral(),
            resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                       "automation": AutomationResource(), "alerts": resource})
        return sensor(context), context.cursor

    result, cursor = tick(None)
    summary = result.skip_message
    assert "postgres: NOT CHECKED (RepositoryError: backup repository error: read" in summary
    assert "redis: ok (" in summary and "1 DAMAGED" in summary
    assert "minio: BREACHED (no verified backup)" in summary
    alerts = {(h["json"]["kind"], h["json"]["store"]): h["json"] for h in received}
    assert set(alerts) == {("rpo_check_failed", "postgres"), ("backup_damaged", "redis"),
                           ("rpo_breached", "minio")}
    damage = alerts[("backup_damaged", "redis")]
    assert damage["details"]["file"] == damaged_file
    assert damage["details"]["error"].startswith("JSONDecodeError")
    assert "Too many levels of symbolic links" in alerts[("rpo_check_failed",
                                                          "postgres")]["text"]

    result, cursor = tick(cursor)  # nothing changed: nothing sent again
    assert len(received) == 3
    loop.unlink()
    result, cursor = tick(cursor)  # postgres checkable again: its breach is alerted
    assert [(h["json"]["kind"], h["json"]["store"]) for h in received[3:]] == [
        ("rpo_breached", "postgres")]
    assert json.loads(cursor)["postgres"]["check_failed"] is None


# -- a PostgreSQL database whose dump is a few MiB of incompressible data ----------------------

@pytest.fixture(scope="module")
def fault_db(pg):
    conn = pgutil.admin(pg)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {FAULT_DB}")
        cur.execute(f"CREATE DATABASE {FAULT_DB}")
    conn.close()
    pgutil.execute(pg, FAULT_DB, f"""
        CREATE TABLE noise (id int PRIMARY KEY, data bytea NOT NULL);
        INSERT INTO noise SELECT g, decode(string_agg(md5(random()::text || g || s), ''), 'hex')
        FROM generate_series(1, {FAULT_DB_MIB * 1024}) g, generate_series(1, 64) s
        GROUP BY g""")
    yield FAULT_DB
    conn = pgutil.admin(pg)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {FAULT_DB} WITH (FORCE)")
    conn.close()


def pg_resource(pg) -> PostgresResource:
    return PostgresResource(host=pg.host, port=pg.port, user=pg.user, password=pg.password,
                            databases=FAULT_DB)


# -- disk full ----------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs to fill up (needs root or CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=True)


def test_a_full_disk_names_the_store_partition_and_path(pg, fault_db, small_disk):
    partition = days_ago(0)
    result = dg.materialize(
        [pg_defs.postgres_backup], partition_key=partition, raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"repository": BackupRepositoryResource(location=str(small_disk)),
                   "postgres": pg_resource(pg)})
    assert not result.success
    assert not events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY)  # not transient
    [failure] = events(result, dg.DagsterEventType.STEP_FAILURE)
    message = automation.root_message(failure.step_failure_data.error)  # what alerts carry
    assert message.startswith("rag_backup.errors.RepositoryError: backup repository disk full: "
                              f"write {small_disk}/postgres/{partition}/")
    assert f"/{FAULT_DB}.dump.zst (store postgres, partition {partition}) failed: [Errno 28] " \
           "No space left on device. Free space" in message
    # nothing committed, nothing left: the partial file and the in-progress marker are gone
    assert list((small_disk / "postgres" / partition).iterdir()) == []
    assert os.statvfs(small_disk).f_bfree == os.statvfs(small_disk).f_blocks


# -- the S3 repository goes away mid-backup ------------------------------------------------------

@pytest.fixture
def s3_through_proxy(stack_env, monkeypatch):
    endpoint = stack_env["RAG_S3_ENDPOINT"]
    host, port = endpoint.removeprefix("http://").split(":")
    direct = boto3.client("s3", endpoint_url=endpoint,
                          aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                          aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                          region_name="us-east-1")
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    direct.create_bucket(Bucket=bucket)
    # small parts (S3's minimum) so the dump is a multipart upload; few botocore attempts and
    # no wait between Dagster retries, so the test is quick
    monkeypatch.setattr(backends, "S3_PART_SIZE", 5 * 1024 * 1024)
    monkeypatch.setattr(backends, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(common, "UNREACHABLE_WAIT_S", 0)
    monkeypatch.setattr(common, "UNREACHABLE_RETRIES", 1)
    with TcpProxy(host, int(port)) as proxy:
        resource = BackupRepositoryResource(
            location=f"s3://{bucket}/rag", s3_endpoint=proxy.url,
            s3_access_key=stack_env["RAG_S3_ACCESS_KEY"],
            s3_secret_key=stack_env["RAG_S3_SECRET_KEY"])
        yield proxy, resource, direct, bucket


def test_s3_cut_mid_backup_is_a_retried_repository_error_and_retention_aborts_the_upload(
        pg, fault_db, s3_through_proxy):
    proxy, repository, direct, bucket = s3_through_proxy
    partition = days_ago(0)
    proxy.cut_after(7 * 1024 * 1024)  # during the second 5 MiB part of the dump
    result = dg.materialize(
        [pg_defs.postgres_backup], partition_key=partition, raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"repository": repository, "postgres": pg_resource(pg)})
    assert not result.success and proxy.cuts == 1

    # the run asked for a retry, because of the repository error (not a clean-up's error)
    [retry] = events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    chain = error_chain(retry.event_specific_data.error)
    ours = [e for e in chain if e.cls_name == "RepositoryUnavailable"]
    assert ours, [e.cls_name for e in chain]
    text = ours[0].message
    assert f"backup repository unreachable: upload part 2 of s3://{bucket}/rag/postgres/" \
           f"{partition}/" in text
    assert f"/{FAULT_DB}.dump.zst at {proxy.url} (store postgres, partition {partition}) " \
           "failed: " in text
    assert "clean-up after this error failed too (aborting the multipart upload" in text
    assert not any("EndpointConnectionError" in e.cls_name for e in chain[:chain.index(
        ours[0])])
    # the retry found the repository still away; the run failed with that, saying where
    [failure] = events(result, dg.DagsterEventType.STEP_FAILURE)
    assert f"backup repository s3://{bucket} at {proxy.url} is not usable" in \
        automation.root_message(failure.step_failure_data.error)

    # the incomplete multipart upload stayed behind; nothing was committed
    uploads = direct.list_multipart_uploads(Bucket=bucket, Prefix="rag/postgres/").get(
        "Uploads", [])
    assert [u["Key"].rsplit("/", 1)[-1] for u in uploads] == [f"{FAULT_DB}.dump.zst"]
    assert "Contents" not in direct.list_objects_v2(Bucket=bucket,
                                                    Prefix=f"rag/postgres/{partition}/manifest")

    # the repository is back: the next retention aborts it (stale after a few ms here)
    proxy.heal()
    collected = dg.materialize(
        [pg_defs.postgres_retention], partition_key=partition,
        instance=dg.DagsterInstance.ephemeral(), resources={"repository": repository},
        run_config=dg.RunConfig(ops={"postgres_retention": common.RetentionConfig(
            stale_after_hours=0.0001)}))
    meta = collected.asset_materializations_for_node("postgres_retention")[0].metadata
    assert meta["stale_writes_collected"].value >= 1
    assert f"multipart upload s3://{bucket}/rag/postgres/{partition}/" in \
        meta["stale_writes"].value
    assert direct.list_multipart_uploads(Bucket=bucket, Prefix="rag/").get("Uploads", []) == []
    assert "Contents" not in direct.list_objects_v2(Bucket=bucket, Prefix="rag/postgres/")


def test_s3_cut_mid_minio_backup_is_retried_and_what_it_left_is_collected(
        stack_env, s3_through_proxy):
    """The repository (on S3, through the proxy) goes away while a MinIO backup streams a large
    object into a temporary blob: the failure is the repository's own retried error (not the
    clean-up's), nothing is committed, and the next retention collects the multipart upload and
    the temporary objects left behind once the repository is back."""
    from rag_backup.defs.resources import MinioResource
    from rag_backup.engines import minio as minio_engine

    proxy, repository, direct, repo_bucket = s3_through_proxy
    source = f"src-{uuid.uuid4().hex[:10]}"
    direct.create_bucket(Bucket=source)
    direct.put_object(Bucket=source, Key="small.txt", Body=b"hello" * 100)
    direct.put_object(Bucket=source, Key="large.bin", Body=os.urandom(12 * 1024 * 1024))
    minio = MinioResource(endpoint=stack_env["RAG_S3_ENDPOINT"],
                          access_key=stack_env["RAG_S3_ACCESS_KEY"],
                          secret_key=stack_env["RAG_S3_SECRET_KEY"], buckets=source)
    partition = days_ago(0)
    proxy.cut_after(7 * 1024 * 1024)  # inside the large object's second part
    result = dg.materialize(
        [minio_defs.minio_backup], partition_key=partition, raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"repository": repository, "minio": minio})
    assert not result.success and proxy.cuts == 1
    [retry] = events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    chain = error_chain(retry.event_specific_data.error)
    ours = [e for e in chain if e.cls_name == "RepositoryUnavailable"]
    assert ours, [e.cls_name for e in chain]
    assert f"s3://{repo_bucket}/rag/" in ours[0].message
    assert f"at {proxy.url}" in ours[0].message
    [failure] = events(result, dg.DagsterEventType.STEP_FAILURE)
    assert f"s3://{repo_bucket} at {proxy.url}" in automation.root_message(
        failure.step_failure_data.error)
    assert "Contents" not in direct.list_objects_v2(
        Bucket=repo_bucket, Prefix=f"rag/minio/{partition}/manifest")
    left = direct.list_multipart_uploads(Bucket=repo_bucket, Prefix="rag/").get("Uploads", [])
    assert [u["Key"] for u in left if minio_engine.TMP_PREFIX in u["Key"]], left

    proxy.heal()
    collected = dg.materialize(
        [minio_defs.minio_retention], partition_key=partition,
        instance=dg.DagsterInstance.ephemeral(),
        resources={"repository": repository, "minio": minio},
        run_config=dg.RunConfig(ops={"minio_retention": common.RetentionConfig(
            stale_after_hours=0.0001)}))
    meta = collected.asset_materializations_for_node("minio_retention")[0].metadata
    assert meta["stale_writes_collected"].value >= 1
    assert direct.list_multipart_uploads(Bucket=repo_bucket, Prefix="rag/").get(
        "Uploads", []) == []
    leftovers = direct.list_objects_v2(Bucket=repo_bucket,
                                       Prefix=f"rag/{minio_engine.TMP_PREFIX}/")
    assert "Contents" not in leftovers
