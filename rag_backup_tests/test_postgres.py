"""PostgreSQL end to end against the stack's real server: engine, assets, restore job."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from rag_backup.defs import postgres as pg_defs
from rag_backup.defs.resources import BackupRepositoryResource, PostgresResource
from rag_backup.engines import postgres as engine
from rag_backup.engines.postgres import toc
from rag_backup.errors import (
    BackupExpired,
    BackupNotFound,
    BackupUnverified,
    ConfirmationRequired,
    CredentialsRejected,
    DamagedBackup,
    IntegrityError,
)
from rag_backup.repository import BackupRepository
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil
from rag_backup_tests.conftest import take_backup as committed
from rag_backup_tests.killing import kill_backup_while_writing

STACK_SERVICES = ("postgres",)  # the stores these tests need (see conftest)

TODAY = utcnow().strftime("%Y-%m-%d")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def take_backup(repo: BackupRepository, pg: engine.PostgresServer, database: str,
                partition: str = TODAY, verify: bool = True):
    return committed(repo, "postgres", partition,
                     lambda pending: engine.backup(pg, pending, databases=[database]),
                     (lambda record: engine.verify(repo, record)) if verify else None)


@pytest.fixture
def rich_db(pg):
    name = unique("rich")
    pgutil.create_database(pg, name)
    yield name
    pgutil.drop_database(pg, name)


def test_round_trip_restores_an_identical_database(pg, repo, rich_db):
    outcome, record = take_backup(repo, pg, rich_db)
    fp = outcome.fingerprint["databases"][rich_db]
    assert fp["tables"]["app.documents"] == 5000
    assert fp["tables"]["audit.events"] == 500
    assert fp["tables"]["Mixed Case.odd table"] == 3
    assert fp["large_objects"] == 1
    original = pgutil.plain_dump(pg, rich_db)
    assert "दस्तावेज़ 17" in original
    assert "SELECT pg_catalog.setval('audit.ticket_seq', 4242" in original

    pgutil.drop_database(pg, rich_db)
    report = engine.restore(repo, record, pg, source_database=rich_db, target_database=rich_db)

    assert report.matches_manifest and not report.replaced_existing
    assert report.comparison.not_run == {} and report.comparison.differences == []
    # views, a materialized view (and its data), a function, schemas with odd names, the GIN
    # index, constraints, sequences with their values and the large object were all compared
    assert report.comparison.compared["objects"] >= 15
    assert report.comparison.compared["sequence_values"] == 3
    assert report.comparison.compared["table_rows"] == 3
    assert report.rows == fp["rows"] and report.large_objects == 1
    assert pgutil.plain_dump(pg, rich_db) == original


# The rich schema without its large object (whose data block may hold any bytes), plus an
# empty table and bytes that COPY text escapes (a zero byte, a tab, a newline).
TABLES_ONLY = pgutil.RICH_SCHEMA.replace(
    "SELECT lo_from_bytea(0, convert_to('बड़ा ऑब्जेक्ट — a large object', 'UTF8'));", "") + r"""
