"""Redis end to end against the stack's real redis-server: engine, assets, restore job."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import redis

from rag_backup.defs import redis as redis_defs
from rag_backup.defs.resources import BackupRepositoryResource, RedisResource
from rag_backup.engines import redis as engine
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    DamagedBackup,
    IntegrityError,
    StoreUnreachable,
)
from rag_backup.repository import BackupOutcome, BackupRepository
from rag_backup.repository.manifest import utcnow
from rag_backup_tests.conftest import take_backup as committed
from rag_backup_tests.killing import kill_backup_while_writing

STACK_SERVICES = ("redis",)  # the stores these tests need (see conftest)

HOUR = utcnow().strftime("%Y-%m-%d-%H:00")
TEST_DBS = (10, 11)


@pytest.fixture(scope="session")
def rs(stack_env) -> engine.RedisServer:
    return engine.RedisServer(stack_env["RAG_REDIS_HOST"], int(stack_env["RAG_REDIS_PORT"]),
                              stack_env["RAG_REDIS_PASSWORD"])


@pytest.fixture
def test_dbs(rs):
    """Databases 10 and 11 of the stack's server, filled with every type, emptied afterwards."""
    rng = random.Random(7)
    for db in TEST_DBS:
        c = rs.client(db)
        c.flushdb()
        c.set("str", "वैल्यू value")
        c.set(b"\x00bin\xff key", bytes(range(256)))
        c.set("big", rng.randbytes(3_000_000))
        c.set("int", 12345)
        c.hset("hash:small", mapping={"a": "1", "ब": "2"})
        c.hset("hash:big", mapping={f"field{i}": rng.randbytes(20) for i in range(2000)})
        c.rpush("list", *range(1500))
        c.sadd("set:int", *range(100))
        c.sadd("set:str", *[f"member{i}" for i in range(700)])
        c.zadd("zset", {f"m{i}": i / 3 for i in range(300)})
        for i in range(50):
            c.xadd("stream", {"i": str(i), "text": "संदेश"})
        c.xgroup_create("stream", "workers", id="0")
        c.xreadgroup("workers", "w1", {"stream": ">"}, count=10)
        c.set("cache:answer:1", "x", ex=3600)
        c.hset(f"session:{db}", mapping={"user": "u1"})
        c.pexpire(f"session:{db}", 1_800_000)
        c.close()
    yield rs
    for db in TEST_DBS:
        c = rs.client(db)
        c.flushdb()
        c.close()


def snapshot(client: redis.Redis) -> dict:
    """Every key's type, full value and absolute expiry, read with plain commands."""
    out = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value = {
            "string": lambda: client.get(key),
            "hash": lambda: client.hgetall(key),
            "list": lambda: client.lrange(key, 0, -1),
            "set": lambda: client.smembers(key),
            "zset": lambda: client.zrange(key, 0, -1, withscores=True),
            "stream": lambda: (client.xrange(key), client.xinfo_groups(key)),
        }[kind]()
        out[key] = (kind, value, client.pexpiretime(key))
    return out


def take_backup(repo: BackupRepository, rs: engine.RedisServer, partition: str = HOUR,
                verify: bool = True):
    return committed(repo, "redis", partition, lambda pending: engine.backup(rs, pending),
                     (lambda record: engine.verify(repo, record)) if verify else None)


def test_replay_round_trip_keeps_every_type_value_and_expiry(test_dbs, repo):
    before = {db: snapshot(test_dbs.client(db)) for db in TEST_DBS}
    outcome, record = take_backup(repo, test_dbs)
    for db in TEST_DBS:
        assert outcome.fingerprint["dbs"][str(db)] == {"keys": 13, "expires": 2}
        test_dbs.client(db).flushdb()

    report = engine.replay(repo, record, test_dbs, dbs=list(TEST_DBS))

    assert report.matches_manifest and report.restored == 26
    for db in TEST_DBS:
        assert snapshot(test_dbs.client(db)) == before[db]


def test_replay_keeps_existing_keys_unless_told_and_needs_confirmation_to_flush(test_dbs, repo):
    _, record = take_backup(repo, test_dbs)
    c = test_dbs.client(10)
    c.set("str", "changed after the backup")
    c.set("new-key", "only on the target")
    report = engine.replay(repo, record, test_dbs, dbs=[10])
    assert report.dbs[0].skipped_existing == 13 and report.restored == 0
    assert c.get("str") == b"changed after the backup"

    with pytest.raises(ConfirmationRequired, match=r"set confirm to '127\.0\.0\.1:\d+/10'"):
        engine.replay(repo, record, test_dbs, dbs=[10], flush=True, confirm="yes")
    assert c.get("new-key") == b"only on the target"

    name = f"{test_dbs.host}:{test_dbs.port}/10"
    report = engine.replay(repo, record, test_dbs, dbs=[10], flush=True, confirm=name)
    assert report.restored == 13 and c.get("new-key") is None
    assert c.get("str") == "वैल्यू value".encode()


