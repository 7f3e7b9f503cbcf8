"""Restoring every store to one point in time, and the automated restore drill."""

from __future__ import annotations

import _thread
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from rag_backup import consistency
from rag_backup import recovery as plain
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
from rag_backup.engines import milvus as milvus_engine
from rag_backup.engines.milvus.staging import STAGING_TAG
from rag_backup.engines import minio as minio_engine
from rag_backup.engines import postgres as pg_engine
from rag_backup.errors import ConfirmationRequired, InvalidRequest
from rag_backup.repository import BackupRepository, FilesystemBackend, S3Backend
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil

DAY = utcnow().strftime("%Y-%m-%d")
HOUR = utcnow().strftime("%Y-%m-%d-%H:00")
SERVICE_DB = "kb_drill"  # a second service database, not named ragqa
MISSING_THUMB = "thumbnails/never-uploaded.png"


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
                                     password=pg.password, databases=f"ragqa,{SERVICE_DB}"),
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


def create_service_db(pg) -> None:
    """``kb_drill.lib.papers``: one row per document with an image (``pid`` its id, so its
    ``ministry_images`` vector id), ``file_ref`` its object's key in bucket ``documents``,
    ``thumb_ref`` its image's key, except one that was never uploaded."""
    documents = pgutil.execute(pg, "ragqa", "SELECT id, object_key, image_key FROM documents "
                                            "WHERE image_key IS NOT NULL ORDER BY id")
    rows = ", ".join(f"({i}, '{key.split('/', 1)[1]}', "
                     f"'{MISSING_THUMB if n == 0 else image.split('/', 1)[1]}')"
                     for n, (i, key, image) in enumerate(documents))
    pgutil.create_database(pg, SERVICE_DB, "CREATE SCHEMA lib; CREATE TABLE lib.papers ("
                           "pid bigint PRIMARY KEY, file_ref text NOT NULL, thumb_ref text);"
                           f"INSERT INTO lib.papers VALUES {rows};")


@pytest.fixture(scope="module")
def backed_up(pg, resources):
    """Verified backups of PostgreSQL (ragqa and kb_drill), Redis, MinIO and Milvus, taken by
    the real assets once for the module (the tests only read them)."""
    create_service_db(pg)
    instance = dg.DagsterInstance.ephemeral()
    for assets, key in (([pg_defs.postgres_backup, pg_defs.postgres_backup_verified], DAY),
                        ([redis_defs.redis_backup, redis_defs.redis_backup_verified], HOUR),
                        ([minio_defs.minio_backup, minio_defs.minio_backup_verified], DAY),
                        ([milvus_defs.milvus_backup, milvus_defs.milvus_backup_verified], DAY)):
        assert dg.materialize(assets, partition_key=key, instance=instance,
                              resources=resources).success
    yield instance
    pgutil.drop_database(pg, SERVICE_DB)


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


def remove_scratch(pg, s3, resources, databases: set[str], buckets_: set[str],
                   collections: list[str]) -> None:
    milvus_engine.drop_collections(resources["milvus"].server(), collections)
    for name in databases:
        pgutil.drop_database(pg, name)
    for bucket in buckets_:
        minio_engine.remove_bucket(resources["minio"].s3(), bucket,
                                   repo=resources["repository"].open())


