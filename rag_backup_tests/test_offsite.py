"""The offsite copy (issue 14, parts 3 and 4) against the session's real S3 server and stores:
an incremental copy checked by sha256 (a corrupted offsite file is found and repaired); a copy
killed mid-way resumes without copying again what was complete; the primary repository lost,
then restore-all from the offsite copy gives the same data; Object Lock: a locked object
cannot be deleted by version id nor overwritten before its date, and offsite retention keeps
it; an unreachable offsite fails its own step and alerts while the backup succeeds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
import zstandard

from rag_backup.defs import automation
from rag_backup.defs import offsite as offsite_defs
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs.resources import (
    AlertResource,
    BackupRepositoryResource,
    PostgresResource,
)
from rag_backup.errors import IntegrityError
from rag_backup.repository import (
    BackupOutcome,
    BackupRepository,
    FilesystemBackend,
    Verification,
)
from rag_backup.repository import offsite as offsite_module
from rag_backup.repository.crypto import Identity
from rag_backup.repository.locking import LockedS3Backend
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.offsite import (
    apply_offsite_retention,
    choose_repository,
    copy_backup,
    copy_file,
    open_offsite,
    read_record,
)
from rag_backup_tests import pgutil
from rag_backup_tests.receivers import free_port, webhook_server
from rag_backup_tests.tcpproxy import TcpProxy

STACK_SERVICES = ("postgres", "redis", "s3")
CLI = str(Path(sys.executable).parent / "rag-backup")
DAY = "2026-11-20"


def synthetic_backup(repo: BackupRepository, store: str, partition: str, files: int,
                     size: int, verified: bool = True) -> str:
    """A committed (and verified) backup of ``files`` random artifacts of ``size`` bytes."""
    with repo.begin(store, partition, "t") as pending:
        for n in range(files):
            with pending.artifact(f"part-{n:04d}.bin") as out:
                out.write(os.urandom(size))
        manifest = pending.commit(BackupOutcome({}, {}, "x"))
    if verified:
        repo.record_verification(store, partition,
                                 Verification(manifest.backup_id, True, utcnow(), "t"))
    return manifest.backup_id


@pytest.fixture
def bucket(s3_client):
    name = f"offsite-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/site-b"


def offsite_of(stack_env, bucket: str) -> BackupRepository:
    return open_offsite(s3_url(bucket), s3_endpoint=stack_env["RAG_S3_ENDPOINT"],
                        s3_access_key=stack_env["RAG_S3_ACCESS_KEY"],
                        s3_secret_key=stack_env["RAG_S3_SECRET_KEY"])


def test_copy_is_incremental_verified_and_repairs_a_corrupted_file(tmp_path, stack_env, bucket,
                                                                    s3_client):
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    backup_id = synthetic_backup(primary, "milvus", DAY, files=6, size=70_000)
    offsite = offsite_of(stack_env, bucket)

    first = copy_backup(primary, offsite, "milvus", DAY, workers=4)
    assert (first.files_copied, first.files_skipped) == (8, 0)  # 6 artifacts + 2 records
    assert first.bytes_copied > 6 * 70_000
    copied = offsite.get("milvus", DAY)
    assert copied.backup_id == backup_id and copied.verified
    record = read_record(offsite, "milvus", DAY)
    assert record.backup_id == backup_id and record.files == 8
    for key, sha in record.sha256.items():  # the stored bytes, equal on both sides
        import hashlib
        assert hashlib.sha256(primary.storage.read_bytes(key)).hexdigest() == sha
    assert "secret" not in json.dumps(record.__dict__).lower()

    again = copy_backup(primary, offsite, "milvus", DAY, workers=4)
    assert (again.files_copied, again.files_skipped, again.files_repaired) == (2, 6, 0)

    # corrupted offsite (same size, other bytes): found by sha256 and copied again
    victim = f"milvus/{DAY}/{backup_id}/part-0003.bin"
    good = offsite.storage.read_bytes(victim)
    s3_client.put_object(Bucket=bucket, Key=f"site-b/{victim}",
                         Body=bytes([good[0] ^ 0xFF]) + good[1:])
    repaired = copy_backup(primary, offsite, "milvus", DAY, workers=4)
    assert repaired.files_repaired == 1 and repaired.repaired == [victim]
    assert offsite.storage.read_bytes(victim) == good


def test_a_copy_damaged_on_the_way_is_found_and_nothing_is_recorded(tmp_path, stack_env,
                                                                     bucket):
    """The S3 server stores what reached it; the copy compares the ETag it returns (the MD5
    the server took) with the MD5 of what was sent, and reads back only on a difference."""
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    marker = uuid.uuid4().hex.encode()
    with primary.begin("redis", DAY, "t") as pending:
        with pending.artifact("dump.rdb") as out:
            out.write(os.urandom(30_000) + marker + os.urandom(30_000))
        manifest = pending.commit(BackupOutcome({}, {}, "x"))
    primary.record_verification("redis", DAY, Verification(manifest.backup_id, True, utcnow(),
                                                           "t"))
    host, port = stack_env["RAG_S3_ENDPOINT"].rsplit("/", 1)[1].split(":")
    with TcpProxy(host, int(port)) as proxy:
        offsite = open_offsite(s3_url(bucket), s3_endpoint=proxy.url,
                               s3_access_key=stack_env["RAG_S3_ACCESS_KEY"],
                               s3_secret_key=stack_env["RAG_S3_SECRET_KEY"])
        proxy.corrupt_once(marker, marker[::-1])
        with pytest.raises(IntegrityError,
                           match=r"dump\.rdb (is not what was sent|reads back with sha256)"):
            copy_backup(primary, offsite, "redis", DAY, workers=1)
        assert proxy.corrupted == 1
        assert offsite.get("redis", DAY) is None
        assert read_record(offsite, "redis", DAY) is None
        # undamaged, the same copy goes through, confirmed by the ETags (no read-back needed)
        report = copy_backup(primary, offsite, "redis", DAY, workers=1)
        assert (report.files_copied, report.files_repaired) == (3, 1)  # the damaged one again
        assert offsite.get("redis", DAY) is not None and proxy.corrupted == 1
        artifact = f"redis/{DAY}/{manifest.backup_id}/dump.rdb"
        assert copy_file(primary.storage, offsite.storage, artifact)[2] is True
    # a directory confirms nothing by itself: its copies are read back
    assert copy_file(primary.storage, FilesystemBackend(tmp_path / "elsewhere"), artifact)[2] \
        is False


def minio_like_backup(repo: BackupRepository, partition: str, contents: list[bytes]) -> str:
    """A committed, verified backup whose blobs are ``contents`` (as MinIO's engine stores)."""
    with repo.begin("minio", partition, "t") as pending:
        writer = repo.blobs.writer(pending.backup_id)
        for data in contents:
            writer.put([data], len(data))
        with pending.artifact("snapshot.jsonl") as out:
            out.write(b"{}")
        manifest = pending.commit(BackupOutcome({}, {}, "x"))
    repo.record_verification("minio", partition, Verification(manifest.backup_id, True,
                                                              utcnow(), "t"))
    return manifest.backup_id


def test_blobs_already_synced_are_not_listed_again_until_the_weekly_full_listing(
        tmp_path, stack_env, bucket, s3_client, monkeypatch):
    monkeypatch.setattr(offsite_module, "BLOB_SYNC_SKEW", timedelta(0))
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    first = [os.urandom(3000) for _ in range(30)]
    minio_like_backup(primary, "2026-11-19", first)
    old = time.time() - 3600  # these blobs are an hour old
    for path in (tmp_path / "primary" / "objectstore").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    offsite = offsite_of(stack_env, bucket)

    report = copy_backup(primary, offsite, "minio", "2026-11-19", workers=4)
    assert report.blobs_copied == 30
    sync = json.loads(offsite.storage.read_bytes(offsite_module.BLOB_SYNC_KEY))
    assert sync["offsite_listed"] is True and sync["blobs"] == 30

    new = [os.urandom(3000) for _ in range(5)]
    minio_like_backup(primary, DAY, first[:10] + new)  # 10 reused, rewritten: fresh mtimes
    report = copy_backup(primary, offsite, "minio", DAY, workers=4)
    sync = json.loads(offsite.storage.read_bytes(offsite_module.BLOB_SYNC_KEY))
    assert sync["offsite_listed"] is False  # asked about what is new only
    assert sync["checked"] == 15 and report.blobs_copied == 5 and report.blobs_skipped == 30
    assert offsite.storage.size(offsite_module.BLOB_SYNC_KEY) is not None

    # a blob removed offsite by hand is not seen by the nightly check, but by the weekly listing
    sha = hashlib.sha256(first[20]).hexdigest()
    victim = f"objectstore/blobs/{sha[:2]}/{sha}"
    s3_client.delete_object(Bucket=bucket, Key=f"site-b/{victim}")
    again = copy_backup(primary, offsite, "minio", DAY, workers=4)
    assert again.blobs_copied == 0 and offsite.storage.size(victim) is None
    sync = json.loads(offsite.storage.read_bytes(offsite_module.BLOB_SYNC_KEY))
    sync["full_listing_at"] = (utcnow() - timedelta(days=8)).isoformat()
    offsite.storage.write_bytes(offsite_module.BLOB_SYNC_KEY, json.dumps(sync).encode())
    weekly = copy_backup(primary, offsite, "minio", DAY, workers=4)
    assert weekly.blobs_copied == 1 and offsite.storage.size(victim) == 3000
    assert json.loads(offsite.storage.read_bytes(offsite_module.BLOB_SYNC_KEY))[
        "offsite_listed"] is True


COPY_SCRIPT = """
import sys
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.offsite import copy_backup, open_offsite
primary = BackupRepository(FilesystemBackend({primary!r}))
offsite = open_offsite({url!r}, s3_endpoint={endpoint!r}, s3_access_key="k", s3_secret_key="s")
copy_backup(primary, offsite, "postgres", {day!r}, workers=1)
"""


def test_a_killed_copy_resumes_and_copies_nothing_twice(tmp_path, stack_env, bucket, s3_client):
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    backup_id = synthetic_backup(primary, "postgres", DAY, files=150, size=4096)
    script = textwrap.dedent(COPY_SCRIPT).format(
        primary=str(tmp_path / "primary"), url=s3_url(bucket),
        endpoint=stack_env["RAG_S3_ENDPOINT"], day=DAY)
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    prefix = f"site-b/postgres/{DAY}/{backup_id}/"
    deadline = time.monotonic() + 60
    while s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) < 20:
        assert child.poll() is None, "the copy finished before it could be killed"
        assert time.monotonic() < deadline, "the copy never started"
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    done_before = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"]
    assert 20 <= done_before < 150
    offsite = offsite_of(stack_env, bucket)
    assert offsite.get("postgres", DAY) is None  # not committed offsite: no manifest yet

    resumed = copy_backup(primary, offsite, "postgres", DAY, workers=4)
    # what was complete is skipped; at most the file being written when killed is copied again
    assert resumed.files_skipped >= done_before - 1
    assert resumed.files_copied - 2 == 150 - resumed.files_skipped  # + the two records
    assert offsite.get("postgres", DAY).verified
    assert read_record(offsite, "postgres", DAY).files == 152


