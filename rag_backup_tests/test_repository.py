"""The backup repository's contract, on both backends (a directory and the stack's S3 server)."""

from __future__ import annotations

import hashlib
import uuid

import boto3
import pytest

from rag_backup.errors import IntegrityError, InvalidRequest, StoreUnreachable
from rag_backup.repository import (
    BackupOutcome,
    BackupRepository,
    FilesystemBackend,
    S3Backend,
    Verification,
    backend_from_url,
)
from rag_backup.repository.backends import safe_key
from rag_backup.repository.manifest import utcnow


@pytest.fixture(scope="session")
def s3_client(stack_env):
    return boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                        aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                        aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                        region_name=stack_env.get("RAG_S3_REGION", "us-east-1"))


@pytest.fixture(params=["filesystem", "s3"])
def any_repo(request, tmp_path, s3_client) -> BackupRepository:
    if request.param == "filesystem":
        return BackupRepository(FilesystemBackend(tmp_path / "repo"))
    bucket = f"repo-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=bucket)
    return BackupRepository(S3Backend(s3_client, bucket, prefix="rag-backup"))


def write_backup(repo: BackupRepository, partition: str, payload: bytes, name: str = "data.bin"):
    with repo.begin("teststore", partition, "run-1") as pending:
        with pending.artifact(name) as out:
            for i in range(0, len(payload), 1000):
                out.write(payload[i:i + 1000])
        manifest = pending.commit(BackupOutcome({"rows": 3}, {"t": "1"}, "x"))
    return manifest


def test_commit_records_every_artifact_with_size_and_checksum(any_repo):
    payload = bytes(range(256)) * 2000
    manifest = write_backup(any_repo, "2026-11-20", payload)
    record = any_repo.get("teststore", "2026-11-20")
    assert record.manifest == manifest
    [artifact] = record.manifest.artifacts
    assert artifact.size == len(payload)
    assert artifact.sha256 == hashlib.sha256(payload).hexdigest()
    chunks = []
    any_repo.stream_artifact(record, artifact, chunks.append)
    assert b"".join(chunks) == payload
    assert any_repo.partitions("teststore") == ["2026-11-20"]
    assert not record.verified


def test_a_failed_backup_commits_nothing_and_leaves_no_files(any_repo):
    write_backup(any_repo, "2026-11-20", b"old")
    with pytest.raises(RuntimeError), any_repo.begin("teststore", "2026-11-20", "r2") as pending:
        with pending.artifact("data.bin") as out:
            out.write(b"new but never committed")
        raise RuntimeError("the store went away")
    record = any_repo.get("teststore", "2026-11-20")
    chunks = []
    any_repo.stream_artifact(record, record.manifest.artifacts[0], chunks.append)
    assert b"".join(chunks) == b"old"
    assert any_repo.backend.list_children("teststore/2026-11-20") == sorted(
        ["manifest.json", record.backup_id])


def test_rerunning_a_partition_replaces_the_backup_and_drops_the_old_files(any_repo):
    first = write_backup(any_repo, "2026-11-20", b"first")
    any_repo.record_verification("teststore", "2026-11-20",
                                 Verification(first.backup_id, True, utcnow(), "r"))
    second = write_backup(any_repo, "2026-11-20", b"second")
    record = any_repo.get("teststore", "2026-11-20")
    assert record.backup_id == second.backup_id != first.backup_id
    assert not record.verified  # the verification belonged to the replaced backup
    assert first.backup_id not in any_repo.backend.list_children("teststore/2026-11-20")


def test_verification_state_is_listed(any_repo):
    for day in ("2026-11-18", "2026-11-19", "2026-11-20"):
        m = write_backup(any_repo, day, day.encode())
        if day != "2026-11-20":
            any_repo.record_verification("teststore", day,
                                         Verification(m.backup_id, True, utcnow(), "r"))
    assert [(r.partition_key, r.verified) for r in any_repo.list_backups("teststore")] == [
        ("2026-11-18", True), ("2026-11-19", True), ("2026-11-20", False)]
    assert any_repo.latest_verified("teststore").partition_key == "2026-11-19"


def test_deletion_removes_the_backup_and_leaves_a_tombstone(any_repo):
    m = write_backup(any_repo, "2026-11-20", b"x")
    tomb = any_repo.delete("teststore", "2026-11-20", "retention: too old")
    assert tomb.backup_id == m.backup_id
    assert any_repo.get("teststore", "2026-11-20") is None
    assert any_repo.partitions("teststore") == []
    assert any_repo.backend.list_children("teststore/2026-11-20") == ["tombstone.json"]
    assert any_repo.tombstone("teststore", "2026-11-20").reason == "retention: too old"


def test_a_modified_artifact_is_reported_with_its_location(any_repo):
    m = write_backup(any_repo, "2026-11-20", b"payload" * 100)
    any_repo.backend.write_bytes(f"teststore/2026-11-20/{m.backup_id}/data.bin", b"payload" * 99)
    record = any_repo.get("teststore", "2026-11-20")
    with pytest.raises(IntegrityError, match=r"data\.bin has 693 bytes, the manifest says 700"):
        any_repo.stream_artifact(record, record.manifest.artifacts[0])


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a/./b", "a\\b"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(InvalidRequest):
        safe_key(key)


def test_an_unreachable_s3_repository_is_a_clear_error():
    with pytest.raises(StoreUnreachable, match="s3://backups at http://127.0.0.1:9"):
        backend_from_url("s3://backups/x", s3_endpoint="http://127.0.0.1:9",
                         s3_access_key="a", s3_secret_key="b")