def test_restore_all_restores_every_database_into_targets_of_one_timestamp(
        pg, s3, resources, backed_up, repo, tmp_path):
    databases_before, buckets_before = pgutil.databases(pg), buckets(s3)
    result = run_restore_all(resources, backed_up, scratch_dir=str(tmp_path / "scratch"))
    created = pgutil.databases(pg) - databases_before
    restored = result.output_for_node("restore_all_stores")["restored"] if result.success \
        else {}
    try:
        assert result.success, result.failure_data_for_node("restore_all_stores")
        # every database of the backup, by default; all targets named with one timestamp
        assert {name.rsplit("_pit_", 1)[0] for name in created} == {"ragqa", SERVICE_DB}
        assert created == set(restored["postgres"]["target"].split(", "))
        targets = [*created, restored["redis"]["target"],
                   *restored["minio"]["target"].split(", "),
                   *restored["milvus"]["target"].split(", ")]
        stamps = {re.search(r"[_-]pit[_-](\d{14})|redis-(\d{14})-", t) for t in targets}
        assert None not in stamps, targets
        assert len({m.group(1) or m.group(2) for m in stamps}) == 1, targets
        assert len(targets) == 2 + 1 + 2 + 2
        for db in ("ragqa", SERVICE_DB):
            query = "SELECT count(*) FROM " + ("documents" if db == "ragqa" else "lib.papers")
            [scratch_db] = [name for name in created if name.startswith(f"{db}_pit_")]
            assert pgutil.execute(pg, scratch_db, query) == pgutil.execute(pg, db, query)
        rdb = Path(restored["redis"]["target"])
        assert rdb.name == "dump.rdb" and rdb.stat().st_size > 0
        assert restored["redis"]["keys"] == repo.get("redis", HOUR).manifest.fingerprint["keys"]
        scratch_buckets = buckets(s3) - buckets_before
        assert scratch_buckets == set(restored["minio"]["target"].split(", "))
        assert restored["minio"]["buckets"] == 2 and restored["milvus"]["collections"] == 2
        for bucket in scratch_buckets:
            source = bucket.split("-pit-")[0]
            assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == \
                s3.list_objects_v2(Bucket=source)["KeyCount"]
        # every store reports the same shape: matches_manifest and what it compared
        [output] = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
        meta = output.event_specific_data.metadata
        for store in ("postgres", "redis", "minio", "milvus"):
            comparison = restored[store]["comparison"]
            assert restored[store]["matches_manifest"] is comparison["matches"] is True
            assert comparison["compared"] and not comparison["not_run"], (store, comparison)
            assert meta[f"{store}_matches_manifest"].value is True
            assert meta[f"{store}_differences"].value == 0
            for aspect, n in comparison["compared"].items():
                assert meta[f"{store}_compared_{aspect}"].value == n > 0
        assert restored["milvus"]["comparison"]["compared"]["collections"] == 2
        assert restored["milvus"]["comparison"]["compared"]["probe_searches"] > 0
        assert restored["redis"]["comparison"]["compared"] == {"rdb": 1, "rdb_bytes_sha256": 1}
    finally:
        remove_scratch(pg, s3, resources, created, buckets(s3) - buckets_before,
                       restored.get("milvus", {}).get("target", "").split(", ")
                       if restored else [])


