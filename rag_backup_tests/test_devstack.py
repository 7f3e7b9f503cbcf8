"""The devstack starts real servers, seeds them consistently, and stops exactly what it started.

No mocks: PostgreSQL, redis-server, moto's S3 server and the Milvus 2.3.5 standalone server run
as processes under a temporary root. One module-scoped stack serves most tests; the last test
stops it. A few small stacks (one service each) cover restart, subsets and port collisions.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rag_backup.devstack import (
    ENV_NAMES,
    DevStack,
    MilvusSettings,
    PostgresSettings,
    RedisSettings,
    S3Settings,
)
from rag_backup.devstack import base as devstack_base
from rag_backup.devstack.procs import (
    ProcessRecord,
    group_members,
    is_running,
    port_is_free,
)
from rag_backup.devstack.seed import (
    ANSWER_TTL_S,
    IMAGE_COLLECTION,
    SESSION_TTL_S,
    TEXT_COLLECTION,
    build_corpus,
    split_key,
)
from rag_backup.devstack.settings import SECRET_ENV_NAMES
from rag_backup.devstack.state import load_state

ALL_SERVICES = ("postgres", "redis", "s3", "milvus")
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    devstack = DevStack(root=tmp_path_factory.mktemp("stack"), services=ALL_SERVICES)
    try:
        devstack.up(seed=True)
    except BaseException:
        devstack.down()
        raise
    yield devstack
    devstack.down()


@pytest.fixture(scope="module")
def env(stack: DevStack) -> dict[str, str]:
    return stack.env()


@pytest.fixture(scope="module")
def pg(env: dict[str, str]) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(**PostgresSettings.from_env(env).connect_kwargs("ragqa"))
    conn.autocommit = True
    yield conn
    conn.close()


def _redis(
    env: dict[str, str], db: int = 0, password: str | None = None
) -> redis.Redis:
    settings = RedisSettings.from_env(env)
    return redis.Redis(
        host=settings.host,
        port=settings.port,
        password=settings.password if password is None else password,
        db=db,
        socket_timeout=10,
        retry=Retry(
            NoBackoff(), 0
        ),  # redis-py 8 retries a refused AUTH for 4 s by default
    )


def _milvus(env: dict[str, str]):
    from pymilvus import MilvusClient

    settings = MilvusSettings.from_env(env)
    return MilvusClient(uri=settings.uri, token=settings.token, timeout=60)


def _records(stack: DevStack) -> dict[str, ProcessRecord]:
    state = load_state(stack.root)
    return {
        name: s.process for name, s in state.services.items() if s.process is not None
    }


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    """(local address, port) of every TCP socket in LISTEN state that ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = set()
    for table, family in (
        ("/proc/net/tcp", socket.AF_INET),
        ("/proc/net/tcp6", socket.AF_INET6),
    ):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                address_hex, port_hex = local.split(":")
                raw = bytes.fromhex(address_hex)
                if family == socket.AF_INET:
                    address = socket.inet_ntop(family, raw[::-1])
                else:
                    address = socket.inet_ntop(
                        family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    )
                listening.add((address, int(port_hex, 16)))
    return listening


# -- connection settings and authentication ------------------------------------------------------
def test_env_has_the_whole_contract(stack: DevStack, env: dict[str, str]) -> None:
    expected = {name for names in ENV_NAMES.values() for name in names}
    assert set(env) == expected
    assert env["RAG_PG_HOST"] == env["RAG_REDIS_HOST"] == "127.0.0.1"
    assert env["RAG_PG_USER"] == "rag_admin"
    assert (env["DAGSTER_PG_USER"], env["DAGSTER_PG_DB"]) == ("dagster", "dagster")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["RAG_S3_ENDPOINT"])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["RAG_MILVUS_URI"])
    assert env["RAG_S3_REGION"] == "us-east-1"
    assert env["RAG_MILVUS_TOKEN"] == ""
    assert Path(env["RAG_BACKUP_REPOSITORY"]) == stack.root / "repository"
    assert Path(env["RAG_BACKUP_REPOSITORY"]).is_dir()
    assert Path(env["DAGSTER_HOME"]).is_dir()
    # Generated, distinct secrets.
    secrets = [env[name] for name in SECRET_ENV_NAMES if name != "RAG_MILVUS_TOKEN"]
    assert len(set(secrets)) == len(secrets)
    assert all(len(secret) >= 16 for secret in secrets)


