"""The backup repository's contract, on both backends (a directory and the stack's S3 server)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import boto3
import pytest

from rag_backup.errors import (
    BackupNotFound,
    ConcurrentBackup,
    DamagedBackup,
    IntegrityError,
    InvalidRequest,
    RepositoryUnavailable,
    StoreUnreachable,
)
from rag_backup.repository import (
    BackupOutcome,
    BackupRepository,
    FilesystemBackend,
    S3Backend,
    Verification,
    backend_from_url,
)
from rag_backup.repository.backends import TMP_MARKER, safe_key
from rag_backup.repository.manifest import FORMAT_VERSION, PartitionWindow, utcnow
from rag_backup_tests.receivers import free_port

STACK_SERVICES = ("s3",)  # the S3 backend's tests; the filesystem ones need no store


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


# -- damaged records ----------------------------------------------------------------------------

def test_every_damaged_record_names_its_file_and_the_parse_error(any_repo):
    good = write_backup(any_repo, "2026-11-19", b"good")
    any_repo.record_verification("teststore", "2026-11-19",
                                 Verification(good.backup_id, True, utcnow(), "r"))
    write_backup(any_repo, "2026-11-20", b"broken manifest")
    m = write_backup(any_repo, "2026-11-21", b"broken verification")
    raw = any_repo.backend.read_bytes("teststore/2026-11-20/manifest.json")
    any_repo.backend.write_bytes("teststore/2026-11-20/manifest.json", raw[: len(raw) // 2])
    any_repo.backend.write_bytes("teststore/2026-11-21/verification.json", b'{"backup_id": ')
    any_repo.delete("teststore", "2026-11-19", "retention: test")
    any_repo.backend.write_bytes("teststore/2026-11-19/tombstone.json", b"[1, 2")

    listing = any_repo.scan("teststore")
    assert listing.backups == []
    [bad_manifest, bad_verification] = listing.damaged
    manifest_file = any_repo.backend.location("teststore/2026-11-20/manifest.json")
    assert (bad_manifest.partition_key, bad_manifest.kind, bad_manifest.file) == (
        "2026-11-20", "manifest", manifest_file)
    assert bad_manifest.error.startswith("JSONDecodeError: ")
    assert bad_verification.kind == "verification record"
    assert bad_verification.file.endswith("teststore/2026-11-21/verification.json")
    assert bad_verification.backup_id == m.backup_id
    # the listing API of old still works: the readable manifest is listed, not verified
    assert [(r.partition_key, r.verified) for r in any_repo.list_backups("teststore")] == [
        ("2026-11-21", False)]

    with pytest.raises(DamagedBackup, match="2026-11-20 is DAMAGED") as exc:
        any_repo.resolve("teststore", "2026-11-20")
    assert exc.value.file == manifest_file and manifest_file in str(exc.value)
    assert "JSONDecodeError" in str(exc.value)
    with pytest.raises(DamagedBackup, match=r"verification record .*verification\.json cannot "
                                            r"be read \(JSONDecodeError"):
        any_repo.resolve("teststore", "2026-11-21")
    with pytest.raises(DamagedBackup, match=r"tombstone .*tombstone\.json is unreadable"):
        any_repo.resolve("teststore", "2026-11-19")
    with pytest.raises(BackupNotFound, match=r"2 DAMAGED partition\(s\) skipped: 2026-11-20"):
        any_repo.resolve("teststore", "latest")

    # re-verifying repairs a damaged verification record
    any_repo.record_verification("teststore", "2026-11-21",
                                 Verification(m.backup_id, True, utcnow(), "r2"))
    assert any_repo.resolve("teststore", "latest").backup_id == m.backup_id
    assert [d.partition_key for d in any_repo.damaged("teststore")] == ["2026-11-20"]


def test_a_manifest_filed_under_another_partition_is_damaged(any_repo):
    write_backup(any_repo, "2026-11-20", b"x")
    raw = any_repo.backend.read_bytes("teststore/2026-11-20/manifest.json")
    any_repo.backend.write_bytes("teststore/2026-11-22/manifest.json", raw)
    [damage] = any_repo.damaged("teststore")
    assert damage.partition_key == "2026-11-22"
    assert "describes teststore partition 2026-11-20" in damage.error


# -- the manifest's format: versioned, every earlier format readable ------------------------------

def format1_manifest(partition: str, backup_id: str, payload: bytes, started: str) -> bytes:
    """A manifest exactly as format-1 releases wrote it: no partition window."""
    return json.dumps({
        "artifacts": [{"path": "data.bin", "sha256": hashlib.sha256(payload).hexdigest(),
                       "size": len(payload)}],
        "backup_id": backup_id, "ended_at": started.replace(":00+", ":30+"),
        "fingerprint": {"rows": 7}, "format_version": 1, "partition_key": partition,
        "run_id": "run-of-release-1", "server_version": "15.6", "started_at": started,
        "store": "teststore", "tool_versions": {"pg_dump": "pg_dump (PostgreSQL) 15.6"},
    }, indent=2, sort_keys=True).encode()


def test_a_format_1_manifest_written_by_hand_is_listed_restorable_and_aged(any_repo):
    now = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)
    old_payload, recent_payload = b"format one, old", b"format one, recent"
    for key, backup_id, payload, started in (
            ("2026-10-01", "20261001T020000Z-0000aaaa", old_payload, "2026-10-01T02:00:00+00:00"),
            ("2026-11-22", "20261122T020000Z-0000bbbb", recent_payload,
             "2026-11-22T02:00:00+00:00")):
        any_repo.backend.write_bytes(f"teststore/{key}/{backup_id}/data.bin", payload)
        any_repo.backend.write_bytes(f"teststore/{key}/manifest.json",
                                     format1_manifest(key, backup_id, payload, started))
        any_repo.backend.write_bytes(f"teststore/{key}/verification.json", json.dumps({
            "backup_id": backup_id, "checks": {}, "error": None, "ok": True,
            "run_id": "r", "verified_at": started}).encode())
    newer = write_backup(any_repo, "2026-11-23", b"format two")  # not verified

    # listing
    listing = any_repo.scan("teststore")
    assert listing.damaged == []
    assert [(r.partition_key, r.manifest.format_version, r.verified) for r in listing.backups] == [
        ("2026-10-01", 1, True), ("2026-11-22", 1, True), ("2026-11-23", FORMAT_VERSION, False)]
    old = listing.backups[0].manifest
    assert old.partition_window is None  # format 1 records none: read from the key, as UTC
    assert old.window == PartitionWindow(datetime(2026, 10, 1, tzinfo=timezone.utc),
                                         datetime(2026, 10, 2, tzinfo=timezone.utc))
    assert old.fingerprint == {"rows": 7} and old.duration_s == 30
    # latest, and its artifact read back against the format-1 checksums
    latest = any_repo.resolve("teststore", "latest")
    assert latest.backup_id == "20261122T020000Z-0000bbbb"
    assert any_repo.latest_verified("teststore").backup_id == latest.backup_id
    chunks: list[bytes] = []
    any_repo.stream_artifact(latest, latest.manifest.artifacts[0], chunks.append)
    assert b"".join(chunks) == recent_payload
    # retention: the format-1 backup past the window goes, the rest stay
    decisions = {d.partition_key: d for d in any_repo.apply_retention(
        "teststore", now=now, window=timedelta(days=30))}
    assert decisions["2026-10-01"].delete and "54.5 days" in decisions["2026-10-01"].reason
    assert not decisions["2026-11-22"].delete and not decisions["2026-11-23"].delete
    assert any_repo.partitions("teststore") == ["2026-11-22", "2026-11-23"]
    assert any_repo.get("teststore", "2026-11-23").backup_id == newer.backup_id


def test_a_format_2_manifest_records_the_partition_window_it_was_given(any_repo):
    # a partition of a timezone 14 hours ahead of UTC: its key says a day its window does not
    zone = ZoneInfo("Pacific/Kiritimati")
    window = PartitionWindow(datetime(2026, 10, 26, tzinfo=zone),
                             datetime(2026, 10, 27, tzinfo=zone))
    with any_repo.begin("teststore", "2026-10-26", "run-1", window=window) as pending:
        with pending.artifact("data.bin") as out:
            out.write(b"x")
        pending.commit(BackupOutcome({}, {}, "x"))
    raw = json.loads(any_repo.backend.read_bytes("teststore/2026-10-26/manifest.json"))
    assert raw["format_version"] == 2
    assert raw["partition_window"] == {"start": "2026-10-26T00:00:00+14:00",
                                       "end": "2026-10-27T00:00:00+14:00"}
    manifest = any_repo.get("teststore", "2026-10-26").manifest
    assert manifest.window == window and manifest.window.start == datetime(
        2026, 10, 25, 10, tzinfo=timezone.utc)
    # retention ages it from the recorded start: 30.1 days at this moment, not 29.5
    [decision] = any_repo.apply_retention("teststore", now=datetime(
        2026, 11, 24, 12, tzinfo=timezone.utc), window=timedelta(days=30), dry_run=True)
    assert decision.delete and "30.1 days" in decision.reason


@pytest.mark.parametrize("change, error", [
    ({"format_version": 3}, "format_version 3; this version reads 1, 2"),
    ({"format_version": "2"}, "format_version '2'; this version reads 1, 2"),
    ({"partition_window": {"start": "2026-11-20T00:00:00+00:00"}}, "KeyError: 'end'"),
    ({"partition_window": {"start": "2026-11-21T00:00:00+00:00",
                           "end": "2026-11-20T00:00:00+00:00"}}, "not before its end"),
    ({"partition_window": "yesterday"}, "partition_window is 'yesterday', not an object"),
])
def test_a_manifest_of_an_unknown_format_or_with_a_bad_window_is_damaged(any_repo, change,
                                                                         error):
    write_backup(any_repo, "2026-11-20", b"x")
    doc = json.loads(any_repo.backend.read_bytes("teststore/2026-11-20/manifest.json"))
    any_repo.backend.write_bytes("teststore/2026-11-20/manifest.json",
                                 json.dumps({**doc, **change}).encode())
    [damage] = any_repo.damaged("teststore")
    assert error in damage.error
    with pytest.raises(DamagedBackup, match="2026-11-20 is DAMAGED"):
        any_repo.resolve("teststore", "2026-11-20", require_verified=False)


def test_a_manifest_without_a_window_whose_key_is_not_a_date_says_so_at_retention(any_repo):
    write_backup(any_repo, "nightly", b"x")  # committed outside Dagster: no window recorded
    with pytest.raises(InvalidRequest, match="'nightly' is not a daily .* partition key"):
        any_repo.apply_retention("teststore", now=utcnow(), window=timedelta(days=1))
    assert any_repo.partitions("teststore") == ["nightly"]


# -- two writers on one partition (no pool) ------------------------------------------------------

def test_a_second_writer_never_deletes_the_first_ones_files(any_repo):
    old = write_backup(any_repo, "2026-11-20", b"old")
    part = "teststore/2026-11-20"
    with pytest.raises(ConcurrentBackup) as lost:
        with any_repo.begin("teststore", "2026-11-20", "run-A") as a:
            with a.artifact("one.bin") as out:
                out.write(b"A's first artifact")
            [marker] = any_repo.in_progress("teststore", "2026-11-20")
            assert (marker.run_id, marker.backup_id, marker.replaces) == (
                "run-A", a.backup_id, old.backup_id)
            with any_repo.begin("teststore", "2026-11-20", "run-B") as b:
                with b.artifact("data.bin") as out:
                    out.write(b"B's backup")
                b_manifest = b.commit(BackupOutcome({"rows": 1}, {}, "x"))
            children = any_repo.backend.list_children(part)
            assert a.backup_id in children  # B's commit left A's work alone ...
            assert old.backup_id not in children  # ... and removed the backup it replaced
            assert any_repo.backend.read_bytes(f"{a.prefix}/one.bin") == b"A's first artifact"
            with a.artifact("two.bin") as out:  # A goes on writing
                out.write(b"A's second artifact")
            a.commit(BackupOutcome({"rows": 2}, {}, "x"))
    message = str(lost.value)
    assert f"run run-B committed backup {b_manifest.backup_id}" in message
    assert "this run (run-A" in message and "did not commit" in message
    record = any_repo.get("teststore", "2026-11-20")
    assert record.backup_id == b_manifest.backup_id
    chunks = []
    any_repo.stream_artifact(record, record.manifest.artifacts[0], chunks.append)
    assert b"".join(chunks) == b"B's backup"
    assert any_repo.backend.list_children(part) == sorted(["manifest.json", b_manifest.backup_id])
    assert any_repo.in_progress("teststore", "2026-11-20") == []


def test_the_first_to_commit_wins_and_the_late_one_names_it(any_repo):
    with any_repo.begin("teststore", "2026-11-20", "run-A") as a:
        with a.artifact("data.bin") as out:
            out.write(b"A")
        with pytest.raises(ConcurrentBackup, match="run run-A committed backup"):
            with any_repo.begin("teststore", "2026-11-20", "run-B") as b:
                with b.artifact("data.bin") as out:
                    out.write(b"B")
                a.commit(BackupOutcome({}, {}, "x"))
                b.commit(BackupOutcome({}, {}, "x"))
    assert any_repo.get("teststore", "2026-11-20").backup_id == a.backup_id
    assert any_repo.backend.list_children("teststore/2026-11-20") == sorted(
        ["manifest.json", a.backup_id])


# -- what dead runs leave behind -------------------------------------------------------------

def test_stale_uploads_temporaries_and_abandoned_backups_are_collected(any_repo):
    current = write_backup(any_repo, "2026-11-20", b"current")
    backend = any_repo.storage
    dead = any_repo.begin("teststore", "2026-11-20", "run-dead")
    pending = dead.__enter__()  # a run that died (kill -9): never exits the block
    with pending.artifact("half.bin") as out:
        out.write(b"written before it died")
    live = any_repo.begin("teststore", "2026-11-21", "run-live")
    live_pending = live.__enter__()
    with live_pending.artifact("a.bin") as out:
        out.write(b"still being written")
    upload_key = None
    if isinstance(backend, S3Backend):  # an incomplete multipart upload of the dead run
        full = backend._key(f"{pending.prefix}/big.bin")
        upload = backend.client.create_multipart_upload(Bucket=backend.bucket, Key=full)
        backend.client.upload_part(Bucket=backend.bucket, Key=full, PartNumber=1,
                                   UploadId=upload["UploadId"], Body=b"p" * 1024)
        upload_key = f"{pending.prefix}/big.bin"
    else:  # a temporary file of an interrupted write
        (backend.local_path(pending.prefix) / f"big.bin{TMP_MARKER}dead").write_bytes(b"t")
    backend.write_bytes("objectstore/tmp/20261120-dead", b"engine temporary")

    now = utcnow()
    assert any_repo.collect_stale_writes("teststore", now=now) == []  # young: kept
    assert any_repo.collect_abandoned_backups("teststore", now=now) == []
    later = now + timedelta(hours=13)
    stale = any_repo.collect_stale_writes("teststore", now=later, dry_run=True)
    assert [s.kind for s in stale] == ["multipart upload" if upload_key else "temporary file"]
    stale = any_repo.collect_stale_writes("teststore", now=later)
    if upload_key:
        assert list(backend.list_incomplete_uploads("teststore")) == []
        assert stale[0].location == backend.location(upload_key)
    tmp = any_repo.collect_stale_writes("objectstore/tmp", now=later, all_temporary=True)
    assert [s.location for s in tmp] == [backend.location("objectstore/tmp/20261120-dead")]
    assert backend.list_children("objectstore/tmp") == []

    abandoned = any_repo.collect_abandoned_backups("teststore", now=later)
    assert {s.location for s in abandoned} == {backend.location(pending.prefix),
                                                backend.location(live_pending.prefix)}
    assert backend.list_children("teststore/2026-11-20") == sorted(
        ["manifest.json", current.backup_id])
    assert any_repo.get("teststore", "2026-11-20").backup_id == current.backup_id
    for block in (dead, live):
        block.__exit__(None, None, None)


def test_an_unreachable_s3_repository_names_operation_location_store_and_partition(
        monkeypatch):
    import botocore.config

    port = free_port()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                          aws_access_key_id="a", aws_secret_access_key="b",
                          region_name="us-east-1",
                          config=botocore.config.Config(retries={"max_attempts": 1}))
    backend = S3Backend(client, "backups", prefix="rag")
    with pytest.raises(RepositoryUnavailable) as exc:
        backend.write_bytes("postgres/2026-11-20/x/manifest.json", b"{}")
    err = exc.value
    assert err.transient and err.store == "postgres" and err.partition == "2026-11-20"
    assert err.location == "s3://backups/rag/postgres/2026-11-20/x/manifest.json"
    assert str(err).startswith("backup repository unreachable: write s3://backups/rag/postgres"
                               f"/2026-11-20/x/manifest.json at http://127.0.0.1:{port} "
                               "(store postgres, partition 2026-11-20) failed: "
                               "EndpointConnectionError")


def test_unsynced_writes_create_new_files_only_and_one_barrier_makes_them_durable(tmp_path):
    """``sync=False`` (MinIO's small blobs) skips the per-file fsync for a NEW file only; a
    file that exists already (maybe a committed backup's) is replaced durably, and the
    commit's barrier (``sync_pending``) covers what was left unsynced."""
    backend = FilesystemBackend(tmp_path)
    backend.write_bytes("objectstore/blobs/aa/old", b"committed", sync=True)
    assert backend._unsynced is False

    backend.write_bytes("objectstore/blobs/aa/old", b"rewritten", sync=False)
    assert backend.read_bytes("objectstore/blobs/aa/old") == b"rewritten"
    assert backend._unsynced is False  # a replacement is never left unsynced

    backend.write_bytes("objectstore/blobs/bb/new", b"fresh", sync=False)
    assert backend.read_bytes("objectstore/blobs/bb/new") == b"fresh"
    assert backend._unsynced is True
    assert not [p for p in tmp_path.rglob("*") if TMP_MARKER in p.name]  # no temporary left

    repo = BackupRepository(backend)
    with repo.begin("minio", "2026-11-01", "run") as pending:
        with pending.artifact("snapshot.jsonl") as out:
            out.write(b"{}")
        pending.commit(BackupOutcome({}, {}, "x"))
    assert backend._unsynced is False  # the commit synced before writing its manifest
    assert repo.get("minio", "2026-11-01") is not None
