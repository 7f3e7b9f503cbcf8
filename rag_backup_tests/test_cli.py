"""The ``rag-backup`` command line against the real stores, run as the console script in a
subprocess with only the ``RAG_*`` environment (no Dagster instance, no DAGSTER_HOME), on an
ENCRYPTED repository (``RAG_BACKUP_ENCRYPT_TO`` / ``RAG_BACKUP_IDENTITY``): one backup per store
taken by the command itself and shared by the module's tests; listing, showing, verifying,
restoring every store into a scratch target and reading the restored data back independently;
refusals (exit 2, one line, no traceback); a damaged artifact (exit 1); restore-all; the store
lease held by another writer, or by a writer that was killed; and encryption at rest: no
plaintext of any store in the repository, the stock ``age`` tool decrypting an artifact,
tampered manifests, missing and wrong identities, and key rotation (last: it changes the key).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import redis
from pymilvus import MilvusClient

from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.crypto import Identity
from rag_backup.repository.sealed import Crypto
from rag_backup.repository.lease import current
from rag_backup_tests import pgutil

STACK_SERVICES = ("postgres", "redis", "s3", "milvus")
CLI = str(Path(sys.executable).parent / "rag-backup")
STORES = ("postgres", "redis", "minio", "milvus")
SCRATCH = f"cli{uuid.uuid4().hex[:6]}"  # in every scratch target's name
TIMEOUT_S = 300


def rag_backup(env: dict[str, str], *args: str, timeout: float = TIMEOUT_S
               ) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}\n{done.stdout}"
    return done


def one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The refusal's single stderr line (``rag-backup: ...``), after checking the exit code."""
    assert done.returncode == code, f"exit {done.returncode}: {done.stderr}\n{done.stdout}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rag-backup: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-repository")


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Path]:
    """The repository's key, in an age identity file (what ``RAG_BACKUP_IDENTITY`` names)."""
    key = Identity.generate()
    path = tmp_path_factory.mktemp("keys") / "backup-key.txt"
    path.write_text(f"# public key: {key.recipient}\n{key.encode()}\n")
    path.chmod(0o600)
    return key, path


@pytest.fixture(scope="module")
def repo(repo_dir: Path, identity: tuple[Identity, Path]) -> BackupRepository:
    return BackupRepository(FilesystemBackend(repo_dir),
                            Crypto([identity[0].recipient], [identity[0]]))