def test_object_lock_keeps_what_was_written_offsite(tmp_path, stack_env, s3_client):
    bucket = f"locked-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    backup_id = synthetic_backup(primary, "redis", "2026-11-20-05:00", files=2, size=1000)
    offsite = offsite_of(stack_env, bucket)
    assert isinstance(offsite.storage, LockedS3Backend)
    report = copy_backup(primary, offsite, "redis", "2026-11-20-05:00")
    assert report.locked
    key = f"site-b/redis/2026-11-20-05:00/{backup_id}/part-0000.bin"
    head = s3_client.head_object(Bucket=bucket, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] > utcnow() + timedelta(days=2)  # 2 x 1 day window
    version, original = head["VersionId"], s3_client.get_object(Bucket=bucket, Key=key)[
        "Body"].read()
    # deleting the locked version is refused
    with pytest.raises(s3_client.exceptions.ClientError, match="AccessDenied"):
        s3_client.delete_object(Bucket=bucket, Key=key, VersionId=version)
    # an overwrite and a delete without a version id leave the locked version as it was
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"ransom")
    s3_client.delete_object(Bucket=bucket, Key=key)
    assert s3_client.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read() == \
        original
    # a multipart (large) write is locked too
    with offsite.storage.open_write("redis/big") as out:
        out.write(os.urandom(17 * 1024 * 1024))
    big = s3_client.head_object(Bucket=bucket, Key="site-b/redis/big")
    with pytest.raises(s3_client.exceptions.ClientError, match="AccessDenied"):
        s3_client.delete_object(Bucket=bucket, Key="site-b/redis/big",
                                VersionId=big["VersionId"])
    # offsite retention past the window: the backup is expired but locked: kept, reported
    synthetic_backup(primary, "redis", "2026-11-20-06:00", files=1, size=10)
    copy_backup(primary, offsite, "redis", "2026-11-20-06:00")  # the newest: always kept
    s3_client.delete_object(Bucket=bucket, Key="site-b/redis/big")
    decision, newest = apply_offsite_retention(offsite, "redis", now=utcnow() + timedelta(days=3),
                                               window=timedelta(days=2))
    assert not newest.delete
    assert decision.delete and not decision.deleted and decision.locked_until is not None
    assert "locked until" in decision.reason
    assert s3_client.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read() == \
        original