def test_postgres_requires_the_password(env: dict[str, str]) -> None:
    settings = PostgresSettings.from_env(env)
    with (
        contextlib.closing(psycopg2.connect(**settings.connect_kwargs())) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (True,)
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
    wrong = {**settings.connect_kwargs(), "password": settings.password + "x"}
    with pytest.raises(
        psycopg2.OperationalError, match="password authentication failed"
    ):
        psycopg2.connect(**wrong)
    no_password = {**settings.connect_kwargs(), "password": ""}
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**no_password)


def test_dagster_role_owns_its_database_and_nothing_more(env: dict[str, str]) -> None:
    kwargs = {
        "host": env["DAGSTER_PG_HOST"],
        "port": int(env["DAGSTER_PG_PORT"]),
        "user": env["DAGSTER_PG_USER"],
        "password": env["DAGSTER_PG_PASSWORD"],
        "connect_timeout": 10,
    }
    with (
        contextlib.closing(
            psycopg2.connect(dbname=env["DAGSTER_PG_DB"], **kwargs)
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(
            "SELECT r.rolsuper, pg_get_userbyid(d.datdba) FROM pg_roles r, pg_database d "
            "WHERE r.rolname = current_user AND d.datname = current_database()"
        )
        assert cur.fetchone() == (False, "dagster")
        cur.execute("CREATE TABLE probe (id int)")  # it may create its own tables
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(dbname="ragqa", **kwargs)
    with pytest.raises(
        psycopg2.OperationalError, match="password authentication failed"
    ):
        psycopg2.connect(dbname=env["DAGSTER_PG_DB"], **{**kwargs, "password": "wrong"})


def test_redis_requires_the_password(env: dict[str, str]) -> None:
    client = _redis(env)
    assert client.ping()
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert (
        client.config_get("repl-diskless-sync-delay")["repl-diskless-sync-delay"] == "0"
    )
    client.close()
    with pytest.raises(redis.AuthenticationError):
        _redis(env, password="wrong-password").ping()
    unauthenticated = redis.Redis(
        host=env["RAG_REDIS_HOST"],
        port=int(env["RAG_REDIS_PORT"]),
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )
    with pytest.raises(redis.AuthenticationError):
        unauthenticated.ping()


def test_services_listen_on_loopback_and_only_on_our_ports(stack: DevStack) -> None:
    ports = stack.ports()
    records = _records(stack)
    for name in ("postgres", "redis", "s3"):
        assert _listening_ports(records[name].pid) == {
            ("127.0.0.1", ports[name]["port"])
        }, name
    milvus = _listening_ports(records["milvus"].pid)
    ours = set(ports["milvus"].values())
    assert {
        port for _, port in milvus
    } <= ours  # nothing on 2379/2380/9091/19530 or other defaults
    assert ports["milvus"]["port"] in {port for _, port in milvus}
    # Milvus 2.3 binds its gRPC ports on all interfaces; its embedded etcd stays on loopback.
    for key in ("etcd", "etcd_peer"):
        assert ("127.0.0.1", ports["milvus"][key]) in milvus


def test_secrets_stay_out_of_argv_logs_and_status(
    stack: DevStack, env: dict[str, str]
) -> None:
    secrets = [env[name] for name in SECRET_ENV_NAMES if env.get(name)]
    state_file = stack.root / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack.root / "redis" / "redis.conf").stat().st_mode) == 0o600
    for name, record in _records(stack).items():
        for member in group_members(record.pgid):
            cmdline = (
                Path(f"/proc/{member.pid}/cmdline")
                .read_bytes()
                .decode(errors="replace")
            )
            environ = (
                Path(f"/proc/{member.pid}/environ")
                .read_bytes()
                .decode(errors="replace")
            )
            for secret in secrets:
                assert secret not in cmdline, (
                    f"{name} pid {member.pid} has a secret on its command line"
                )
                assert secret not in environ, (
                    f"{name} pid {member.pid} has a secret in its environment"
                )
    for log in (stack.root / "logs").iterdir():
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], f"a secret appears in {log}"
    status_text = json.dumps(stack.status())
    assert not [s for s in secrets if s in status_text]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_backup.devstack",
            "status",
            "--root",
            str(stack.root),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        check=True,
    )
    assert "running (pid" in cli.stdout
    assert not [s for s in secrets if s in cli.stdout + cli.stderr]