@pytest.fixture(scope="module")
def env(stack_env: dict[str, str], repo_dir: Path, identity: tuple[Identity, Path]
        ) -> dict[str, str]:
    """The command's whole environment: the stack's RAG_* settings and the repository, small
    selections of each store (other modules' data stays out), nothing of Dagster; backups
    encrypted to the module's key."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAG_", "DAGSTER_")) and k != "COLUMNS"}
    return {**base, **{k: v for k, v in stack_env.items() if k != "DAGSTER_HOME"},
            "RAG_BACKUP_REPOSITORY": str(repo_dir), "RAG_PG_DATABASES": "ragqa",
            "RAG_MINIO_BUCKETS": "models",
            "RAG_MILVUS_COLLECTIONS": "ministry_text,ministry_images",
            "RAG_BACKUP_ENCRYPT_TO": str(identity[0].recipient),
            "RAG_BACKUP_IDENTITY": str(identity[1])}


@pytest.fixture(scope="module")
def backups(env: dict[str, str]) -> dict[str, dict]:
    """One verified backup of each store, taken by ``rag-backup backup STORE --verify``."""
    return {store: json.loads(ok(rag_backup(env, "backup", store, "--verify", "--json")).stdout)
            for store in STORES}


@pytest.fixture(scope="module")
def s3(stack_env: dict[str, str]):
    return boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                        aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                        aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                        region_name=stack_env.get("RAG_S3_REGION", "us-east-1"))


def redis_db(stack_env: dict[str, str], db: int) -> redis.Redis:
    return redis.Redis(host=stack_env["RAG_REDIS_HOST"], port=int(stack_env["RAG_REDIS_PORT"]),
                       password=stack_env["RAG_REDIS_PASSWORD"], db=db)


def test_backup_commits_and_verifies_each_store(backups):
    for store, doc in backups.items():
        assert doc["store"] == store and doc["verified"] == "yes", doc
        assert doc["verification"]["ok"] and doc["verification"]["checks"], doc
        assert doc["manifest"]["run_id"].startswith("cli-")
        assert doc["manifest"]["partition_window"] is not None
        assert all(a["size"] > 0 for a in doc["manifest"]["artifacts"])
    assert len(backups["redis"]["partition"]) == len("2026-11-30-08:00")  # hourly
    assert backups["postgres"]["manifest"]["recovery_point"]["source"] == "live"


def test_list_shows_every_backup_as_a_table_and_as_json(env, backups):
    table = ok(rag_backup(env, "list")).stdout
    for store, doc in backups.items():
        assert doc["backup_id"] in table and doc["partition"] in table
    assert "primary" in table and "yes" in table
    rows = json.loads(ok(rag_backup(env, "list", "--json")).stdout)
    by_store = {r["store"]: r for r in rows}
    assert set(by_store) == set(STORES)
    for store, doc in backups.items():
        row = by_store[store]
        assert (row["backup_id"], row["partition"], row["verified"], row["repository"]) == (
            doc["backup_id"], doc["partition"], "yes", "primary")
        assert row["size_bytes"] == sum(a["size"] for a in doc["manifest"]["artifacts"])
        assert row["duration_s"] >= 0 and row["started_at"]
    only = json.loads(ok(rag_backup(env, "list", "redis", "--json")).stdout)
    assert [r["store"] for r in only] == ["redis"]


def test_a_damaged_partition_is_listed_as_damaged_and_shown_as_an_error(env, backups,
                                                                         repo_dir):
    part = repo_dir / "milvus" / "2026-01-02"
    part.mkdir(parents=True)
    (part / "manifest.json").write_text("{ not json")
    try:
        rows = json.loads(ok(rag_backup(env, "list", "milvus", "--json")).stdout)
        damaged = [r for r in rows if r["partition"] == "2026-01-02"]
        assert damaged and damaged[0]["verified"] == "DAMAGED" and damaged[0]["damage"]
        assert "DAMAGED" in ok(rag_backup(env, "list", "milvus")).stdout
        line = one_error_line(rag_backup(env, "show", "milvus", "2026-01-02"), 1)
        assert "DAMAGED" in line and "manifest.json" in line
    finally:
        (part / "manifest.json").unlink()
        part.rmdir()


@pytest.mark.parametrize("store", STORES)
def test_show_prints_manifest_verification_and_fingerprint(env, backups, store):
    doc = backups[store]
    table = ok(rag_backup(env, "show", store, doc["partition"])).stdout
    assert doc["backup_id"] in table
    for artifact in doc["manifest"]["artifacts"]:
        assert artifact["path"] in table and artifact["sha256"] in table
    assert "fingerprint" in table and "verification" in table
    shown = json.loads(ok(rag_backup(env, "show", store, "latest", "--json")).stdout)
    assert shown["backup_id"] == doc["backup_id"] and shown["verified"] == "yes"
    assert shown["verification"]["ok"] is True
    assert shown["manifest"]["fingerprint"] == doc["manifest"]["fingerprint"]


@pytest.mark.parametrize("store", STORES)
def test_verify_records_the_verification(env, backups, repo, store):
    doc = backups[store]
    verified = json.loads(ok(rag_backup(env, "verify", store, "latest", "--json")).stdout)
    assert verified["ok"] and verified["backup_id"] == doc["backup_id"] and verified["checks"]
    record = repo.get(store, doc["partition"])
    assert record.verified and record.verification.run_id.startswith("cli-")


def test_restore_postgres_into_a_scratch_database(env, backups, pg):
    target = f"ragqa_{SCRATCH}"
    try:
        done = ok(rag_backup(env, "restore", "postgres", "--partition-key",
                             backups["postgres"]["partition"], "--source-database", "ragqa",
                             "--target-database", target, "--jobs", "2", "--json"))
        summary = json.loads(done.stdout)
        assert summary["target_database"] == target and summary["matches_manifest"]
        query = "SELECT count(*), sum(length(title)) FROM documents"
        assert pgutil.execute(pg, target, query) == pgutil.execute(pg, "ragqa", query)
        assert summary["rows"] == backups["postgres"]["manifest"]["fingerprint"]["rows"]
    finally:
        pgutil.drop_database(pg, target)


def test_restore_redis_replays_a_db_into_another(env, backups, stack_env):
    scratch = redis_db(stack_env, 9)
    scratch.flushdb()
    try:
        done = ok(rag_backup(env, "restore", "redis", "--dbs", "1", "--target-db", "9"))
        assert "keys_restored" in done.stdout
        assert scratch.get("ratelimit:default") == b"60"
        assert scratch.hget("feature:flags", "hybrid_search") == b"on"
        assert scratch.dbsize() == redis_db(stack_env, 1).dbsize()
    finally:
        scratch.flushdb()


def objects(s3, bucket: str) -> dict[str, int]:
    return {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket) for o in page.get("Contents", [])}


def test_restore_minio_into_a_new_bucket(env, backups, s3):
    target = f"models-{SCRATCH}"
    try:
        summary = json.loads(ok(rag_backup(
            env, "restore", "minio", "--buckets", "models", "--target-bucket", target,
            "--json")).stdout)
        assert summary["matches_snapshot"]
        source = objects(s3, "models")
        assert objects(s3, target) == source and source
        key = max(source, key=source.get)  # the multipart upload
        assert (s3.get_object(Bucket=target, Key=key)["Body"].read()
                == s3.get_object(Bucket="models", Key=key)["Body"].read())
    finally:
        for key in objects(s3, target):
            s3.delete_object(Bucket=target, Key=key)
        s3.delete_bucket(Bucket=target)


def test_restore_milvus_under_a_suffix(env, backups, stack_env):
    client = MilvusClient(uri=stack_env["RAG_MILVUS_URI"], timeout=60)
    target = f"ministry_images_{SCRATCH}"
    try:
        summary = json.loads(ok(rag_backup(
            env, "restore", "milvus", "--collections", "ministry_images", "--suffix",
            f"_{SCRATCH}", "--json")).stdout)
        assert summary["matches_manifest"]
        assert summary["collections"]["ministry_images"]["target"] == target

        def count(name: str) -> int:
            return client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]

        assert count(target) == count("ministry_images") > 0
    finally:
        if client.has_collection(target):
            client.drop_collection(target)
        client.close()


def test_destructive_restores_without_confirmation_are_refused_in_one_line(env, backups, pg):
    line = one_error_line(rag_backup(env, "restore", "postgres", "--target-database", "ragqa"),
                          2)
    assert "confirm" in line and "ragqa" in line
    assert "ragqa" in pgutil.databases(pg)
    line = one_error_line(rag_backup(env, "restore", "redis", "--flush"), 2)
    assert "confirm" in line
    line = one_error_line(rag_backup(env, "restore", "milvus", "--in-place", "--collections",
                                     "ministry_text"), 2)
    assert "ministry_text" in line


def test_bad_input_is_refused_with_exit_2_and_debug_shows_the_traceback(env, backups):
    assert "2001-01-01" in one_error_line(rag_backup(env, "show", "postgres", "2001-01-01"), 2)
    one_error_line(rag_backup(env, "verify", "redis", "2001-01-01-00:00"), 2)
    one_error_line(rag_backup(env, "restore", "milvus", "--partition-key", "2001-01-01"), 2)
    one_error_line(rag_backup(env, "list", "nosuchstore"), 2)
    one_error_line(rag_backup(env, "backup", "redis", "--partition", "tomorrow"), 2)
    one_error_line(rag_backup(env, "restore", "postgres", "--jobs", "many"), 2)
    unset = {k: v for k, v in env.items() if k != "RAG_PG_HOST"}
    assert "RAG_PG_HOST" in one_error_line(rag_backup(unset, "verify", "postgres", "latest"), 2)
    debug = rag_backup(env, "--debug", "show", "postgres", "2001-01-01")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert env["RAG_PG_PASSWORD"] not in debug.stderr + debug.stdout


def test_verify_of_a_damaged_artifact_fails_and_is_recorded(env, backups, repo, repo_dir):
    doc = backups["redis"]
    artifact = repo_dir / "redis" / doc["partition"] / doc["backup_id"] / "dump.rdb.zst"
    original = artifact.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    artifact.write_bytes(bytes(damaged))
    try:
        line = one_error_line(rag_backup(env, "verify", "redis", doc["partition"]), 1)
        assert "FAILED" in line and doc["backup_id"] in line
        record = repo.get("redis", doc["partition"])
        assert record.verification is not None and not record.verification.ok
        rows = json.loads(ok(rag_backup(env, "list", "redis", "--json")).stdout)
        assert [r["verified"] for r in rows] == ["FAILED"]
        one_error_line(rag_backup(env, "restore", "redis", "--partition-key",
                                  doc["partition"], "--target-db", "9", "--dbs", "1"), 2)
    finally:
        artifact.write_bytes(original)
    ok(rag_backup(env, "verify", "redis", doc["partition"]))
    assert repo.get("redis", doc["partition"]).verified


def test_restore_all_at_now_of_two_stores_into_scratch(env, backups, pg, tmp_path):
    summary = json.loads(ok(rag_backup(
        env, "restore-all", "--at", "now", "--stores", "postgres,redis", "--scratch-dir",
        str(tmp_path), "--json")).stdout)
    assert set(summary["chosen"]) == {"postgres", "redis"}
    restored = summary["restored"]
    database = restored["postgres"]["target"]
    try:
        assert database.startswith("ragqa_pit_")
        assert all(r["matches_manifest"] for r in restored.values())
        assert pgutil.execute(pg, database, "SELECT count(*) FROM documents") == \
            pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")
        rdb = Path(restored["redis"]["target"])
        assert rdb.name == "dump.rdb" and rdb.stat().st_size > 0
        assert restored["redis"]["keys"] == backups["redis"]["manifest"]["fingerprint"]["keys"]
    finally:
        pgutil.drop_database(pg, database)


def test_wal_status_without_a_receiver_is_unhealthy(env):
    done = rag_backup(env, "wal-status", "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    status = json.loads(done.stdout)
    assert status["healthy"] is False and status["problems"]
    assert one_error_line(done, 1).startswith("rag-backup: the WAL archive is unhealthy")


def test_a_backup_is_refused_while_another_writer_holds_the_lease(env, backups, repo):
    with repo.lease("postgres", "test holder", "test"):
        line = one_error_line(rag_backup(env, "backup", "postgres"), 2)
        assert "test holder" in line and "busy" in line
    assert repo.get("postgres", backups["postgres"]["partition"]).backup_id == \
        backups["postgres"]["backup_id"]
    again = json.loads(ok(rag_backup(env, "backup", "postgres", "--json")).stdout)
    assert again["backup_id"] != backups["postgres"]["backup_id"]
    assert current(repo.backend, "postgres") is None  # released


HOLDER = """
import sys, time
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.crypto import Identity
from rag_backup.repository.sealed import Crypto
with BackupRepository(FilesystemBackend(sys.argv[1])).lease("redis", "doomed holder", "test"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lease_of_a_killed_holder_expires_and_is_taken_over(env, backups, repo,
                                                                 repo_dir):
    short = {**env, "RAG_BACKUP_LEASE_TTL_S": "2"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(repo_dir)], env=short,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(1.5)  # renewed in the meantime (every third of its 2 s)
        assert current(repo.backend, "redis").holder == "doomed holder"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert current(repo.backend, "redis").holder == "doomed holder"  # not released
        time.sleep(2.5)
        taken = json.loads(ok(rag_backup(short, "backup", "redis", "--json")).stdout)
        assert taken["verified"] == "no" and current(repo.backend, "redis") is None
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)