def test_replay_a_pattern_into_another_db(test_dbs, repo):
    _, record = take_backup(repo, test_dbs)
    target = test_dbs.client(12)
    target.flushdb()
    try:
        report = engine.replay(repo, record, test_dbs, dbs=[10], target_db=12,
                               pattern="hash:*")
        assert report.restored == 2
        assert sorted(target.keys()) == [b"hash:big", b"hash:small"]
        assert target.hgetall("hash:small") == {b"a": b"1", "ब".encode(): b"2"}
    finally:
        target.flushdb()


def test_a_key_that_expires_before_the_restore_is_not_resurrected(test_dbs, repo):
    test_dbs.client(10).set("short-lived", "x", px=1500)
    outcome, record = take_backup(repo, test_dbs)
    assert outcome.fingerprint["dbs"]["10"]["keys"] == 14
    time.sleep(1.6)
    test_dbs.client(10).flushdb()
    report = engine.replay(repo, record, test_dbs, dbs=[10])
    assert report.dbs[0].skipped_expired == 1 and report.restored == 13
    assert report.matches_manifest
    assert test_dbs.client(10).get("short-lived") is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_file_mode_places_the_rdb_for_a_stopped_server_and_refuses_a_running_one(
        test_dbs, repo, tmp_path):
    before = snapshot(test_dbs.client(10))
    _, record = take_backup(repo, test_dbs)
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    (data_dir / "dump.rdb").write_bytes(b"an older file")
    with pytest.raises(ConfirmationRequired, match="move them aside"):
        engine.place_rdb(repo, record, str(data_dir))
    placed = engine.place_rdb(repo, record, str(data_dir), confirm=str(data_dir))
    assert placed.moved_aside and (data_dir / placed.moved_aside[0]).read_bytes() == \
        b"an older file"

    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redis.Redis(port=port, db=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.info("persistence")["loading"] == 0:
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert snapshot(client) == before
        with pytest.raises(ConfirmationRequired, match=f"pid {server.pid}"):
            engine.place_rdb(repo, record, str(data_dir), confirm=str(data_dir))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_a_corrupt_rdb_fails_verification(test_dbs, repo, tmp_path):
    _, record = take_backup(repo, test_dbs, verify=False)
    path = Path(record.location) / engine.RDB_ARTIFACT
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        engine.verify(repo, record)

    # An RDB damaged before it reached us, stored with a matching checksum: redis-check-rdb
    # is what catches it.
    rdb = tmp_path / "dump.rdb"
    engine.fetch_rdb(test_dbs, rdb, timeout_s=60)
    raw = bytearray(rdb.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    rdb.write_bytes(bytes(raw))
    with repo.begin("redis", "2026-11-23-10:00", "t") as pending:
        with open(rdb, "rb") as source:
            engine.compress_into(pending, engine.RDB_ARTIFACT, source, 3)
        pending.commit(BackupOutcome({"dbs": {}, "keys": 0, "expires": 0}, {}, "7"))
    with pytest.raises(IntegrityError, match="redis-check-rdb"):
        engine.verify(repo, repo.get("redis", "2026-11-23-10:00"))


FINGERPRINT_ON_DISK = {"dbs": {"0": {"keys": 3, "expires": 1}, "10": {"keys": 13, "expires": 2}},
                       "keys": 16, "expires": 3, "rdb_bytes": 4096}


def test_the_typed_fingerprint_reads_and_writes_the_manifests_dict_unchanged():
    fp = engine.RedisFingerprint.from_dict(FINGERPRINT_ON_DISK)
    assert (fp.keys, fp.expires, fp.rdb_bytes) == (16, 3, 4096)
    assert fp.dbs == {0: engine.DbCounts(3, 1), 10: engine.DbCounts(13, 2)}
    assert fp.to_dict() == FINGERPRINT_ON_DISK
    without_size = {k: v for k, v in FINGERPRINT_ON_DISK.items() if k != "rdb_bytes"}
    assert engine.RedisFingerprint.from_dict(without_size).rdb_bytes is None


@pytest.mark.parametrize("change, error", [
    ({"dbs": []}, "no 'dbs' object"),
    ({"keys": 17}, "total keys 17 is not the sum over its dbs (16)"),
    ({"dbs": {"zero": {"keys": 1, "expires": 0}}}, "db entry 'zero'"),
    ({"dbs": {"0": {"keys": 1}}}, "db 0: expires is None, not a count"),
])
def test_an_invalid_fingerprint_is_a_damaged_backup_naming_it(repo, change, error):
    with repo.begin("redis", "2026-11-23-10:00", "t") as pending:
        with pending.artifact("data") as out:
            out.write(b"x")
        pending.commit(BackupOutcome({**FINGERPRINT_ON_DISK, **change}, {}, "7"))
    record = repo.get("redis", "2026-11-23-10:00")
    with pytest.raises(DamagedBackup, match="the manifest of redis backup 2026-11-23-10:00 "):
        engine.fingerprint_of(record)
    with pytest.raises(DamagedBackup, match=re.escape(error)):
        engine.verify(repo, record)


def test_wrong_password_and_unreachable_server_are_clear_and_change_nothing(rs, repo):
    wrong = engine.RedisServer(rs.host, rs.port, "not-the-password")
    with pytest.raises(CredentialsRejected, match="RAG_REDIS_PASSWORD"), \
            repo.begin("redis", HOUR, "t") as pending:
        engine.backup(wrong, pending)
    gone = engine.RedisServer("127.0.0.1", free_port(), "x")
    with pytest.raises(StoreUnreachable, match=f"Redis 127.0.0.1:{gone.port} is unreachable"), \
            repo.begin("redis", HOUR, "t") as pending:
        engine.backup(gone, pending)
    assert repo.get("redis", HOUR) is None
    assert repo.backend.list_children(f"redis/{HOUR}") == []


def test_a_server_that_cuts_the_transfer_is_retried_and_changes_nothing(rs, repo):
    """The replica link killed by the server mid-backup (as a restart does) is transient:
    StoreWentAway, which the assets retry like an unreachable server; redis-cli's own words are
    in the message; nothing is committed."""
    import threading

    from rag_backup.defs.common import retry_when_unreachable
    from rag_backup.errors import StoreWentAway

    admin = rs.client()
    delay = admin.config_get("repl-diskless-sync-delay")["repl-diskless-sync-delay"]
    admin.config_set("repl-diskless-sync-delay", 3)  # the replica waits: time to cut it
    outcome: dict = {}

    def take() -> None:
        try:
            with repo.begin("redis", HOUR, "t") as pending:
                engine.backup(rs, pending)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    worker = threading.Thread(target=take)
    try:
        worker.start()
        deadline = time.monotonic() + 30
        while not admin.client_list(_type="replica"):
            assert worker.is_alive() and time.monotonic() < deadline, "no replica link seen"
            time.sleep(0.02)
        assert admin.client_kill_filter(_type="replica") >= 1
        worker.join(timeout=60)
    finally:
        admin.config_set("repl-diskless-sync-delay", delay)
        admin.close()
    error = outcome.get("error")
    assert isinstance(error, StoreWentAway), error
    assert isinstance(error, StoreUnreachable)
    assert "redis-cli --rdb from Redis" in str(error) and "SYNC" in str(error)
    assert repo.get("redis", HOUR) is None
    with pytest.raises(dg.RetryRequested), retry_when_unreachable():
        raise error


def test_a_killed_backup_leaves_the_previous_backup_intact(rs, repo, repo_dir):
    c = rs.client(13)
    c.flushdb()
    try:
        pipe = c.pipeline(transaction=False)
        for i in range(60):
            pipe.set(f"blob:{i}", os.urandom(2_000_000))
        pipe.execute()
        _, first = take_backup(repo, rs)
        kill_backup_while_writing(
            store="redis", repo_dir=repo_dir, partition=HOUR, password=rs.password,
            server=f"engine.RedisServer({rs.host!r}, {rs.port}, os.environ['PW'])")
        after = repo.get("redis", HOUR)
        assert after.backup_id == first.backup_id and after.verified
        engine.verify(repo, after)
    finally:
        c.flushdb()


# -- through Dagster -----------------------------------------------------------------------

def resources(rs, repo_dir):
    return {"repository": BackupRepositoryResource(location=str(repo_dir)),
            "redis": RedisResource(host=rs.host, port=rs.port, password=rs.password)}


def test_assets_and_restore_job(test_dbs, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [redis_defs.redis_backup, redis_defs.redis_backup_verified, redis_defs.redis_retention],
        partition_key=HOUR, instance=instance, resources=resources(test_dbs, repo_dir))
    assert result.success
    [mat] = result.asset_materializations_for_node("redis_backup")
    record = repo.get("redis", HOUR)
    fp = engine.fingerprint_of(record)
    assert mat.metadata["keys"].value == fp.keys >= 26
    assert (mat.metadata["expires"].value, mat.metadata["dbs"].value,
            mat.metadata["rdb_bytes"].value) == (fp.expires, len(fp.dbs), fp.rdb_bytes)
    assert fp.dbs[10] == fp.dbs[11] == engine.DbCounts(13, 2) and fp.rdb_bytes > 0
    assert mat.metadata["size_bytes"].value > 0
    assert record.verified
    # the partition's window, as Dagster gives it, is in the manifest
    window = redis_defs.HOURLY_PARTITIONS.time_window_for_partition_key(HOUR)
    assert (record.manifest.window.start, record.manifest.window.end) == (window.start,
                                                                           window.end)

    before = snapshot(test_dbs.client(11))
    test_dbs.client(11).flushdb()
    config = redis_defs.RestoreRedisConfig(dbs=[11])
    run = redis_defs.restore_redis_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_redis": config}),
        resources=resources(test_dbs, repo_dir), instance=instance)
    assert run.success
    out = run.output_for_node("restore_redis")
    assert out["keys_restored"] == 13 and out["matches_manifest"]
    assert snapshot(test_dbs.client(11)) == before

    refused = redis_defs.restore_redis_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_redis": redis_defs.RestoreRedisConfig(
            partition_key="2026-11-01-03:00")}),
        resources=resources(test_dbs, repo_dir), instance=instance, raise_on_error=False)
    assert not refused.success
    assert "no backup for partition '2026-11-01-03:00'" in str(
        refused.failure_data_for_node("restore_redis").error)