CREATE TABLE app.nothing_yet (x int);
CREATE TABLE app.blobs (b bytea, t text);
INSERT INTO app.blobs VALUES ('\x0000000000010000000000'::bytea, E'tab\there\nnewline');
"""
HEADER_END = 51  # magic, version, sizes, format, compression level, creation time (7 ints)


def native_archive(pg, database: str, path: Path, *, piped: bool) -> bytes:
    """``pg_dump -Fc -Z0`` (the native tool) to a file, or through a pipe as our backups do."""
    argv = [pg.tool("pg_dump"), "--format=custom", "--compress=0", "--no-password",
            f"--dbname={pg.dsn(database)}"]
    env = {"PGPASSWORD": pg.password, "PATH": "/usr/bin:/bin"}
    if piped:
        out = subprocess.run(argv, capture_output=True, timeout=300, env=env, check=True).stdout
        path.write_bytes(out)
    else:
        subprocess.run([*argv, f"--file={path}"], timeout=300, env=env, check=True)
    return path.read_bytes()


def test_a_piped_archive_gets_the_data_offsets_pg_dump_writes_to_a_file(pg, repo, tmp_path):
    name = unique("offsets")
    pgutil.create_database(pg, name, TABLES_ONLY)
    try:
        piped = native_archive(pg, name, tmp_path / "piped.dump", piped=True)
        seekable = native_archive(pg, name, tmp_path / "seekable.dump", piped=False)
        assert len(piped) == len(seekable) and piped[HEADER_END:] != seekable[HEADER_END:]

        message = toc.set_data_offsets(tmp_path / "piped.dump")

        # byte for byte what pg_dump writes when it can seek (but the creation time)
        assert message == "data offsets written for 5 tables"
        assert (tmp_path / "piped.dump").read_bytes()[HEADER_END:] == seekable[HEADER_END:]
        assert toc.set_data_offsets(tmp_path / "seekable.dump") == (
            "archive already has its data offsets")

        # and a restore through them (pg_restore --jobs 2) is complete and checked
        outcome, record = take_backup(repo, pg, name)
        lines: list[str] = []
        report = engine.restore(repo, record, pg, source_database=name,
                                target_database=name + "_copy", log=lines.append)
        assert any("data offsets written for 5 tables" in line for line in lines), lines
        assert report.matches_manifest and report.comparison.differences == []
        assert report.rows == outcome.fingerprint["databases"][name]["rows"]
        assert pgutil.execute(pg, name + "_copy", "SELECT encode(b, 'hex'), t FROM app.blobs") == [
            ("0000000000010000000000", "tab\there\nnewline")]
    finally:
        pgutil.drop_database(pg, name)
        pgutil.drop_database(pg, name + "_copy")


@pytest.mark.parametrize("size", [1, 2, 5, 10, 11, 12, 1 << 20])
def test_block_marks_are_found_however_the_writes_cut_them(size):
    data = (b"head" + toc.MARK + (7).to_bytes(4, "little") + b"\n" + toc.MARK
            + (9).to_bytes(4, "little") + b"row\n" * 3 + toc.MARK + (11).to_bytes(4, "little"))
    marks = toc.BlockMarks()
    for start in range(0, len(data), size):
        marks.write(data[start:start + size])
    assert marks.found == [(9, 7), (21, 9), (44, 11)]


def test_an_archive_with_large_objects_keeps_its_unset_offsets(pg, rich_db, tmp_path):
    piped = native_archive(pg, rich_db, tmp_path / "piped.dump", piped=True)
    assert toc.set_data_offsets(tmp_path / "piped.dump") == (
        "data offsets left to pg_restore: the archive holds BLOBS")
    assert (tmp_path / "piped.dump").read_bytes() == piped


def test_row_counts_come_from_the_dump_snapshot(pg, repo, rich_db):
    """Rows committed while the dump runs are in neither the archive nor the fingerprint."""
    outcome, record = take_backup(repo, pg, rich_db)
    pgutil.execute(pg, rich_db, "INSERT INTO app.documents (title) VALUES ('after')")
    target = unique("snap")
    try:
        report = engine.restore(repo, record, pg, source_database=rich_db, target_database=target)
        assert report.rows == outcome.fingerprint["databases"][rich_db]["rows"]
        assert pgutil.execute(pg, target, "SELECT count(*) FROM app.documents") == [(5000,)]
    finally:
        pgutil.drop_database(pg, target)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_artifact_fails_verification_and_restore(pg, repo, repo_dir, rich_db, damage):
    _, record = take_backup(repo, pg, rich_db, verify=False)
    path = Path(record.location) / f"{rich_db}.dump.zst"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=r"dump\.zst") as caught:
        engine.verify(repo, record)
    assert ("sha256" in str(caught.value)) if damage == "flip" else ("bytes" in str(caught.value))

    before = pgutil.databases(pg)
    with pytest.raises(IntegrityError):
        engine.restore(repo, record, pg, source_database=rich_db, target_database=unique("bad"))
    assert pgutil.databases(pg) == before


def test_a_killed_backup_leaves_no_manifest_and_the_previous_backup_intact(pg, repo, repo_dir):
    big = unique("big")
    pgutil.create_database(pg, big, schema_sql="")
    pgutil.execute(pg, big, "CREATE TABLE t AS SELECT g AS id, md5(g::text) || md5((g+1)::text) "
                            "AS payload FROM generate_series(1, 1500000) g")
    try:
        _, first = take_backup(repo, pg, big)
        kill_backup_while_writing(
            store="postgres", repo_dir=repo_dir, partition=TODAY, password=pg.password,
            server=f"engine.PostgresServer({pg.host!r}, {pg.port}, {pg.user!r}, os.environ['PW'])",
            backup_args=f", databases=[{big!r}]")
        partition = repo_dir / "postgres" / TODAY

        after = repo.get("postgres", TODAY)
        assert after is not None and after.backup_id == first.backup_id
        assert after.verified
        engine.verify(repo, after)  # the previous artifacts are untouched
        strays = [p.name for p in partition.iterdir() if p.is_dir() and p.name != first.backup_id]
        assert len(strays) == 1  # the killed backup's directory, ignored by readers

        # The next commit removes only the backup it replaces, never another run's directory
        # (that run might be alive); retention collects the dead run's once stale.
        _, second = take_backup(repo, pg, big)
        assert sorted(p.name for p in partition.iterdir() if p.is_dir()) == sorted(
            strays + [second.backup_id])
        assert repo.collect_abandoned_backups("postgres") == []  # young: kept
        gone = repo.collect_abandoned_backups("postgres", older_than=timedelta(0))
        assert [g.location for g in gone if g.kind == "abandoned backup"] == [
            str(partition / strays[0])]
        assert sorted(p.name for p in partition.iterdir() if p.is_dir()) == [second.backup_id]
    finally:
        pgutil.drop_database(pg, big)


def test_a_server_that_goes_away_mid_dump_is_retried_and_commits_nothing(pg, repo):
    """pg_dump's backend terminated mid-COPY (as a restart or failover does) is transient:
    StoreWentAway, which the assets retry like an unreachable server, with pg_dump's own words;
    no manifest is committed."""
    import threading

    from rag_backup.defs.common import retry_when_unreachable
    from rag_backup.errors import StoreUnreachable, StoreWentAway

    db = unique("goes_away")
    pgutil.create_database(pg, db, schema_sql="")
    pgutil.execute(pg, db, "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 8) AS payload "
                           "FROM generate_series(1, 600000) g")
    outcome: dict = {}

    def take() -> None:
        try:
            with repo.begin("postgres", TODAY, "t") as pending:
                engine.backup(pg, pending, databases=[db])
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    worker = threading.Thread(target=take)
    admin = pg.connect("postgres")
    admin.autocommit = True
    try:
        worker.start()
        deadline = time.monotonic() + 60
        terminated = False
        with admin.cursor() as cur:
            while not terminated:
                assert worker.is_alive() and time.monotonic() < deadline, "no COPY seen"
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND query LIKE 'COPY %%'", (db,))
                terminated = any(row[0] for row in cur.fetchall())
        worker.join(timeout=120)
    finally:
        admin.close()
        pgutil.drop_database(pg, db)
    error = outcome.get("error")
    assert isinstance(error, StoreWentAway), error
    assert isinstance(error, StoreUnreachable)
    assert f"pg_dump of database {db!r}" in str(error)
    assert "terminating connection" in str(error) or "closed the connection" in str(error)
    assert repo.get("postgres", TODAY) is None
    with pytest.raises(dg.RetryRequested), retry_when_unreachable():
        raise error


def test_restore_over_an_existing_database_needs_its_name_as_confirmation(pg, repo, rich_db):
    _, record = take_backup(repo, pg, rich_db)
    pgutil.execute(pg, rich_db, "DELETE FROM audit.events")
    before = pgutil.databases(pg)
    with pytest.raises(ConfirmationRequired, match=f"set confirm to '{rich_db}'"):
        engine.restore(repo, record, pg, source_database=rich_db, target_database=rich_db,
                       confirm="yes")
    assert pgutil.execute(pg, rich_db, "SELECT count(*) FROM audit.events") == [(0,)]
    assert pgutil.databases(pg) == before

    report = engine.restore(repo, record, pg, source_database=rich_db,
                            target_database=rich_db, confirm=rich_db)
    assert report.replaced_existing
    assert pgutil.execute(pg, rich_db, "SELECT count(*) FROM audit.events") == [(500,)]
    assert pgutil.databases(pg) == before  # no staging or replaced database left behind


def test_wrong_password_is_a_clear_error_that_changes_nothing(pg, repo, rich_db):
    _, record = take_backup(repo, pg, rich_db)
    wrong = engine.PostgresServer(pg.host, pg.port, pg.user, "not-the-password")
    before = pgutil.databases(pg)
    with pytest.raises(CredentialsRejected, match="password authentication failed"):
        engine.restore(repo, record, wrong, source_database=rich_db,
                       target_database=unique("never"))
    assert pgutil.databases(pg) == before
    with repo.begin("postgres", "2026-11-02", "r") as pending, \
            pytest.raises(CredentialsRejected, match="RAG_PG_PASSWORD"):
        engine.backup(wrong, pending, databases=[rich_db])
    assert repo.get("postgres", "2026-11-02") is None


def test_resolve_explains_unknown_expired_and_unverified_partitions(pg, repo, rich_db):
    with pytest.raises(BackupNotFound, match="no verified backup"):
        repo.resolve("postgres", "latest")
    take_backup(repo, pg, rich_db, partition="2026-11-20", verify=False)
    with pytest.raises(BackupNotFound, match="no backup for partition '2026-11-19'.*2026-11-20"):
        repo.resolve("postgres", "2026-11-19")
    with pytest.raises(BackupUnverified, match="has not been verified"):
        repo.resolve("postgres", "2026-11-20")
    repo.delete("postgres", "2026-11-20", "retention: older than the window")
    with pytest.raises(BackupExpired, match="was deleted on .*retention: older than the window"):
        repo.resolve("postgres", "2026-11-20")


# -- through Dagster -----------------------------------------------------------------------

def resources(pg, repo_dir: Path, password: str | None = None) -> dict:
    return {
        "repository": BackupRepositoryResource(location=str(repo_dir)),
        "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                     password=pg.password if password is None else password,
                                     databases="ragqa"),
    }


def materialize(pg, repo_dir, partition, instance, selection=None, **kwargs):
    return dg.materialize(
        selection or [pg_defs.postgres_backup, pg_defs.postgres_backup_verified,
                      pg_defs.postgres_retention],
        partition_key=partition, instance=instance, resources=resources(pg, repo_dir),
        raise_on_error=False, **kwargs)


def test_assets_back_up_verify_and_report_metadata(pg, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(pg, repo_dir, TODAY, instance)
    assert result.success
    [backup] = [m for m in result.asset_materializations_for_node("postgres_backup")]
    meta = backup.metadata
    expected_rows = sum(pgutil.execute(pg, "ragqa", f"SELECT count(*) FROM {t}")[0][0]
                        for t in ("documents", "conversations", "feedback"))
    assert meta["rows"].value >= expected_rows > 0
    assert meta["size_bytes"].value > 0 and meta["duration_s"].value > 0
    assert meta["backup_id"].value == repo.get("postgres", TODAY).backup_id
    assert repo.get("postgres", TODAY).verified
    assert "password" not in str(meta).lower()
    record = repo.get("postgres", TODAY)
    fp = engine.fingerprint_of(record)
    assert (meta["tables"].value, meta["rows"].value, meta["databases"].value) == (
        fp.tables, fp.rows, len(fp.databases))
    assert fp.rows == sum(d.rows for d in fp.databases.values()) and "ragqa" in fp.databases
    # the partition's window, as Dagster gives it, is in the manifest
    window = pg_defs.DAILY_PARTITIONS.time_window_for_partition_key(TODAY)
    assert record.manifest.format_version == 2
    assert (record.manifest.window.start, record.manifest.window.end) == (window.start,
                                                                           window.end)


FINGERPRINT_ON_DISK = {  # a PostgreSQL fingerprint as every release has written it
    "databases": {"ragqa": {"encoding": "UTF8", "lc_collate": "C.UTF-8", "lc_ctype": "C.UTF-8",
                            "tables": {"public.documents": 5, "public.feedback": 0},
                            "large_objects": 1, "rows": 5}},
    "tables": 2, "rows": 5, "globals_include_role_passwords": False}


def test_the_typed_fingerprint_reads_and_writes_the_manifests_dict_unchanged():
    fp = engine.PostgresFingerprint.from_dict(FINGERPRINT_ON_DISK)
    assert (fp.tables, fp.rows, fp.globals_include_role_passwords) == (2, 5, False)
    assert fp.databases["ragqa"].tables == {"public.documents": 5, "public.feedback": 0}
    assert fp.databases["ragqa"].large_objects == 1
    assert fp.to_dict() == FINGERPRINT_ON_DISK
    older = {k: v for k, v in FINGERPRINT_ON_DISK.items()
             if k != "globals_include_role_passwords"}
    assert engine.PostgresFingerprint.from_dict(older).globals_include_role_passwords


@pytest.mark.parametrize("change, error", [
    ({"databases": None}, "no 'databases' object"),
    ({"rows": 6}, "total rows 6 is not the sum over its databases (5)"),
    ({"databases": {"ragqa": {**FINGERPRINT_ON_DISK["databases"]["ragqa"],
                              "large_objects": -1}}},
     "database 'ragqa': large_objects is -1, not a count"),
    ({"databases": {"ragqa": {**FINGERPRINT_ON_DISK["databases"]["ragqa"],
                              "tables": {"public.documents": "5"}}}},
     "database 'ragqa': tables is not an object of table: row count"),
])
def test_an_invalid_fingerprint_is_a_damaged_backup_naming_it(repo, change, error):
    with repo.begin("postgres", "2026-11-20", "t") as pending:
        with pending.artifact("data") as out:
            out.write(b"x")
        pending.commit(engine.BackupOutcome({**FINGERPRINT_ON_DISK, **change}, {}, "15"))
    record = repo.get("postgres", "2026-11-20")
    with pytest.raises(DamagedBackup, match="the manifest of postgres backup 2026-11-20 ") as exc:
        engine.fingerprint_of(record)
    assert error in str(exc.value)


def test_a_partition_outside_the_window_is_refused(pg, repo, repo_dir):
    old = (utcnow() - timedelta(days=45)).strftime("%Y-%m-%d")
    result = materialize(pg, repo_dir, old, dg.DagsterInstance.ephemeral(),
                         selection=[pg_defs.postgres_backup])
    assert not result.success
    assert "outside the 30.0 days retention window" in str(result.failure_data_for_node(
        "postgres_backup").error)
    assert repo.get("postgres", old) is None


def test_a_failed_verification_is_recorded_and_blocks_restore(pg, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(pg, repo_dir, TODAY, instance,
                       selection=[pg_defs.postgres_backup]).success
    record = repo.get("postgres", TODAY)
    (Path(record.location) / "ragqa.dump.zst").write_bytes(b"garbage")
    result = materialize(pg, repo_dir, TODAY, instance,
                         selection=[pg_defs.postgres_backup_verified])
    assert not result.success
    record = repo.get("postgres", TODAY)
    assert record.verification is not None and not record.verification.ok
    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=restore_config(partition_key=TODAY), resources=resources(pg, repo_dir),
        instance=instance, raise_on_error=False)
    assert not run.success
    assert "failed verification" in str(run.failure_data_for_node("restore_postgres").error)


def test_retention_deletes_expired_backups_keeps_the_newest_verified_and_wipes_the_ui(
        pg, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    day = lambda n: (utcnow() - timedelta(days=n)).strftime("%Y-%m-%d")  # noqa: E731
    take_backup(repo, pg, "ragqa", partition=day(60), verify=True)   # newest verified: kept
    take_backup(repo, pg, "ragqa", partition=day(40), verify=False)  # expired, unverified
    take_backup(repo, pg, "ragqa", partition=day(70), verify=True)   # expired, older verified
    take_backup(repo, pg, "ragqa", partition=day(3), verify=False)   # inside the window
    for n in (60, 40, 70, 3):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key="postgres_backup", partition=day(n)))

    dry = materialize(pg, repo_dir, TODAY, instance, selection=[pg_defs.postgres_retention],
                      run_config={"ops": {"postgres_retention": {"config": {"dry_run": True}}}})
    assert dry.success
    assert sorted(repo.partitions("postgres")) == sorted([day(70), day(60), day(40), day(3)])

    result = materialize(pg, repo_dir, TODAY, instance, selection=[pg_defs.postgres_retention])
    assert result.success
    assert sorted(repo.partitions("postgres")) == sorted([day(60), day(3)])
    [mat] = result.asset_materializations_for_node("postgres_retention")
    assert mat.metadata["backups_deleted"].value == 2
    shown = instance.get_materialized_partitions(dg.AssetKey("postgres_backup"))
    assert shown == {day(60), day(3)}
    for n in (40, 70):
        [obs] = [e.asset_observation_data.asset_observation for e in
                 (r.event_log_entry.dagster_event for r in instance.fetch_observations(
                     dg.AssetKey("postgres_backup"), limit=10).records)
                 if e.partition == day(n)]
        assert obs.metadata["present"].value is False
        assert "older than the 30.0 days window" in obs.metadata["deleted_because"].value

    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=restore_config(partition_key=day(40)), resources=resources(pg, repo_dir),
        instance=instance, raise_on_error=False)
    assert not run.success
    assert "deleted on" in str(run.failure_data_for_node("restore_postgres").error)


def restore_config(**fields) -> dg.RunConfig:
    return dg.RunConfig(ops={"restore_postgres": pg_defs.RestorePostgresConfig(**fields)})


def test_restore_job_restores_latest_verified_into_a_scratch_database(pg, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(pg, repo_dir, TODAY, instance).success
    before = pgutil.databases(pg)
    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=restore_config(), resources=resources(pg, repo_dir), instance=instance)
    assert run.success
    out = run.output_for_node("restore_postgres")
    created = pgutil.databases(pg) - before
    try:
        assert created == {out["target_database"]}
        assert out["target_database"].startswith("ragqa_restore_")
        assert out["rows"] == repo.get("postgres", TODAY).manifest.fingerprint["rows"] - sum(
            d["rows"] for name, d in
            repo.get("postgres", TODAY).manifest.fingerprint["databases"].items()
            if name != "ragqa")
        assert pgutil.execute(pg, out["target_database"], "SELECT count(*) FROM documents") == \
            pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")
    finally:
        for name in created:
            pgutil.drop_database(pg, name)


def test_restore_job_refusals_change_nothing(pg, repo, repo_dir):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(pg, repo_dir, TODAY, instance).success
    before = pgutil.databases(pg)
    cases = [
        (restore_config(partition_key="2026-02-30"), "no backup for partition '2026-02-30'"),
        (restore_config(partition_key=TODAY, target_database="ragqa"), "set confirm to 'ragqa'"),
        (restore_config(source_database="nope"), "has no database 'nope'"),
    ]
    for config, message in cases:
        run = pg_defs.restore_postgres_job.execute_in_process(
            run_config=config, resources=resources(pg, repo_dir), instance=instance,
            raise_on_error=False)
        assert not run.success
        assert message in str(run.failure_data_for_node("restore_postgres").error)
    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=restore_config(), resources=resources(pg, repo_dir, password="wrong"),
        instance=instance, raise_on_error=False)
    assert "password authentication failed" in str(
        run.failure_data_for_node("restore_postgres").error)
    assert pgutil.databases(pg) == before