def test_restore_options_are_the_launchpad_configs_fields():
    from rag_backup.cli.all_stores import restore_all_command
    from rag_backup.cli.restores import RESTORES, restore_factory, restore_pitr_command
    from rag_backup.defs.pitr import RestorePostgresPitrConfig
    from rag_backup.defs.recovery import RestoreAllConfig

    commands = [(restore_factory(store)(), getattr(importlib.import_module(module), name))
                for store, (module, name, _job) in RESTORES.items()]
    commands += [(restore_pitr_command(), RestorePostgresPitrConfig),
                 (restore_all_command(), RestoreAllConfig)]
    for command, config_cls in commands:
        assert {p.name for p in command.params} - {"as_json"} == set(config_cls.model_fields)


def test_list_and_mapping_options_build_the_config_the_launchpad_would():
    import click

    from rag_backup.cli.options import build_config
    from rag_backup.defs.pitr import RestorePostgresPitrConfig
    from rag_backup.defs.redis import RestoreRedisConfig

    redis_config = build_config(RestoreRedisConfig, {"dbs": ("1,2", " 3"), "flush": True})
    assert redis_config == RestoreRedisConfig(dbs=[1, 2, 3], flush=True)
    pitr_config = build_config(RestorePostgresPitrConfig, {
        "target_names": ("ragqa=ragqa_before,kb=kb_old",), "databases": ("ragqa", "kb")})
    assert pitr_config.target_names == {"ragqa": "ragqa_before", "kb": "kb_old"}
    assert pitr_config.databases == ["ragqa", "kb"]
    with pytest.raises(click.BadParameter):
        build_config(RestoreRedisConfig, {"dbs": ("one",)})
    with pytest.raises(click.BadParameter):
        build_config(RestorePostgresPitrConfig, {"target_names": ("ragqa",)})


