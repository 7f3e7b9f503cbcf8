"""PostgreSQL point-in-time recovery, end to end against a real PostgreSQL 15.

One server of the module's own (a DevStack with PostgreSQL only), one WAL receiver running as a
real process (``python -m rag_backup wal-receiver``), one filesystem repository and one verified
base backup are shared by every test. One write history is recorded once: pgbench writes, the
state at a time T, more writes, a named restore point, a "bad migration"; each restore is
compared with the state the server had at its target, read by an independent means (SQL digests
of every row of every pgbench table, not our code). Damage (a deleted segment, a flipped byte,
retention) is done to copies of the repository. The two tests that disturb the shared server
(a SIGKILL of the postmaster; an in-place restore that puts it on a new timeline) come last.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from rag_backup import recovery
from rag_backup.defs import pitr as pitr_defs
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs.resources import AlertResource, BackupRepositoryResource, PostgresResource
from rag_backup.devstack import DevStack
from rag_backup.engines import postgres as pg_engine
from rag_backup.engines.postgres.pitr import backfill
from rag_backup.engines.postgres import PostgresServer
from rag_backup.engines.postgres.pitr import (
    BASE_STORE,
    Into,
    PitrTarget,
    WalIndex,
    archive_status,
    check_hour,
    current_lag,
    fingerprint_of,
    plan,
    prune_wal,
    restore,
    restore_to_time,
    take_base_backup,
    verify_with_wal,
)
from rag_backup.engines.postgres.pitr.wal import parse_lsn, segment_of_lsn, segno_of
from rag_backup.errors import (
    BackupNotFound,
    ConfirmationRequired,
    IntegrityError,
    InvalidRequest,
)
from rag_backup.repository import (
    BackupRecord,
    BackupRepository,
    FilesystemBackend,
    Verification,
)
from rag_backup.repository.crypto import Identity
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.sealed import Crypto
from rag_backup.repository.wal import segment_key, segment_record_key
from rag_backup_tests import pgutil
from rag_backup_tests.conftest import take_backup
from rag_backup_tests.receivers import webhook_server
from rag_backup_tests.pitrutil import (
    Receiver,
    bench_state,
    connect,
    copy_repository,
    copy_server,
    pgbench,
    postmaster_pid,
    query,
    running_copy,
    server_now,
    stop_copy,
    table_digest,
    wait_caught_up,
    wait_for_segment,
    wait_gone,
)

STACK_SERVICES = ("postgres",)  # the stores these tests need (see conftest)
# The engine-level base backup's partition: never today's, which the Dagster test takes.
PARTITION = "2026-01-01"
RESTORE_POINT = "before_bad_migration"
LATEST = PitrTarget.parse("latest")
PROJECT = Path(__file__).resolve().parents[1]
KEY = Identity.generate()  # the module's repository is encrypted: WAL, base backups, restores
KEYS = Crypto([KEY.recipient], [KEY])


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(root=tmp_path_factory.mktemp("pitrstack"), services=("postgres",))
    try:
        stack.up(seed=False)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def server(pg_stack: DevStack) -> PostgresServer:
    env = pg_stack.env()
    return PostgresServer(env["RAG_PG_HOST"], int(env["RAG_PG_PORT"]), env["RAG_PG_USER"],
                          env["RAG_PG_PASSWORD"])


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pitrrepo")


@pytest.fixture(scope="module")
def repo(repo_dir: Path) -> BackupRepository:
    return BackupRepository(FilesystemBackend(repo_dir), KEYS)


@pytest.fixture(scope="module")
def receiver(pg_stack: DevStack, server: PostgresServer, repo: BackupRepository, repo_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """The WAL receiver as a real process; up once it has archived its first segment (it
    forces a segment switch after 3 s of unarchived WAL)."""
    work = tmp_path_factory.mktemp("receiver")
    env = {**os.environ, **pg_stack.env(), "RAG_BACKUP_REPOSITORY": str(repo_dir),
           "RAG_PG_WAL_DIR": str(work / "spool"), "RAG_PG_WAL_SWITCH_AFTER_S": "3",
           "RAG_PG_WAL_POLL_S": "0.5", "RAG_BACKUP_ENCRYPT_TO": str(KEY.recipient),
           "RAG_BACKUP_IDENTITY": KEY.encode()}
    rx = Receiver(env, work / "receiver.log", PROJECT)
    rx.start()
    try:
        deadline = time.monotonic() + 60
        while not repo.wal.segments():
            assert rx.running(), f"the WAL receiver exited: {rx.log_tail()}"
            assert time.monotonic() < deadline, f"nothing archived in 60 s: {rx.log_tail()}"
            time.sleep(0.3)
        yield rx
    finally:
        rx.stop()


@pytest.fixture(scope="module")
def base(server: PostgresServer, repo: BackupRepository, receiver: Receiver) -> BackupRecord:
    """The verified base backup. WAL is archived before it too (a table, a segment switch), so
    retention has segments that no base backup needs."""
    query(server, "postgres", "CREATE TABLE before_base AS SELECT g FROM generate_series(1, 1000) g")
    query(server, "postgres", "SELECT pg_switch_wal()")
    with repo.begin(BASE_STORE, PARTITION, "test") as pending:
        outcome = take_base_backup(server, pending, timeout_s=600)
        pending.commit(outcome)
    record = repo.get(BASE_STORE, PARTITION)
    assert record is not None
    checks = verify_with_wal(repo, record, timeout_s=600, wal_wait_s=120)
    assert checks["wal_segments"] >= 1 and checks["manifest_files"] > 100, checks
    repo.record_verification(BASE_STORE, PARTITION, Verification(
        record.backup_id, True, utcnow(), "test", checks))
    record = repo.get(BASE_STORE, PARTITION)
    assert record is not None and record.verified
    return record


@dataclass(frozen=True)
class History:
    at_t: datetime  # the server's clock at T
    state_at_t: dict  # database bench at T
    state_at_point: dict  # database bench at the restore point
    final: dict  # database bench after the "bad migration"


@pytest.fixture(scope="module")
def history(server: PostgresServer, repo: BackupRepository, receiver: Receiver,
            base: BackupRecord) -> History:
    """pgbench writes; T; more writes; a restore point; a bad migration; all archived."""
    pgutil.create_database(server, "bench", schema_sql="")
    pgbench(server, "bench", "-i", "-q", "-s", "1")
    pgbench(server, "bench", "-n", "-c", "2", "-j", "2", "-T", "3")
    state_at_t = bench_state(server, "bench")  # the writers have stopped
    at_t = server_now(server)
    time.sleep(1.0)
    pgbench(server, "bench", "-n", "-c", "2", "-j", "2", "-T", "2")
    state_at_point = bench_state(server, "bench")
    query(server, "bench", "SELECT pg_create_restore_point(%s)", (RESTORE_POINT,))
    query(server, "bench", "DELETE FROM pgbench_history; "
                           "UPDATE pgbench_accounts SET abalance = abalance + 1000000 "
                           "WHERE aid <= 10")
    final = bench_state(server, "bench")
    # The three states differ (else the restores below could not tell them apart).
    assert state_at_t["pgbench_history"][0] < state_at_point["pgbench_history"][0]
    assert final["pgbench_history"][0] == 0
    assert final["pgbench_accounts"] != state_at_point["pgbench_accounts"]
    wait_caught_up(repo, server, receiver)
    return History(at_t, state_at_t, state_at_point, final)


# -- tests -----------------------------------------------------------------------------------

def test_refusals_happen_before_anything_changes(server, repo, base, history, tmp_path):
    """Every refusal names what is reachable (for times) and leaves no work directory."""
    work = tmp_path / "work"
    work.mkdir()
    scratch = Into("scratch", work_dir=work)
    fp = fingerprint_of(base)
    reachable_from = f"reachable: {fp.consistent_at.isoformat()} .. "
    cases = [
        (PitrTarget.parse((fp.consistent_at - timedelta(hours=1)).isoformat()),
         ["before the oldest verified base backup", reachable_from]),
        (PitrTarget.parse((utcnow() + timedelta(days=1)).isoformat()),
         ["after the newest archived WAL", reachable_from]),
        (PitrTarget.parse("latest", timeline=7), ["timeline 7", "knows timelines 1"]),
        (PitrTarget.parse(target_name="no_such_point"), ["no_such_point", RESTORE_POINT]),
    ]
    for target, words in cases:
        with pytest.raises(InvalidRequest) as refused:
            restore_to_time(repo, server, target=target, into=scratch)
        for word in words:
            assert word in str(refused.value), (target, str(refused.value))
        assert list(work.iterdir()) == [], f"{target} left {list(work.iterdir())}"

    with pytest.raises(InvalidRequest, match="yesterday at noon"):
        PitrTarget.parse("yesterday at noon")
    with pytest.raises(InvalidRequest, match="target_time and target_name"):
        PitrTarget.parse(history.at_t.isoformat(), target_name=RESTORE_POINT)

    data = tmp_path / "pgdata"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    chosen = plan(repo, LATEST)
    for confirm in ("wrong", "", f"{data}/"):
        in_place = Into("in_place", data_directory=data, confirm=confirm)
        with pytest.raises(ConfirmationRequired, match=str(data)):
            restore_to_time(repo, server, target=LATEST, into=in_place)
        with pytest.raises(ConfirmationRequired, match=str(data)):
            restore(repo, chosen, in_place, server)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata", "work"]
    assert [p.name for p in data.iterdir()] == ["PG_VERSION"]


def test_restore_to_a_time_is_the_state_at_that_time(server, repo, history, tmp_path):
    chosen = plan(repo, PitrTarget.parse(history.at_t.isoformat()))
    assert chosen.stop_expected, "the archive holds commits after T: the recovery stops at T"
    report = restore(repo, chosen, Into("scratch", work_dir=tmp_path, keep_running=True), server)
    with running_copy(report, server) as copy:
        assert report.running and report.mode == "scratch"
        assert bench_state(copy, "bench") == history.state_at_t
        assert (bench_state(copy, "bench")["pgbench_history"][0]
                < history.state_at_point["pgbench_history"][0]), "the later writes are absent"
        assert query(copy, "postgres", "SELECT pg_is_in_recovery()") == [(False,)]
    assert report.stop and report.stop.startswith("recovery stopping before commit"), report
    assert report.reached_at is not None and report.reached_at <= history.at_t, report
    assert history.at_t - report.reached_at < timedelta(seconds=10), report
    assert report.wal_segments >= 1 and report.wal_bytes > 0
    assert report.base_backup == chosen.base.backup_id
    assert not any(tmp_path.iterdir()), "stopping the copy removes its directory"


def test_restore_to_a_named_restore_point(server, repo, history, tmp_path):
    report = restore(repo, plan(repo, PitrTarget.parse(target_name=RESTORE_POINT)),
                     Into("scratch", work_dir=tmp_path, keep_running=True), server)
    with running_copy(report, server) as copy:
        assert bench_state(copy, "bench") == history.state_at_point
    assert report.stop and RESTORE_POINT in report.stop, report


def test_databases_mode_copies_a_database_at_a_time_under_a_new_name(server, repo, history,
                                                                       tmp_path):
    before = pgutil.databases(server)
    report = restore(repo, plan(repo, PitrTarget.parse(history.at_t.isoformat())),
                     Into("databases", databases=("bench",), target_server=server,
                          target_names={}, work_dir=tmp_path), server)
    name = report.databases.get("bench")
    try:
        assert name and name != "bench" and name not in before, report
        assert name in pgutil.databases(server)
        assert report.comparisons["bench"].matches, report.comparisons["bench"]
        assert bench_state(server, name) == history.state_at_t
        assert bench_state(server, "bench") == history.final, "the source was not touched"
        assert not report.running and list(tmp_path.iterdir()) == [], \
            "the recovered instance is stopped and its directory removed"
    finally:
        if name:
            pgutil.drop_database(server, name)


def test_a_deleted_segment_is_reported_as_a_gap_by_name(repo, repo_dir, history, tmp_path):
    copy_dir = tmp_path / "repo"
    copy = copy_repository(repo_dir, copy_dir, KEYS)
    # A segment inside the WAL both the restore point and 'latest' need (not an end of it).
    segments = plan(copy, PitrTarget.parse(target_name=RESTORE_POINT)).segments
    assert len(segments) >= 3, [s.name for s in segments]
    victim = segments[len(segments) // 2]
    assert victim != plan(copy, LATEST).segments[-1]
    (copy_dir / segment_record_key(victim.name)).unlink()
    (copy_dir / segment_key(victim.name)).unlink()

    with pytest.raises(InvalidRequest) as refused:
        plan(copy, LATEST)
    assert victim.name in str(refused.value) and "gap" in str(refused.value)
    with pytest.raises(InvalidRequest, match=victim.name):
        plan(copy, PitrTarget.parse(target_name=RESTORE_POINT))

    start = victim.archived_at.replace(minute=0, second=0, microsecond=0)
    hour = check_hour(copy, start, start + timedelta(hours=1))
    assert hour.missing == [victim.name], hour
    assert not hour.ok and victim.name in hour.problems()
    intact = check_hour(repo, start, start + timedelta(hours=1))
    assert intact.ok and victim.name in intact.segments, intact


def test_retention_deletes_only_wal_no_base_backup_needs(repo, repo_dir, base, history,
                                                         tmp_path):
    copy_dir = tmp_path / "repo"
    copy = copy_repository(repo_dir, copy_dir, KEYS)
    fp = fingerprint_of(base)
    index = WalIndex.read(copy)
    first = segno_of(fp.start_segment, index.seg_size)
    names = set(index.segments)
    doomed = {n for n in names if segno_of(n, index.seg_size) < first}
    assert doomed, f"the fixture archived WAL before the base backup ({fp.start_segment})"
    planned = [s.name for s in plan(copy, LATEST).segments]

    dry = prune_wal(copy, dry_run=True)
    assert set(dry.deleted) == doomed and set(WalIndex.read(copy).segments) == names

    done = prune_wal(copy, dry_run=False)
    assert set(done.deleted) == doomed and done.keep_from == fp.start_segment
    assert done.bytes == sum(index.segments[n].stored_size for n in doomed)
    assert set(WalIndex.read(copy).segments) == names - doomed
    assert not any((copy_dir / segment_key(n)).exists() for n in doomed)
    assert [s.name for s in plan(copy, LATEST).segments] == planned
    assert [s.name for s in plan(copy, PitrTarget.parse(history.at_t.isoformat())).segments]

    # No base backup at all: the WAL may be all there is, nothing is deleted.
    bare_dir = tmp_path / "bare"
    copy_repository(repo_dir / "postgres_wal", bare_dir / "postgres_wal", KEYS)
    bare = BackupRepository(FilesystemBackend(bare_dir), KEYS)
    kept = set(WalIndex.read(bare).segments)
    assert kept >= doomed
    nothing = prune_wal(bare, dry_run=False)
    assert nothing.deleted == () and nothing.keep_from is None
    assert set(WalIndex.read(bare).segments) == kept


def test_a_damaged_segment_is_caught_by_check_and_by_restore(server, repo_dir, history,
                                                             tmp_path):
    copy_dir = tmp_path / "repo"
    copy = copy_repository(repo_dir, copy_dir, KEYS)
    chosen = plan(copy, LATEST)
    assert len(chosen.segments) >= 2
    victim, sound = chosen.segments[1], chosen.segments[0]
    assert copy.wal.check(victim) is None
    stored = copy_dir / segment_key(victim.name)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    problem = copy.wal.check(victim)
    assert problem and "do not match" in problem, problem
    assert copy.wal.check(sound) is None

    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(IntegrityError) as failed:
        restore(copy, chosen, Into("scratch", work_dir=work), server)
    assert victim.name in str(failed.value)
    assert list(work.iterdir()) == [], "a failed restore leaves nothing behind"


def test_receiver_killed_mid_segment_loses_nothing(server, repo, receiver, base, history,
                                                   tmp_path):
    pgutil.create_database(server, "recv", "CREATE TABLE rows (id int PRIMARY KEY, "
                                           "pad text NOT NULL)")
    insert = ("INSERT INTO rows SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') "
              "FROM generate_series(1, 32) i) FROM generate_series(%s, %s) g")
    query(server, "recv", insert, (1, 1000))
    ((killed_at,),) = query(server, "recv", "SELECT pg_current_wal_flush_lsn()::text")
    streaming = [pid for pid, command in receiver.children() if "pg_receivewal" in command]
    assert streaming, f"no pg_receivewal under the receiver: {receiver.children()}"
    assert set(streaming) <= set(receiver.kill())
    query(server, "recv", insert, (1001, 6000))
    query(server, "recv", "SELECT pg_switch_wal()")
    query(server, "recv", insert, (6001, 9000))
    ((written,),) = query(server, "recv", "SELECT pg_current_wal_flush_lsn()::text")
    index = WalIndex.read(repo)
    dead_from = segno_of(segment_of_lsn(1, parse_lsn(killed_at), index.seg_size), index.seg_size)
    dead_to = segno_of(segment_of_lsn(1, parse_lsn(written), index.seg_size), index.seg_size)
    assert dead_to > dead_from, "the writes while the receiver was down span a segment switch"
    assert all(segno_of(n, index.seg_size) < dead_to for n in index.segments)
    receiver.start()
    wait_caught_up(repo, server, receiver)

    index = WalIndex.read(repo)
    path = index.path()
    first = segno_of(fingerprint_of(base).start_segment, index.seg_size)
    last = max(segno_of(s.name, index.seg_size) for s in index.on_path(path))
    assert last >= dead_to
    have, missing = index.chain(first, last, path)
    assert missing == [] and not index.damaged
    assert len(have) == last - first + 1
    assert {s.name: repo.wal.check(s) for s in have if repo.wal.check(s)} == {}
    assert "other contents" not in receiver.log_tail(1_000_000)

    source = table_digest(server, "recv", "rows")
    assert source[0] == 9000
    report = restore(repo, plan(repo, LATEST),
                     Into("scratch", work_dir=tmp_path, keep_running=True), server)
    with running_copy(report, server) as copy:
        assert table_digest(copy, "recv", "rows") == source


def test_no_base_backup_is_backup_not_found(tmp_path):
    """A repository without a base backup: BackupNotFound saying where it looked."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackupNotFound, match="no verified base backup") as refused:
        plan(BackupRepository(FilesystemBackend(empty)), LATEST)
    assert str(empty) in str(refused.value)