def test_offsite_retention_deletes_past_the_window_but_never_the_newest(tmp_path):
    offsite = BackupRepository(FilesystemBackend(tmp_path / "offsite"))
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    for day in ("2026-01-01", "2026-01-02"):
        synthetic_backup(primary, "milvus", day, files=1, size=10)
        copy_backup(primary, offsite, "milvus", day)
    decisions = {d.partition_key: d for d in apply_offsite_retention(
        offsite, "milvus", now=utcnow(), window=timedelta(days=14))}
    assert decisions["2026-01-01"].deleted and not decisions["2026-01-02"].delete
    assert offsite.get("milvus", "2026-01-01") is None
    assert read_record(offsite, "milvus", "2026-01-01") is None
    assert offsite.get("milvus", "2026-01-02") is not None


def test_auto_falls_back_to_the_offsite_and_says_why(tmp_path):
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    offsite = BackupRepository(FilesystemBackend(tmp_path / "offsite"))
    synthetic_backup(primary, "redis", "2026-11-20-05:00", files=1, size=10)
    copy_backup(primary, offsite, "redis", "2026-11-20-05:00")
    synthetic_backup(primary, "redis", "2026-11-20-06:00", files=1, size=10)

    def has(key):
        return lambda repo: repo.resolve("redis", key)

    chosen = choose_repository("auto", lambda: primary, lambda: offsite, has("2026-11-20-06:00"))
    assert chosen.name == "primary"
    shutil.rmtree(tmp_path / "primary" / "redis" / "2026-11-20-05:00")
    chosen = choose_repository("auto", lambda: primary, lambda: offsite, has("2026-11-20-05:00"))
    assert chosen.name == "offsite" and "BackupNotFound" in chosen.reason
    with pytest.raises(Exception, match="no backup for partition '2026-11-20-07:00'") as exc:
        choose_repository("auto", lambda: primary, lambda: offsite, has("2026-11-20-07:00"))
    assert any("offsite" in note for note in exc.value.__notes__)
    assert choose_repository("primary", lambda: primary, lambda: offsite,
                             has("2026-11-20-05:00")).name == "primary"