# -- encryption at rest (the module's repository is encrypted) ---------------------------------

def known_plaintexts(pg, stack_env: dict[str, str], s3) -> dict[str, bytes]:
    """One value of each store's seeded data, read from the store itself: a document body
    (PostgreSQL), an embedding's raw bytes (Redis, uncompressible, so the RDB holds them as
    they are), a slice of a model file (MinIO) and a chunk's text (Milvus)."""
    body = pgutil.execute(pg, "ragqa", "SELECT substr(body, 11, 40) FROM documents "
                                       "ORDER BY length(body) DESC, id LIMIT 1")[0][0]
    r = redis_db(stack_env, 1)
    embedding = r.get(sorted(k for k in r.scan_iter("embedding:doc:*"))[0])
    models = objects(s3, "models")
    model = max(models, key=models.get)
    blob = s3.get_object(Bucket="models", Key=model, Range="bytes=1000-1047")["Body"].read()
    client = MilvusClient(uri=stack_env["RAG_MILVUS_URI"], timeout=60)
    try:
        rows = client.query("ministry_text", filter="id >= 0", output_fields=["text"], limit=50)
    finally:
        client.close()
    text = max((row["text"] for row in rows), key=len)
    return {"postgres": body.encode(), "redis": embedding[64:112], "minio": blob,
            "milvus": text[:40].encode()}