def test_two_restores_started_together_into_one_work_dir(server, repo, history, tmp_path):
    """Two restores started in the same second with the same work_dir (two runs of one job, a
    script): both succeed, each in a directory of its own."""
    chosen = plan(repo, PitrTarget.parse(history.at_t.isoformat()))
    time.sleep(1.05 - time.time() % 1)  # just after a second began: both start within it
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(restore, repo, chosen,
                               Into("scratch", work_dir=tmp_path, keep_running=True), server)
                   for _ in range(2)]
        wait(futures)
    reports = [f.result() for f in futures if f.exception() is None]
    try:
        assert [f.exception() for f in futures if f.exception() is not None] == []
        assert len({r.data_directory for r in reports}) == 2
        for report in reports:
            assert bench_state(copy_server(report, server), "bench") == history.state_at_t
    finally:
        for report in reports:
            stop_copy(report)


# -- in Dagster ------------------------------------------------------------------------------

def _resources(server: PostgresServer, repo_dir: Path, webhook: str = "") -> dict:
    return {"repository": BackupRepositoryResource(location=str(repo_dir),
                                                   encrypt_to=str(KEY.recipient),
                                                   identity=KEY.encode()),
            "postgres": PostgresResource(host=server.host, port=server.port, user=server.user,
                                         password=server.password, databases="bench"),
            "alerts": AlertResource(webhook_url=webhook or None)}