def test_env_command_output_can_be_evaluated_by_a_shell(
    stack: DevStack, env: dict[str, str]
) -> None:
    script = (
        f'eval "$({sys.executable} -m rag_backup.devstack env --root "$1")"; '
        'printf "%s\\n%s\\n%s\\n" "$RAG_PG_PORT" "$RAG_REDIS_PASSWORD" "$RAG_MILVUS_URI"'
    )
    result = subprocess.run(
        ["bash", "-c", script, "bash", str(stack.root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        check=True,
    )
    assert result.stdout.splitlines() == [
        env["RAG_PG_PORT"],
        env["RAG_REDIS_PASSWORD"],
        env["RAG_MILVUS_URI"],
    ]


# -- seeded data -----------------------------------------------------------------------------------
def test_postgres_seed(pg: psycopg2.extensions.connection) -> None:
    corpus = build_corpus()
    with pg.cursor() as cur:
        cur.execute(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        assert cur.fetchall() == [
            ("conversations", "ragqa_user"),
            ("documents", "ragqa_user"),
            ("feedback", "ragqa_user"),
        ]
        counts = {}
        for table in ("documents", "conversations", "feedback"):
            cur.execute(f"SELECT count(*) FROM {table}")
            counts[table] = cur.fetchone()[0]
        assert counts == {"documents": 2000, "conversations": 3000, "feedback": 1000}
        cur.execute("SELECT count(*) FROM documents WHERE title ~ '[\u0900-\u097f]'")
        hindi_titles = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM documents WHERE title ~ '[A-Za-z]{4}'")
        english_titles = cur.fetchone()[0]
        assert hindi_titles > 500 and english_titles > 500
        cur.execute(
            "SELECT count(*) FROM conversations WHERE question ~ '[\u0900-\u097f]'"
        )
        assert cur.fetchone()[0] > 500
        cur.execute(
            "SELECT id, title, metadata->>'ministry' FROM documents ORDER BY id LIMIT 1"
        )
        first = corpus.documents[0]
        assert cur.fetchone() == (first.id, first.title, first.metadata["ministry"])
        # Every cited document exists; feedback points at conversations (FK enforced).
        cur.execute(
            "SELECT count(*) FROM conversations c, unnest(c.document_ids) AS d(id) "
            "WHERE NOT EXISTS (SELECT 1 FROM documents WHERE documents.id = d.id)"
        )
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM documents WHERE image_key IS NOT NULL")
        assert cur.fetchone()[0] == len(corpus.documents_with_images)


def test_milvus_seed(env: dict[str, str], pg: psycopg2.extensions.connection) -> None:
    client = _milvus(env)
    try:
        assert set(client.list_collections()) >= {TEXT_COLLECTION, IMAGE_COLLECTION}
        text = client.describe_collection(TEXT_COLLECTION)
        dims = {f["name"]: f.get("params", {}).get("dim") for f in text["fields"]}
        assert int(dims["embedding"]) == 384
        images = client.describe_collection(IMAGE_COLLECTION)
        assert (
            int(
                {f["name"]: f.get("params", {}).get("dim") for f in images["fields"]}[
                    "embedding"
                ]
            )
            == 512
        )
        assert set(client.list_partitions(TEXT_COLLECTION)) >= {
            "lang_hi",
            "lang_en",
            "lang_hi_en",
        }
        for name in (TEXT_COLLECTION, IMAGE_COLLECTION):
            assert str(client.get_load_state(name)["state"]).endswith("Loaded")
            index = client.describe_index(name, client.list_indexes(name)[0])
            assert index["metric_type"] == "COSINE"
        text_ids = _all_ids(client, TEXT_COLLECTION)
        image_ids = _all_ids(client, IMAGE_COLLECTION)
        assert len(text_ids) == 2000
        assert (
            client.query(TEXT_COLLECTION, filter="", output_fields=["count(*)"])[0][
                "count(*)"
            ]
            == 2000
        )
        hits = client.search(
            TEXT_COLLECTION, data=[[0.05] * 384], limit=3, output_fields=["language"]
        )
        assert len(hits[0]) == 3
    finally:
        client.close()
    with pg.cursor() as cur:
        cur.execute("SELECT id FROM documents")
        document_ids = {row[0] for row in cur.fetchall()}
        cur.execute("SELECT id FROM documents WHERE image_key IS NOT NULL")
        with_images = {row[0] for row in cur.fetchall()}
    assert text_ids <= document_ids
    assert image_ids == with_images


def _all_ids(client, collection: str) -> set[int]:
    """Stream every id with an iterator (a plain query is capped at 16,384 rows by Milvus)."""
    iterator = client.query_iterator(
        collection, batch_size=500, filter="", output_fields=["id"]
    )
    ids: list[int] = []
    try:
        while batch := iterator.next():
            ids.extend(row["id"] for row in batch)
    finally:
        iterator.close()
    assert len(ids) == len(set(ids)), "the iterator returned an id twice"
    return set(ids)


def test_s3_seed_matches_the_documents_table(
    env: dict[str, str], pg: psycopg2.extensions.connection
) -> None:
    client = S3Settings.from_env(env).client()
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} >= {
        "documents",
        "models",
        "backups",
    }
    keys: dict[str, set[str]] = {}
    for bucket in ("documents", "models"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys[bucket] = {
            obj["Key"] for page in pages for obj in page.get("Contents", [])
        }
    prefixes = {
        bucket: {key.split("/", 1)[0] for key in found}
        for bucket, found in keys.items()
    }
    assert prefixes["documents"] == {"raw", "processed", "images", "thumbnails"}
    assert prefixes["models"] == {"base", "finetuned", "training_data", "eval_data"}
    with pg.cursor() as cur:
        cur.execute(
            "SELECT object_key FROM documents UNION ALL SELECT image_key FROM documents WHERE image_key IS NOT NULL"
        )
        referenced = [split_key(row[0]) for row in cur.fetchall()]
    missing = [
        f"{bucket}/{key}"
        for bucket, key in referenced
        if key not in keys.get(bucket, set())
    ]
    assert not missing, (
        f"{len(missing)} referenced objects are missing, e.g. {missing[:3]}"
    )

    raw = next(
        k
        for k in sorted(keys["documents"])
        if k.startswith("raw/") and int(k[4:-5]) % 5 == 0
    )
    head = client.head_object(Bucket="documents", Key=raw)
    assert head["ContentType"] == "text/html; charset=utf-8"
    assert head["Metadata"]["source"] == "crawler"
    body = client.get_object(Bucket="documents", Key=raw)["Body"].read().decode()
    assert body.startswith("<!DOCTYPE html>")
    image = client.get_object(
        Bucket="documents",
        Key=next(k for k in keys["documents"] if k.startswith("images/")),
    )
    assert image["ContentType"] == "image/png" and image["Body"].read().startswith(
        b"\x89PNG"
    )
    weights = client.head_object(
        Bucket="models", Key="base/multilingual-e5-small/model.safetensors"
    )
    assert weights["ContentLength"] > 5 * 1024 * 1024
    assert weights["ETag"].strip('"').endswith("-2"), (
        "the large model is a multipart upload"
    )


def test_redis_seed_has_keys_with_and_without_ttl(env: dict[str, str]) -> None:
    db0, db1 = _redis(env, 0), _redis(env, 1)
    try:
        answers = list(db0.scan_iter("cache:answer:*", count=1000))
        sessions = list(db0.scan_iter("session:*", count=1000))
        assert len(answers) == 300 and len(sessions) == 100
        assert all(0 < db0.ttl(k) <= ANSWER_TTL_S for k in answers[:20])
        assert all(
            0 < db0.ttl(k) <= SESSION_TTL_S and db0.type(k) == b"hash"
            for k in sessions[:20]
        )
        for key, kind in (
            ("config:model_version", b"string"),
            ("stats:queries", b"hash"),
            ("recent:questions", b"list"),
            ("popular:documents", b"zset"),
            ("languages", b"set"),
        ):
            assert db0.type(key) == kind and db0.ttl(key) == -1, key
        embeddings = list(db1.scan_iter("embedding:doc:*", count=1000))
        assert len(embeddings) == 200
        assert len(db1.get(embeddings[0])) == 384 * 4 and db1.ttl(embeddings[0]) > 0
        assert db1.ttl("feature:flags") == -1
    finally:
        db0.close()
        db1.close()


def test_corpus_is_deterministic() -> None:
    build_corpus.cache_clear()
    first = build_corpus()
    build_corpus.cache_clear()
    assert build_corpus() == first


# -- lifecycle -------------------------------------------------------------------------------------
def test_up_twice_reuses_the_running_services(
    stack: DevStack, env: dict[str, str]
) -> None:
    pids, ports = stack.pids(), stack.ports()
    assert set(pids) == set(ALL_SERVICES)
    again = DevStack(root=stack.root, services=ALL_SERVICES)  # as another process would
    assert again.up(seed=True) == env
    assert again.timings == {}, "nothing was started or seeded the second time"
    assert stack.pids() == pids and stack.ports() == ports
    assert all(load_state(stack.root).seeded[name] for name in ALL_SERVICES)


def test_down_stops_every_started_process_and_frees_the_ports(stack: DevStack) -> None:
    records = _records(stack)
    members = {
        name: [m.pid for m in group_members(r.pgid)] for name, r in records.items()
    }
    assert all(members.values())
    ports = [
        port
        for service_ports in stack.ports().values()
        for port in service_ports.values()
    ]
    assert sorted(stack.down()) == sorted(ALL_SERVICES)
    for name, record in records.items():
        assert not is_running(record), name
        assert not group_members(record.pgid), f"{name} left processes behind"
    busy = [port for port in ports if not port_is_free(port)]
    assert not busy, f"ports still bound after down: {busy}"
    assert set(stack.status().values()) == {"stopped"}
    assert set(stack.env()) == {"RAG_BACKUP_REPOSITORY", "DAGSTER_HOME"}
    assert stack.down() == []  # idempotent


# -- small stacks ----------------------------------------------------------------------------------
def test_up_restarts_a_dead_service_on_its_port_with_its_data(tmp_path: Path) -> None:
    stack = DevStack(root=tmp_path / "stack", services=("redis",))
    try:
        env = stack.up(seed=True)
        first = _records(stack)["redis"]
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while stack.status()["redis"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stack.status()["redis"] == "stopped"
        assert stack.up(seed=True) == env
        second = _records(stack)["redis"]
        assert second.pid != first.pid
        assert stack.ports()["redis"]["port"] == int(env["RAG_REDIS_PORT"])
        client = _redis(env)
        assert (
            client.get("config:model_version") == b"ministry-qa-v1"
        )  # the seed survived (RDB)
        client.close()
    finally:
        stack.down()
    assert not group_members(second.pgid)
    assert not group_members(first.pgid)


def test_a_subset_starts_alone_and_seeding_is_optional(tmp_path: Path) -> None:
    stack = DevStack(root=tmp_path / "stack", services=("postgres",))
    try:
        env = stack.up(seed=False)
        assert set(env) == set(ENV_NAMES["postgres"]) | set(ENV_NAMES["stack"])
        assert set(stack.status()) == {"postgres"}
        with (
            contextlib.closing(
                psycopg2.connect(
                    **PostgresSettings.from_env(env).connect_kwargs("ragqa")
                )
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cur.fetchone() == (0,)
        assert not load_state(stack.root).seeded.get("postgres")
    finally:
        stack.down()


def test_a_port_taken_before_the_server_binds_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_ports = devstack_base.free_ports
    handed_out: list[list[int]] = []

    def first_a_taken_port(count: int) -> list[int]:
        ports = [taken] if not handed_out else real_free_ports(count)
        handed_out.append(ports)
        return ports

    monkeypatch.setattr(devstack_base, "free_ports", first_a_taken_port)
    stack = DevStack(root=tmp_path / "stack", services=("redis",))
    try:
        env = stack.up(seed=False)
        assert int(env["RAG_REDIS_PORT"]) != taken
        assert len(handed_out) == 2
        assert (
            "Address already in use"
            in (stack.root / "logs" / "redis.log.prev").read_text()
        )
        assert _redis(env).ping()
    finally:
        stack.down()
        squatter.close()