def plaintext_views(data: bytes) -> list[bytes]:
    """The bytes as stored, and what an attacker gets by decompressing or decoding them."""
    import io

    import pyarrow.parquet as pq
    import zstandard

    views = [data]
    if data.startswith(b"\x28\xb5\x2f\xfd"):  # a zstd frame
        views.append(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read())
    if data.startswith(b"PAR1"):
        table = pq.read_table(io.BytesIO(data))
        views += [str(v).encode() for c in table.columns if str(c.type) in ("string",
                  "large_string") for v in c.to_pylist()]
    return views


def test_an_encrypted_repository_holds_no_plaintext_of_any_store(backups, repo, repo_dir, pg,
                                                                  stack_env, s3):
    canaries = known_plaintexts(pg, stack_env, s3)
    stored = [p for p in repo_dir.rglob("*") if p.is_file()]
    assert len(stored) > 20
    for path in stored:  # every byte of every file: artifacts, blobs, headers, records
        for view in plaintext_views(path.read_bytes()):
            for store, canary in canaries.items():
                assert canary not in view, f"{store} plaintext in {path}"
    # the control: read through the repository with the key, each value IS in the backups
    found = set()
    for path in stored:
        key = path.relative_to(repo_dir).as_posix()
        if key.endswith(".age") or ".tmp-" in key:
            continue
        for view in plaintext_views(repo.backend.read_bytes(key) or b""):
            found |= {store for store, canary in canaries.items() if canary in view}
    assert found == set(canaries)
    headers = [p for p in stored if p.name.endswith(".age")]
    assert headers and all(p.read_bytes().startswith(b"age-encryption.org/v1\n")
                           for p in headers)
    manifest = json.loads((repo_dir / "minio" / backups["minio"]["partition"] /
                           "manifest.json").read_bytes())
    assert manifest["fingerprint"] == {} and manifest["sealed"]  # counts sealed; names stay