def test_the_assets_take_verify_and_retain_a_base_backup_and_check_an_hour(
        server, repo, repo_dir, receiver, history):
    """Today's base backup through Dagster (committed, verified with its WAL, retained), an
    hour of WAL checked, the current hour refused (not over)."""
    instance = dg.DagsterInstance.ephemeral()
    today = pitr_defs.DAILY_PARTITIONS.get_partition_key_for_timestamp(time.time())
    result = dg.materialize([pitr_defs.postgres_base_backup,
                             pitr_defs.postgres_base_backup_verified,
                             pitr_defs.postgres_pitr_retention], partition_key=today,
                            resources=_resources(server, repo_dir), instance=instance)
    assert result.success
    events = {e.asset_key.path[-1]: e.materialization.metadata
              for e in result.get_asset_materialization_events()}
    assert events["postgres_base_backup"]["tar_bytes"].value > 10_000_000
    assert events["postgres_base_backup_verified"]["manifest_files"].value > 100
    assert events["postgres_pitr_retention"]["base_backups_kept"].value == 2
    record = repo.get(BASE_STORE, today)
    assert record is not None and record.verified

    hour = pitr_defs.HOURLY_PARTITIONS.get_partition_key_for_timestamp(time.time())
    refused = dg.materialize([pitr_defs.postgres_wal], partition_key=hour,
                             resources=_resources(server, repo_dir), instance=instance,
                             raise_on_error=False)
    assert not refused.success
    assert "is not over yet" in _failure(refused)
    before = pitr_defs.HOURLY_PARTITIONS.get_partition_key_for_timestamp(time.time() - 3600)
    checked = dg.materialize([pitr_defs.postgres_wal], partition_key=before,
                             resources=_resources(server, repo_dir), instance=instance)
    [event] = checked.get_asset_materialization_events()
    assert event.materialization.metadata["segments"].value >= 0