# -- the site lost: restore-all from the offsite copy ----------------------------------------

def cli(env, *args, timeout=600):
    done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"rag-backup {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def test_the_primary_lost_restore_all_from_the_offsite_is_identical(tmp_path, stack_env, pg,
                                                                     bucket, s3_client):
    database = f"ragqa_off_{uuid.uuid4().hex[:6]}"
    canary = f"offsite canary {uuid.uuid4().hex}"
    pgutil.create_database(pg, database, "CREATE TABLE notes (id int PRIMARY KEY, body text); "
                           f"INSERT INTO notes VALUES (1, '{canary}');")
    key = Identity.generate()  # encrypted: the offsite holds the same ciphertext
    identity_file = tmp_path / "key.txt"
    identity_file.write_text(key.encode() + "\n")
    primary_dir = tmp_path / "primary"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env = {**base, **{k: v for k, v in stack_env.items() if k.startswith("RAG_")},
           "RAG_BACKUP_REPOSITORY": str(primary_dir), "RAG_PG_DATABASES": database,
           "RAG_MINIO_BUCKETS": "models", "RAG_BACKUP_OFFSITE": s3_url(bucket),
           "RAG_OFFSITE_S3_ENDPOINT": stack_env["RAG_S3_ENDPOINT"],
           "RAG_OFFSITE_S3_ACCESS_KEY": "offsite-key", "RAG_OFFSITE_S3_SECRET_KEY": "offsite-s",
           "RAG_BACKUP_ENCRYPT_TO": str(key.recipient), "RAG_BACKUP_IDENTITY": str(identity_file)}
    env.setdefault("RAG_MILVUS_URI", "http://127.0.0.1:9")  # not restored here, never reached
    restored_db = None
    try:
        partitions = {store: json.loads(cli(env, "backup", store, "--verify", "--json").stdout)[
            "partition"] for store in ("postgres", "redis", "minio")}
        before = pgutil.plain_dump(pg, database)
        resource = BackupRepositoryResource(
            location=str(primary_dir), offsite_location=s3_url(bucket),
            offsite_s3_endpoint=stack_env["RAG_S3_ENDPOINT"], offsite_s3_access_key="k",
            offsite_s3_secret_key="s", encrypt_to=str(key.recipient),
            identity=str(identity_file))
        for store, key in partitions.items():  # the nightly job's offsite step
            [asset, _] = offsite_defs.build_offsite_assets(
                {"postgres": pg_defs.POLICY}.get(store) or _policy(store))
            result = dg.materialize([asset], partition_key=key,
                                    resources={"repository": resource})
            [event] = result.asset_materializations_for_node(f"{store}_offsite")
            assert event.metadata["files_copied"].value > 0
            if store == "minio":
                assert event.metadata["blobs_copied"].value > 0
        listed = json.loads(cli(env, "list", "--repository", "offsite", "--json").stdout)
        assert {(r["store"], r["partition"]) for r in listed} == set(partitions.items())
        stored = [o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket) for o in page.get("Contents", [])]
        assert any(k.endswith(".age") for k in stored)
        for k in stored:  # every byte offsite, and what decompressing it would give
            data = s3_client.get_object(Bucket=bucket, Key=k)["Body"].read()
            views = [data]
            if data.startswith(b"\x28\xb5\x2f\xfd"):
                views.append(zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(data)).read())
            assert not any(canary.encode() in v for v in views), k

        shutil.rmtree(primary_dir)  # the primary site is gone
        done = cli(env, "restore-all", "--at", "now", "--stores", "postgres,redis,minio",
                   "--scratch-dir", str(tmp_path / "scratch"), "--json")
        summary = json.loads(done.stdout)
        assert summary["repository"] == "offsite"
        assert "BackupNotFound" in summary["repository_reason"]
        restored = summary["restored"]
        assert all(r["matches_manifest"] for r in restored.values()), restored
        restored_db = restored["postgres"]["target"]
        assert pgutil.plain_dump(pg, restored_db).replace(restored_db, database) == before
        assert canary in before
        for bucket_name in restored["minio"]["target"].split(", "):
            original = {o["Key"]: o["Size"] for o in s3_client.list_objects_v2(
                Bucket="models").get("Contents", [])}
            copy = {o["Key"]: o["Size"] for o in s3_client.list_objects_v2(
                Bucket=bucket_name).get("Contents", [])}
            assert copy == original and copy
            some = sorted(original)[0]
            assert s3_client.get_object(Bucket=bucket_name, Key=some)["Body"].read() == \
                s3_client.get_object(Bucket="models", Key=some)["Body"].read()
            for o in s3_client.list_objects_v2(Bucket=bucket_name).get("Contents", []):
                s3_client.delete_object(Bucket=bucket_name, Key=o["Key"])
            s3_client.delete_bucket(Bucket=bucket_name)
        assert restored["redis"]["keys"] > 0
    finally:
        pgutil.drop_database(pg, database)
        if restored_db:
            pgutil.drop_database(pg, restored_db)