def test_an_artifact_decrypts_with_the_stock_age_tool(backups, repo, repo_dir, identity):
    record = repo.get("postgres", backups["postgres"]["partition"])
    artifact = record.manifest.artifacts[0]
    payload = repo_dir / "postgres" / record.partition_key / record.backup_id / artifact.path
    age_file = payload.read_bytes()
    header = Path(f"{payload}.age").read_bytes()
    done = subprocess.run(["age", "-d", "-i", str(identity[1])], input=header + age_file,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import hashlib
    assert hashlib.sha256(done.stdout).hexdigest() == artifact.sha256
    assert len(done.stdout) == artifact.size and age_file[:4] != done.stdout[:4]


def test_a_tampered_manifest_is_refused_by_verify_and_restore(env, backups, repo_dir):
    doc = backups["redis"]
    path = repo_dir / "redis" / doc["partition"] / "manifest.json"
    original = path.read_bytes()
    manifest = json.loads(original)
    manifest["artifacts"][0]["size"] += 1  # a clear field: not what the backup wrote
    path.write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
    try:
        line = one_error_line(rag_backup(env, "verify", "redis", doc["partition"]), 1)
        assert "tampered" in line and "manifest" in line
        line = one_error_line(rag_backup(env, "restore", "redis", "--partition-key",
                                         doc["partition"], "--dbs", "1", "--target-db", "9"), 1)
        assert "tampered" in line
        rows = json.loads(ok(rag_backup(env, "list", "redis", "--json")).stdout)
        assert [r["verified"] for r in rows] == ["DAMAGED"]
        manifest = json.loads(original)
        manifest["sealed"] = manifest["sealed"][:-8] + "AAAAAAA="  # the sealed part itself
        path.write_bytes(json.dumps(manifest).encode())
        assert "tampered" in one_error_line(rag_backup(env, "verify", "redis",
                                                       doc["partition"]), 1)
        manifest = json.loads(original)
        del manifest["sealed"], manifest["encryption"]  # replaced by a clear one
        manifest["fingerprint"] = {"keys": 1}
        path.write_bytes(json.dumps(manifest).encode())
        assert "not sealed" in one_error_line(rag_backup(env, "verify", "redis",
                                                         doc["partition"]), 1)
    finally:
        path.write_bytes(original)
    ok(rag_backup(env, "verify", "redis", doc["partition"]))  # the later tests restore it


def test_a_restore_without_or_with_a_wrong_identity_fails_and_changes_nothing(env, backups,
                                                                              stack_env,
                                                                              tmp_path):
    scratch = redis_db(stack_env, 9)
    scratch.flushdb()
    scratch.set("sentinel", "kept")
    target = f"{stack_env['RAG_REDIS_HOST']}:{stack_env['RAG_REDIS_PORT']}/9"
    restore = ("restore", "redis", "--dbs", "1", "--target-db", "9", "--flush", "--confirm",
               target)
    wrong = tmp_path / "other-key.txt"
    wrong.write_text(Identity.generate().encode() + "\n")
    try:
        missing = {k: v for k, v in env.items() if k != "RAG_BACKUP_IDENTITY"}
        line = one_error_line(rag_backup(missing, *restore), 2)
        assert "RAG_BACKUP_IDENTITY" in line
        line = one_error_line(rag_backup({**env, "RAG_BACKUP_IDENTITY": str(wrong)},
                                         *restore), 2)
        assert "not encrypted to the configured identity" in line
        assert scratch.dbsize() == 1 and scratch.get("sentinel") == b"kept"
        assert "AGE-SECRET-KEY" not in line
    finally:
        scratch.flushdb()


def test_backups_taken_before_encryption_stay_readable(env, stack_env, tmp_path):
    plain_env = {k: v for k, v in env.items()
                 if k not in ("RAG_BACKUP_ENCRYPT_TO", "RAG_BACKUP_IDENTITY")}
    plain_env["RAG_BACKUP_REPOSITORY"] = str(tmp_path / "repository")
    from datetime import datetime, timedelta, timezone
    hour = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%d-%H:00")
    ok(rag_backup(plain_env, "backup", "redis", "--partition", hour, "--verify"))
    assert not list((tmp_path / "repository").rglob("*.age"))
    encrypted_env = {**env, "RAG_BACKUP_REPOSITORY": plain_env["RAG_BACKUP_REPOSITORY"]}
    ok(rag_backup(encrypted_env, "backup", "redis", "--verify"))
    assert list((tmp_path / "repository").rglob("*.age"))
    ok(rag_backup(encrypted_env, "verify", "redis", hour))  # the clear one, read again
    rows = json.loads(ok(rag_backup(encrypted_env, "list", "redis", "--json")).stdout)
    assert [r["verified"] for r in rows] == ["yes", "yes"]


def test_a_backup_side_with_the_public_key_only_backs_up_minio_reading_every_object(env,
                                                                                    backups):
    public_only = {k: v for k, v in env.items() if k != "RAG_BACKUP_IDENTITY"}
    done = ok(rag_backup(public_only, "-v", "backup", "minio", "--json"))
    assert "no identity opens it, reading every object again" in done.stderr
    assert json.loads(done.stdout)["backup_id"] != backups["minio"]["backup_id"]


def test_key_rotation_rewraps_headers_only_and_leaves_every_backup_to_the_new_key(
        env, backups, repo_dir, identity, tmp_path):
    import hashlib

    old, _ = identity
    new = Identity.generate()
    both = tmp_path / "both-keys.txt"
    both.write_text(f"{old.encode()}\n{new.encode()}\n")
    only_new = tmp_path / "new-key.txt"
    only_new.write_text(f"{new.encode()}\n")

    def payloads() -> dict[str, str]:
        return {p.relative_to(repo_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in repo_dir.rglob("*") if p.is_file() and not p.name.endswith(".age")
                and p.name != "manifest.json" and "keys" not in p.parts
                and p.name != "verification.json" and "leases" not in p.parts}

    before = payloads()
    rotating = {**env, "RAG_BACKUP_IDENTITY": str(both)}
    report = json.loads(ok(rag_backup(rotating, "keys", "rotate", "--add", str(new.recipient),
                                      "--remove", str(old.recipient), "--json")).stdout)
    assert report["ok"] and report["files_rewrapped"] > 10
    assert report["manifests_rewrapped"] >= len(STORES)
    assert report["backups_rewrapped"] >= len(STORES)
    assert report["payload_bytes_not_rewritten"] > 1_000_000
    assert report["header_bytes_written"] < 1000 * report["files_rewrapped"]
    assert payloads() == before  # no payload was rewritten
    again = json.loads(ok(rag_backup(rotating, "keys", "rotate", "--add", str(new.recipient),
                                     "--json")).stdout)  # resumable: nothing left to do
    assert again["ok"] and again["files_rewrapped"] == 0 and again["files_already_rewrapped"]

    new_env = {**env, "RAG_BACKUP_IDENTITY": str(only_new),
               "RAG_BACKUP_ENCRYPT_TO": str(new.recipient)}
    for store in ("redis", "minio"):  # an artifact, and blobs: read back with the new key
        ok(rag_backup(new_env, "verify", store, backups[store]["partition"]))
    for store in STORES:  # every manifest's sealed fingerprint opens with the new key
        shown = json.loads(ok(rag_backup(new_env, "show", store, backups[store]["partition"],
                                         "--json")).stdout)
        assert shown["manifest"]["fingerprint"], store
    line = one_error_line(rag_backup(env, "verify", "redis", backups["redis"]["partition"]), 2)
    assert "not encrypted to the configured identity" in line
    line = one_error_line(rag_backup(env, "backup", "redis"), 2)  # still writing to old
    assert "removed" in line and str(old.recipient) in line
    status = json.loads(ok(rag_backup(new_env, "keys", "status", "--json")).stdout)
    assert status["recipients"] == [str(new.recipient)]
    assert list(status["files_by_keyset"]) == [report["keyset"]]