def _failure(result) -> str:
    return " ".join(e.step_failure_data.error.to_string() for e in result.all_events
                    if e.is_step_failure)


def test_the_lag_sensor_plots_the_rpo_and_alerts_once_and_on_recovery(
        server, repo, repo_dir, receiver, history, monkeypatch):
    """Lag 0 recorded when archived; the receiver killed under writes: one alert past the
    threshold (not one per tick); restarted: one recovery alert."""
    monkeypatch.setattr(pitr_defs, "LAG_ALERT_MINUTES", 2 / 60)  # 2 s
    instance = dg.DagsterInstance.ephemeral()
    with webhook_server() as (url, received):
        resources = _resources(server, repo_dir, url)
        wait_caught_up(repo, server, receiver)
        first = pitr_defs.postgres_wal_lag_sensor(
            dg.build_sensor_context(instance=instance, resources=resources))
        [observed] = first.asset_events
        assert observed.asset_key == pitr_defs.postgres_wal.key
        assert observed.metadata["lag_seconds"].value == 0.0 and received == []
        receiver.kill()
        try:
            query(server, "bench", "UPDATE pgbench_branches SET bbalance = bbalance + 1")
            time.sleep(3)
            for _ in range(2):  # alerted once, not on every tick
                late = pitr_defs.postgres_wal_lag_sensor(dg.build_sensor_context(
                    instance=instance, resources=resources, cursor=first.cursor))
                first = late
            assert late.asset_events[0].metadata["lag_seconds"].value >= 2
            assert [r["json"]["kind"] for r in received] == ["rpo_breached"]
            assert "not in use" in received[0]["json"]["text"]
        finally:
            receiver.start()
        wait_caught_up(repo, server, receiver)
        back = pitr_defs.postgres_wal_lag_sensor(dg.build_sensor_context(
            instance=instance, resources=resources, cursor=late.cursor))
        assert back.asset_events[0].metadata["lag_seconds"].value == 0.0
        assert [r["json"]["kind"] for r in received] == ["rpo_breached", "rpo_recovered"]