def test_production_needs_every_confirmation(pg, resources, backed_up):
    before = pgutil.databases(pg)
    result = run_restore_all(resources, backed_up, into_production=True, stores=["postgres"])
    assert not result.success
    assert "set postgres_confirm to 'kb_drill,ragqa'" in str(
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


def plain_stores(resources) -> list[plain.StoreRecovery]:
    """The recovery table built from engine connections only, as a command line would."""
    return [plain.PostgresRecovery(resources["postgres"].server()),
            plain.RedisRecovery(resources["redis"].server()),
            plain.MinioRecovery(resources["minio"].s3()),
            plain.MilvusRecovery(resources["milvus"].server())]


def test_the_plain_module_checks_every_confirmation_before_restoring_anything(
        pg, resources, backed_up, repo):
    """Without Dagster: production with the last store unconfirmed restores no store (the
    confirmed ones before it included)."""
    oids = "SELECT oid, datname FROM pg_database ORDER BY oid"
    before = pgutil.execute(pg, "postgres", oids)
    plan = plain.plan(repo)
    assert list(plan.chosen) == list(plain.STORES)
    redis = resources["redis"]
    with pytest.raises(ConfirmationRequired,
                       match="set milvus_confirm to 'ministry_images,ministry_text'"):
        plain.restore_all(repo, plain_stores(resources), plan.chosen, production=True,
                          confirm={"postgres": "kb_drill,ragqa",
                                   "redis": f"{redis.host}:{redis.port}",
                                   "minio": "documents,models"})
    assert pgutil.execute(pg, "postgres", oids) == before  # no database was replaced
    with pytest.raises(InvalidRequest, match=r"no connection given for store\(s\) \['milvus'\]"):
        plain.restore_all(repo, plain_stores(resources)[:3], plan.chosen)
    with pytest.raises(InvalidRequest, match=r"unknown store\(s\) \['mongo'\]"):
        plain.plan(repo, ["postgres", "mongo"])
    with pytest.raises(InvalidRequest, match="point_in_time 'yesterday' is not an ISO 8601"):
        plain.plan(repo, [], "yesterday")


def closed_url() -> str:
    """An address on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Timed:
    """A real store's recovery entry, noting when its restore started and ended."""

    entry: plain.StoreRecovery
    span: list[float] = field(default_factory=list)

    @property
    def store(self) -> str:
        return self.entry.store

    def __getattr__(self, name):
        return getattr(self.entry, name)

    def restore(self, *args, **kwargs):
        self.span.append(time.monotonic())
        try:
            return self.entry.restore(*args, **kwargs)
        finally:
            self.span.append(time.monotonic())


def test_the_stores_restore_at_once_and_a_failure_leaves_the_others_restored(
        pg, resources, backed_up, repo, tmp_path):
    """All at once (their restores overlap in time); MinIO unreachable: PostgreSQL and Redis
    are still restored, the log says where, and MinIO's own error is raised."""
    minio = resources["minio"].s3()
    entries = [Timed(plain.PostgresRecovery(resources["postgres"].server(), databases=["ragqa"])),
               Timed(plain.RedisRecovery(resources["redis"].server(),
                                         scratch_dir=str(tmp_path))),
               Timed(plain.MinioRecovery(replace(minio, url=closed_url(), max_attempts=1)))]
    chosen = {s: r for s, r in plain.plan(repo).chosen.items() if s != "milvus"}
    lines: list[str] = []
    before = pgutil.databases(pg)
    try:
        with pytest.raises(Exception, match=r"127\.0\.0\.1") as failed:
            plain.restore_all(repo, entries, chosen, log=lines.append)
        assert not isinstance(failed.value, plain.StoresFailed)
        [created] = pgutil.databases(pg) - before
        assert created.startswith("ragqa_pit_")
        assert pgutil.execute(pg, created, "SELECT count(*) FROM documents") == \
            pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")
        [rdb] = tmp_path.glob("redis-*/dump.rdb")
        [summary] = [line for line in lines if line.startswith("minio: the restore failed")]
        assert f"restored meanwhile: postgres into {created}, redis into {rdb}" in summary
        assert any(line.startswith("postgres: ") for line in lines[:-1])
        starts, ends = [e.span[0] for e in entries], [e.span[1] for e in entries]
        assert max(starts) < min(ends), [e.span for e in entries]  # they ran at the same time
    finally:
        for name in pgutil.databases(pg) - before:
            pgutil.drop_database(pg, name)


def test_an_interrupted_run_stops_the_stores_still_restoring_and_leaves_no_staging_copy(
        pg, resources, backed_up, repo):
    """Ctrl-C (or a run terminated from the UI) while Milvus restores in its thread: Milvus is
    told to stop, drops the staging copy it was filling, and the interrupt reaches the caller
    once it did."""
    server = resources["milvus"].server()
    milvus = Timed(plain.MilvusRecovery(server))
    postgres = plain.PostgresRecovery(resources["postgres"].server(), databases=["ragqa"])
    chosen = {s: r for s, r in plain.plan(repo).chosen.items() if s in ("postgres", "milvus")}
    lines: list[str] = []

    def interrupt_once_milvus_restores(line: str) -> None:
        lines.append(line)
        if line.startswith("milvus: ") and not interrupted.is_set():
            interrupted.set()
            threading.Timer(0.5, _thread.interrupt_main).start()

    interrupted = threading.Event()
    before = pgutil.databases(pg)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            plain.restore_all(repo, [postgres, milvus], chosen,
                              log=interrupt_once_milvus_restores)
            time.sleep(5)  # the restores ended before the interrupt: it lands here (test fails)
        stopping = [line for line in lines if line.startswith("interrupted: stopping")]
        assert stopping and "milvus" in stopping[0], lines
        assert len(milvus.span) == 2  # its restore returned (raised) before the interrupt went on
        assert time.monotonic() - started < plain.STOP_GRACE_S
        with server.session() as client:
            restored = [c for c in client.list_collections() if "_pit_" in c]
        # a collection finished before the interrupt stays (as a store restored before it
        # does); the one being restored is dropped with its staging copy
        assert not [c for c in restored if STAGING_TAG in c], restored
        assert len(restored) < 2, restored
    finally:
        for name in pgutil.databases(pg) - before:
            pgutil.drop_database(pg, name)
        with server.session() as client:
            milvus_engine.drop_collections(server, [c for c in client.list_collections()
                                                    if "_pit_" in c])


def test_one_store_at_a_time_stops_at_the_first_failure_and_several_failures_name_each(
        pg, resources, backed_up, repo, tmp_path):
    minio = resources["minio"].s3()
    broken_minio = plain.MinioRecovery(replace(minio, url=closed_url(), max_attempts=1))
    server = resources["postgres"].server()
    broken_pg = plain.PostgresRecovery(replace(server, port=int(closed_url().rsplit(":", 1)[1])),
                                       databases=["ragqa"])
    working_pg = plain.PostgresRecovery(server, databases=["ragqa"])
    redis = plain.RedisRecovery(resources["redis"].server(), scratch_dir=str(tmp_path))
    chosen = plain.plan(repo).chosen
    before = pgutil.databases(pg)
    # one after the other, MinIO first: it fails and PostgreSQL is never started
    lines: list[str] = []
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        plain.restore_all(repo, [broken_minio, working_pg],
                          {"minio": chosen["minio"], "postgres": chosen["postgres"]},
                          concurrent=False, log=lines.append)
    assert pgutil.databases(pg) == before
    assert any("minio: the restore failed" in line and "(no store was restored)" in line
               for line in lines)
    # all at once, two stores failing: one error naming both, and what was restored
    with pytest.raises(plain.StoresFailed) as failed:
        plain.restore_all(repo, [broken_pg, redis, broken_minio],
                          {s: chosen[s] for s in ("postgres", "redis", "minio")})
    assert set(failed.value.errors) == {"postgres", "minio"}
    [rdb] = tmp_path.glob("redis-*/dump.rdb")
    text = str(failed.value)
    assert text.startswith("postgres: ") and "; minio: " in text
    assert text.endswith(f"(restored meanwhile: redis into {rdb})")
    assert [r.store for r in failed.value.restored] == ["redis"]
    assert pgutil.databases(pg) == before


def test_scratch_removal_verbs_refuse_what_is_not_scratch(pg, s3, resources, repo):
    server = resources["postgres"].server()
    for name in ("postgres", "template1", ""):
        with pytest.raises(InvalidRequest, match="refusing to drop database"):
            pg_engine.drop_database(server, name)
    assert "postgres" in pgutil.databases(pg)
    assert pg_engine.drop_database(server, "no_such_scratch_db") is False
    assert milvus_engine.drop_collections(resources["milvus"].server(),
                                          ["no_such_scratch_collection"]) == []
    endpoint, holder = resources["minio"].s3(), "recovery-holder"
    s3.create_bucket(Bucket=holder)
    for n in range(3):
        s3.put_object(Bucket=holder, Key=f"rag-backup/k{n}", Body=b"x")
    on_s3 = BackupRepository(S3Backend(endpoint.client(), holder, prefix="rag-backup"))
    with pytest.raises(InvalidRequest, match="'recovery-holder' holds the backup repository"):
        minio_engine.remove_bucket(endpoint, holder, repo=on_s3)
    assert s3.list_objects_v2(Bucket=holder)["KeyCount"] == 3
    assert minio_engine.remove_bucket(endpoint, holder, repo=repo) is True
    assert holder not in buckets(s3)
    assert minio_engine.remove_bucket(endpoint, holder, repo=repo) is False


def drill(resources, instance, monkeypatch, rules_file: Path | None = None):
    if rules_file is None:
        monkeypatch.delenv(consistency.RULES_ENV, raising=False)
    else:
        monkeypatch.setenv(consistency.RULES_ENV, str(rules_file))
    return dg.materialize([recovery.restore_drill], instance=instance, resources=resources,
                          raise_on_error=False)


def latest_observation(instance) -> dict:
    [record] = instance.fetch_observations(dg.AssetKey("restore_drill"), limit=1).records
    return record.asset_observation.metadata


def assert_nothing_left_behind(pg, s3, resources, databases_before, buckets_before) -> None:
    assert pgutil.databases(pg) == databases_before
    assert buckets(s3) == buckets_before
    with resources["milvus"].server().session() as client:
        assert not [c for c in client.list_collections() if "_drill_" in c]


def test_restore_drill_records_restore_times_and_leaves_nothing_behind(
        pg, s3, resources, backed_up, monkeypatch):
    before, buckets_before = pgutil.databases(pg), buckets(s3)
    result = drill(resources, backed_up, monkeypatch)
    assert result.success
    [mat] = result.asset_materializations_for_node("restore_drill")
    meta = mat.metadata
    assert meta["consistent"].value is True
    for store in ("postgres", "redis", "minio", "milvus"):
        assert meta[f"{store}_restore_s"].value > 0
        assert meta[f"{store}_matches_manifest"].value is True
        assert meta[f"{store}_differences"].value == 0
    assert meta["postgres_databases"].value == 2 and meta["postgres_rows"].value > 0
    assert meta["redis_keys"].value > 0 and meta["minio_objects"].value > 0
    assert meta["milvus_rows"].value > 0
    # the RAG service's rules, by default, evaluated on the restored copies
    assert meta["rules_source"].value.startswith("built-in")
    assert meta["rules_passed"].value == 3 and meta["rules_not_run"].value == 0
    for rule in ("vectors_have_documents", "document_objects_exist", "document_images_exist"):
        assert meta[f"rule_{rule}_status"].value == "passed"
        assert meta[f"rule_{rule}_violations"].value == 0
    assert meta["rule_vectors_have_documents_checked_ids"].value == meta["milvus_rows"].value
    assert meta["rule_document_objects_exist_checked_keys"].value == \
        meta["minio_objects"].value
    assert_nothing_left_behind(pg, s3, resources, before, buckets_before)


RULES = f"""
rules:
  - name: image_vectors_have_papers
    check: milvus_ids_in_column
    collections: [ministry_images]
    column: {SERVICE_DB}.lib.papers.pid
  - name: text_vectors_have_papers
    check: milvus_ids_in_column
    collections: ["ministry_t*"]
    column: {SERVICE_DB}.lib.papers.pid
  - name: paper_files_exist
    check: column_values_are_objects
    bucket: documents
    column: {SERVICE_DB}.lib.papers.file_ref
  - name: paper_thumbs_exist
    check: column_values_are_objects
    bucket: documents
    column: {SERVICE_DB}.lib.papers.thumb_ref
  - name: reviews_exist
    check: column_values_are_objects
    column: {SERVICE_DB}.lib.reviews.file_ref
  - name: audio_vectors_have_papers
    check: milvus_ids_in_column
    collections: ["audio_*"]
    column: {SERVICE_DB}.lib.papers.pid
  - name: scans_exist
    check: column_values_are_objects
    bucket: scans
    column: {SERVICE_DB}.lib.papers.file_ref
"""


def test_drill_rules_from_a_file_on_another_database_name_violations_and_what_did_not_run(
        pg, s3, resources, backed_up, monkeypatch, tmp_path):
    before, buckets_before = pgutil.databases(pg), buckets(s3)
    rules_file = tmp_path / "drill-rules.yaml"
    rules_file.write_text(RULES)
    result = drill(resources, backed_up, monkeypatch, rules_file)
    assert not result.success
    assert not result.asset_materializations_for_node("restore_drill")
    error = str(result.failure_data_for_node("restore_drill").error)
    assert "rule text_vectors_have_papers failed" in error
    assert "rule paper_thumbs_exist failed: 1 violation(s)" in error
    assert f"e.g. {MISSING_THUMB}" in error
    assert (f"rule reviews_exist not run: table lib.reviews does not exist in database "
            f"'{SERVICE_DB}' (restored as '{SERVICE_DB}_drill_") in error
    assert "rule audio_vectors_have_papers not run: no collection of the restored Milvus " \
        "backup matches 'audio_*'" in error
    assert "rule scans_exist not run: bucket 'scans' is not in the restored MinIO backup" \
        in error
    for passed in ("image_vectors_have_papers", "paper_files_exist"):
        assert f"rule {passed}" not in error
    meta = latest_observation(backed_up)
    assert meta["consistent"].value is False
    assert meta["rules_source"].value == str(rules_file)
    assert (meta["rules_passed"].value, meta["rules_failed"].value,
            meta["rules_not_run"].value) == (2, 2, 3)
    papers = pgutil.execute(pg, SERVICE_DB, "SELECT count(*) FROM lib.papers")[0][0]
    texts = pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")[0][0]
    assert meta["rule_image_vectors_have_papers_status"].value == "passed"
    assert meta["rule_image_vectors_have_papers_checked_ids"].value == papers
    assert meta["rule_image_vectors_have_papers_checked_rows"].value == papers
    assert meta["rule_text_vectors_have_papers_violations"].value == texts - papers
    assert meta["rule_paper_thumbs_exist_violations"].value == 1
    assert meta["rule_scans_exist_status"].value == "not run"
    assert "rule_scans_exist_violations" not in meta
    assert MISSING_THUMB in meta["rules"].value and "lib.reviews" in meta["rules"].value
    for store in ("postgres", "redis", "minio", "milvus"):  # restored fine, times recorded
        assert meta[f"{store}_restore_s"].value > 0
        assert meta[f"{store}_matches_manifest"].value is True
    assert_nothing_left_behind(pg, s3, resources, before, buckets_before)


def test_a_failed_store_restore_still_records_every_restore_time(pg, s3, resources, backed_up,
                                                                 monkeypatch):
    """MinIO is unreachable: the other stores are still restored, timed, checked with the
    rules that can run, and removed; the drill fails naming what did not work."""
    before, buckets_before = pgutil.databases(pg), buckets(s3)
    closed = closed_url()
    minio = resources["minio"]
    broken = dict(resources, minio=MinioResource(endpoint=closed, access_key=minio.access_key,
                                                 secret_key=minio.secret_key))
    result = drill(broken, backed_up, monkeypatch)
    assert not result.success
    error = str(result.failure_data_for_node("restore_drill").error)
    assert "minio: the restore failed:" in error and closed in error
    assert "rule document_objects_exist not run: MinIO was not restored (" in error
    assert "rule document_images_exist not run: MinIO was not restored (" in error
    assert "rule vectors_have_documents" not in error  # it ran on what was restored: passed
    meta = latest_observation(backed_up)
    assert meta["consistent"].value is False
    assert meta["minio_matches_manifest"].value is False
    assert "the restore failed" in meta["minio_not_compared"].value
    assert meta["minio_restore_s"].value > 0
    for store in ("postgres", "redis", "milvus"):  # the others were still restored and timed
        assert meta[f"{store}_restore_s"].value > 0
        assert meta[f"{store}_matches_manifest"].value is True
    assert meta["rule_vectors_have_documents_status"].value == "passed"
    assert meta["rule_vectors_have_documents_checked_ids"].value == meta["milvus_rows"].value
    assert meta["rules_not_run"].value == 2
    assert_nothing_left_behind(pg, s3, resources, before, buckets_before)