def _policy(store):
    from rag_backup.defs import minio, redis

    return {"redis": redis.POLICY, "minio": minio.POLICY}[store]


# -- an unreachable offsite --------------------------------------------------------------------

def test_an_unreachable_offsite_fails_its_step_and_alerts_while_the_backup_succeeds(
        tmp_path, pg, monkeypatch):
    database = f"ragqa_off_{uuid.uuid4().hex[:6]}"
    pgutil.create_database(pg, database, "CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    dead = f"http://127.0.0.1:{free_port()}"
    resources = {
        "repository": BackupRepositoryResource(
            location=str(tmp_path / "primary"), offsite_location="s3://gone/site-b",
            offsite_s3_endpoint=dead, offsite_s3_access_key="k", offsite_s3_secret_key="s"),
        "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                     password=pg.password, databases=database)}
    [copy, _] = offsite_defs.build_offsite_assets(pg_defs.POLICY)
    instance = dg.DagsterInstance.ephemeral()
    today = pg_defs.POLICY.partitions_def.get_partition_keys()[-1]
    try:
        result = dg.materialize([pg_defs.postgres_backup, pg_defs.postgres_backup_verified,
                                 copy], partition_key=today, resources=resources,
                                instance=instance, raise_on_error=False)
    finally:
        pgutil.drop_database(pg, database)
    assert not result.success
    assert result.asset_materializations_for_node("postgres_backup")
    assert result.asset_materializations_for_node("postgres_backup_verified")
    assert not result.asset_materializations_for_node("postgres_offsite")
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    assert primary.get("postgres", today).verified  # the primary backup is intact
    failure = next(e for e in result.all_events
                   if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    with webhook_server() as (url, hooks):
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor", dagster_event=failure,
            dagster_instance=instance, dagster_run=result.dagster_run,
            resources={"alerts": AlertResource(webhook_url=url)}).for_run_failure()
        automation.run_failure_alert_sensor(context)
        [hook] = hooks
    assert hook["json"]["kind"] == "offsite_failed"
    assert hook["json"]["details"]["steps"] == "postgres_offsite"
    assert "gone" in hook["json"]["details"]["error in postgres_offsite"]


def test_without_an_offsite_the_copy_is_skipped_not_passed(tmp_path):
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    synthetic_backup(primary, "postgres", DAY, files=1, size=10)
    [copy, retention] = offsite_defs.build_offsite_assets(pg_defs.POLICY)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([copy, retention], partition_key=DAY, instance=instance, resources={
        "repository": BackupRepositoryResource(location=str(tmp_path / "primary"))})
    assert result.success
    assert not result.asset_materializations_for_node("postgres_offsite")
    assert not result.asset_materializations_for_node("postgres_offsite_retention")
    logs = " ".join(e.user_message or "" for e in instance.all_logs(result.run_id))
    assert "NOT CONFIGURED" in logs


def test_the_lag_sensor_alerts_once_when_the_newest_backup_is_not_offsite(tmp_path):
    primary = BackupRepository(FilesystemBackend(tmp_path / "primary"))
    offsite = BackupRepository(FilesystemBackend(tmp_path / "offsite"))
    synthetic_backup(primary, "postgres", DAY, files=1, size=10)
    resource = BackupRepositoryResource(location=str(tmp_path / "primary"),
                                        offsite_location=str(tmp_path / "offsite"))
    sensor = offsite_defs.build_lag_sensor([pg_defs.POLICY])
    with webhook_server() as (url, hooks):
        def tick(cursor=None):
            context = dg.build_sensor_context(cursor=cursor, resources={
                "repository": resource, "alerts": AlertResource(webhook_url=url),
                "automation": automation.AutomationResource(rpo_grace_minutes=-(60 * 25))})
            result = sensor(context)
            return result, context.cursor
        result, cursor = tick()
        assert "LAGGING" in result.skip_message
        assert [h["json"]["kind"] for h in hooks] == ["offsite_lagging"]
        tick(cursor)
        assert len(hooks) == 1  # once
        copy_backup(primary, offsite, "postgres", DAY)
        result, cursor = tick(cursor)
        assert "ok" in result.skip_message
        assert [h["json"]["kind"] for h in hooks] == ["offsite_lagging", "offsite_recovered"]