def test_the_restore_job_refuses_with_the_reachable_times_and_recovers(
        server, repo_dir, history, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    resources = _resources(server, repo_dir)
    refused = pitr_defs.restore_postgres_pitr_job.execute_in_process(
        run_config={"ops": {"restore_postgres_pitr": {"config": {
            "target_time": "2020-01-01T00:00:00Z", "work_directory": str(tmp_path)}}}},
        resources=resources, instance=instance, raise_on_error=False)
    assert not refused.success and "reachable: " in _failure(refused)
    assert list(tmp_path.iterdir()) == []
    done = pitr_defs.restore_postgres_pitr_job.execute_in_process(
        run_config={"ops": {"restore_postgres_pitr": {"config": {
            "target_time": history.at_t.isoformat(), "mode": "databases",
            "databases": ["bench"], "target_names": {"bench": "bench_at_t"}}}}},
        resources=resources, instance=instance)
    try:
        report = done.output_for_node("restore_postgres_pitr")
        assert report["databases"] == {"bench": "bench_at_t"}
        assert bench_state(server, "bench_at_t") == history.state_at_t
        assert report["comparisons"]["bench"]["differences"] == []
        assert datetime.fromisoformat(report["reached_at"]) <= history.at_t
    finally:
        pgutil.drop_database(server, "bench_at_t")


def test_an_honest_backfill_holds_its_window_end_and_a_live_one_says_why(
        server, repo, repo_dir, history, tmp_path):
    """A dump for a window that ended at T, taken later: from a recovery to T, so it holds the
    state at T, and its manifest says so. A partition the archive cannot reach (yesterday:
    older than every base backup) is dumped live, and says why."""
    chosen, point = backfill.choose_source(repo, history.at_t, history.at_t + timedelta(hours=1))
    assert chosen is not None and point["source"] == "pitr"
    private = BackupRepository(FilesystemBackend(tmp_path / "dumps"))
    with private.begin("postgres", "late", "test") as pending:
        outcome = backfill.backup_at(repo, chosen, server, pending, point, databases=["bench"],
                                     timeout_s=600)
        pending.commit(outcome)
    record = private.get("postgres", "late")
    assert record.manifest.recovery_point["source"] == "pitr"
    assert datetime.fromisoformat(record.manifest.recovery_point["reached_at"]) <= history.at_t
    restored = pg_engine.restore(private, record, server, source_database="bench",
                                 target_database="bench_backfilled", timeout_s=600)
    try:
        assert restored.comparison.matches
        assert bench_state(server, "bench_backfilled") == history.state_at_t
    finally:
        pgutil.drop_database(server, "bench_backfilled")

    yesterday = pitr_defs.DAILY_PARTITIONS.get_partition_key_for_timestamp(time.time() - 86400)
    live = dg.materialize([pg_defs.postgres_backup], partition_key=yesterday,
                          resources=_resources(server, repo_dir),
                          instance=dg.DagsterInstance.ephemeral())
    [event] = live.get_asset_materialization_events()
    said = event.materialization.metadata["recovery_point"].value
    assert said["source"] == "live" and "cannot reach" in said["why"]
    assert repo.get("postgres", yesterday).manifest.recovery_point == said


def test_restore_all_to_a_point_lands_postgres_on_it_by_pitr(server, repo, history):
    """restore_all with a point in time: PostgreSQL from a recovery to exactly that point, not
    from the daily dump chosen for it (which holds a later state)."""
    _, record = take_backup(repo, "postgres", "2026-01-02", lambda pending: pg_engine.backup(
        server, pending, databases=["bench"], timeout_s=600))
    entry = recovery.PostgresRecovery(server, 600, ["bench"], point=history.at_t)
    [restored] = recovery.restore_all(repo, [entry], {"postgres": record})
    try:
        assert restored.partition_key.startswith("pitr from ")
        assert restored.matches_manifest and restored.counts["wal_segments"] >= 1
        [target] = restored.handle.values()
        assert bench_state(server, target) == history.state_at_t
    finally:
        for target in (restored.handle or {}).values():
            pgutil.drop_database(server, target)


def test_latest_after_the_server_is_killed(pg_stack, server, repo, receiver, base, tmp_path):
    """Next to last: it SIGKILLs the shared server (and restarts it through the stack). The
    archive's end is the last complete segment: every row written before the archive last
    held the server's position is restored, at most the unarchived tail is missing."""
    pgutil.create_database(server, "crash", "CREATE TABLE rows (id int PRIMARY KEY, "
                                            "at timestamptz NOT NULL DEFAULT clock_timestamp())")
    conn = connect(server, "crash")
    try:
        with conn.cursor() as cur:
            for i in range(1, 41):
                cur.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
        wait_caught_up(repo, server, receiver)
        confirmed = 40  # archived: the archive held the server's flushed position
        with conn.cursor() as cur:
            for i in range(41, 51):
                cur.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
    finally:
        conn.close()
    data_dir = pg_stack.root / "postgres" / "data"
    pid = postmaster_pid(data_dir)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)

    status = archive_status(repo)
    assert status is not None and status.archived_lsn
    report = restore(repo, plan(repo, LATEST),
                     Into("scratch", work_dir=tmp_path, keep_running=True), server)
    with running_copy(report, server) as copy:
        ids = [r[0] for r in query(copy, "crash", "SELECT id FROM rows ORDER BY id")]
    assert ids == list(range(1, len(ids) + 1)), "no hole: a prefix of what was written"
    assert confirmed <= len(ids) <= 50, ids

    pg_stack.up(seed=False)  # restarts the dead server (crash recovery) for what follows
    assert int(pg_stack.env()["RAG_PG_PORT"]) == server.port
    assert query(server, "crash", "SELECT count(*) FROM rows") == [(50,)]


def test_in_place_then_the_archive_goes_on_on_the_new_timeline(pg_stack, server, repo,
                                                               receiver, history, tmp_path):
    """Last: the stack's server is stopped, its data directory replaced by the cluster at T
    (in place) and started again: it is on timeline 2 now. The running receiver archives what
    it writes from then on (the new timeline's history and segments), the lag is not 0 before
    it has, and a restore to 'latest' follows the new timeline."""
    data_dir = pg_stack.root / "postgres" / "data"
    pg_stack.down()
    report = restore_to_time(repo, server, target=PitrTarget.parse(history.at_t.isoformat()),
                             into=Into("in_place", data_directory=data_dir,
                                       confirm=str(data_dir)))
    assert report.kept_aside and (Path(report.kept_aside) / "PG_VERSION").exists()
    assert report.data_directory == str(data_dir)
    assert not (data_dir / "recovery.signal").exists()
    pg_stack.up(seed=False)
    assert int(pg_stack.env()["RAG_PG_PORT"]) == server.port
    assert bench_state(server, "bench") == history.state_at_t
    assert "recv" not in pgutil.databases(server), "created after T"

    query(server, "bench", "CREATE TABLE after_in_place AS SELECT g FROM generate_series(1, 500) g")
    after = server_now(server)
    ((segment,),) = query(server, "postgres",
                          "SELECT pg_walfile_name(pg_current_wal_flush_lsn())")
    assert segment.startswith("00000002"), segment
    wrong = []  # every way the archive fails the new timeline, in one report
    lag = current_lag(repo, server)
    if lag.seconds == 0:
        wrong.append("the lag is 0 while the server's WAL on timeline 2 is not in the archive "
                     f"(its LSN is below the old timeline's end): {lag}")
    deadline = time.monotonic() + 15
    while (status := archive_status(repo)) is None or status.updated_at <= after:
        assert time.monotonic() < deadline, f"no receiver status after {after}"
        time.sleep(0.3)
    try:
        later = plan(repo, PitrTarget.parse(after.isoformat()))
        if later.timeline != 2:
            wrong.append(f"a time after the in-place restore ({after.isoformat()}) is planned "
                         f"on timeline {later.timeline}, the abandoned history, with "
                         f"{later.reachable.describe()}")
    except InvalidRequest:
        pass  # not reachable (yet): right
    try:
        wait_for_segment(repo, segment, receiver, timeout_s=45)
    except AssertionError as exc:
        wrong.append(str(exc))
    assert wrong == [], "\n".join(wrong)
    assert "00000002.history" in repo.wal.histories()
    chosen = plan(repo, LATEST)
    assert chosen.timeline == 2
    report = restore(repo, chosen, Into("scratch", work_dir=tmp_path, keep_running=True), server)
    with running_copy(report, server) as copy:
        assert bench_state(copy, "bench") == history.state_at_t
        assert query(copy, "bench", "SELECT count(*) FROM after_in_place") == [(500,)]
