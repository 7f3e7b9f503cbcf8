"""The disaster rehearsal: README, "Disaster recovery: from nothing", step by step, with the
real processes.

Dagster's storage lives on PostgreSQL (a database of the session's server, as in test_ui.py).
Backups are taken through Dagster, and one by the command line. Then the site is lost: Dagster's
storage database and the service's database are dropped. PostgreSQL comes back with the command
line alone (no Dagster setting in its environment), Dagster's storage is recreated empty by the
deployment's own init script, the UI comes back, the catalog sensor is switched on as an
operator would, and every backup's partition is found again, with its metadata, through the
GraphQL API the UI uses.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from rag_backup.defs import postgres, redis
from rag_backup.defs.resources import BackupRepositoryResource, PostgresResource, RedisResource
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup_tests import pgutil
from rag_backup_tests.dagster_procs import PROJECT, VENV_BIN, DagsterUI, dagster_ui
from rag_backup_tests.dagster_procs import write_instance_yaml

STACK_SERVICES = ("postgres", "redis")
INIT_SCRIPT = PROJECT / "docker" / "postgres" / "initdb" / "10-dagster-storage.sh"
SERVICE_SCHEMA = """
CREATE TABLE documents (id bigserial PRIMARY KEY, title text NOT NULL, body text,
                        meta jsonb);
INSERT INTO documents (title, body, meta)
SELECT 'दस्तावेज़ ' || g, 'body ' || g, jsonb_build_object('n', g)
FROM generate_series(1, 3000) g;
CREATE TABLE conversations (id int PRIMARY KEY, document_id bigint REFERENCES documents(id),
                            question text);
INSERT INTO conversations SELECT g, g, 'question ' || g FROM generate_series(1, 500) g;
CREATE VIEW recent AS SELECT id, title FROM documents WHERE id > 2500;
COMMENT ON TABLE documents IS 'the RAG service''s documents';
"""
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}"""
ASSET = """
query($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      internalFreshnessPolicy { ... on TimeWindowFreshnessPolicy { failWindowSeconds } }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
      assetMaterializations(partitions: $partitions) {
        partition runId
        metadataEntries {
          label
          ... on TextMetadataEntry { text }
          ... on IntMetadataEntry { intRepr }
        }
      }
    }
  }
}"""
RUNS = """
{ runsOrError { ... on Runs { results { runId } } } }
"""


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, ui: DagsterUI) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{ui.log_tail()}"
        time.sleep(2)
    return value


def materialized(ui: DagsterUI, asset: str, partitions: list[str]) -> dict[str, dict] | None:
    """The partitions' newest materializations (metadata as text), if the UI shows every one
    of them as materialized and lists its materialization (the status can show a partition a
    moment before its event is listed)."""
    node = ui.graphql(ASSET, {"key": {"path": [asset]}, "partitions": partitions})[
        "assetNodeOrError"]
    ranges = node["assetPartitionStatuses"]["ranges"]
    shown = [r for r in ranges if r["status"] == "MATERIALIZED"]
    if not all(any(r["startKey"] <= p <= r["endKey"] for r in shown) for p in partitions):
        return None
    newest: dict[str, dict] = {}
    for event in node["assetMaterializations"]:  # newest first
        entries = {e["label"]: e.get("text", e.get("intRepr"))
                   for e in event["metadataEntries"]}
        newest.setdefault(event["partition"], {"run_id": event["runId"], **entries})
    return newest if all(p in newest for p in partitions) else None


def run_init_script(stack_env: dict[str, str], server_db: str, dagster_db: str) -> None:
    """Dagster's role and database, created by the deployment's own init script (what
    ``docker compose up dagster-postgres`` runs on an empty volume), as a superuser."""
    env = {"PATH": os.environ["PATH"], "PGHOST": stack_env["RAG_PG_HOST"],
           "PGPORT": stack_env["RAG_PG_PORT"], "PGPASSWORD": stack_env["RAG_PG_PASSWORD"],
           "POSTGRES_USER": stack_env["RAG_PG_USER"], "POSTGRES_DB": server_db,
           "DAGSTER_PG_USER": stack_env["DAGSTER_PG_USER"],
           "DAGSTER_PG_PASSWORD": stack_env["DAGSTER_PG_PASSWORD"], "DAGSTER_PG_DB": dagster_db}
    done = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def cli(stack_env: dict[str, str], repo_dir: Path, database: str, *args: str
        ) -> subprocess.CompletedProcess:
    """`rag-backup ...` as README's runbook runs it: the RAG_* settings only, no Dagster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER", "RAG_"))}
    env.update({k: v for k, v in stack_env.items() if k.startswith("RAG_")})
    env.update({"RAG_BACKUP_REPOSITORY": str(repo_dir), "RAG_PG_DATABASES": database})
    done = subprocess.run([str(VENV_BIN / "rag-backup"), *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=PROJECT)
    assert done.returncode == 0, f"rag-backup {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


@pytest.fixture
def names(pg):
    """This test's own service database, Dagster storage database and the database that stands
    in for the Dagster storage server's own; dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    chosen = {"service": f"ragqa_dr_{suffix}", "dagster": f"dagster_dr_{suffix}",
              "server": f"dagster_server_dr_{suffix}"}
    yield chosen
    for name in chosen.values():
        pgutil.drop_database(pg, name)


def test_a_site_comes_back_from_nothing(stack_env, pg, tmp_path, names, monkeypatch):
    repo_dir = tmp_path / "repository"
    repo = BackupRepository(FilesystemBackend(repo_dir))
    home = tmp_path / "dagster_home"
    home.mkdir()
    write_instance_yaml(home)
    dagster_env = {**{k: v for k, v in stack_env.items() if k.startswith("DAGSTER_PG_")},
                   "DAGSTER_PG_DB": names["dagster"]}
    for name, value in dagster_env.items():
        monkeypatch.setenv(name, value)
    pgutil.create_database(pg, names["service"], SERVICE_SCHEMA)
    pgutil.create_database(pg, names["server"], "")
    run_init_script(stack_env, names["server"], names["dagster"])
    before = pgutil.plain_dump(pg, names["service"])

    # The site as it was: backups taken through Dagster, on Dagster's PostgreSQL storage ...
    yesterday, today = postgres.POLICY.partitions_def.get_partition_keys()[-2:]
    hour = redis.POLICY.partitions_def.get_partition_keys()[-1]
    resources = {
        "repository": BackupRepositoryResource(location=str(repo_dir)),
        "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                     password=pg.password, databases=names["service"]),
        "redis": RedisResource(host=stack_env["RAG_REDIS_HOST"],
                               port=int(stack_env["RAG_REDIS_PORT"]),
                               password=stack_env["RAG_REDIS_PASSWORD"]),
    }
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        for assets, key in (([postgres.postgres_backup, postgres.postgres_backup_verified], today),
                            ([redis.redis_backup, redis.redis_backup_verified], hour)):
            assert dg.materialize(assets, partition_key=key, instance=instance,
                                  resources=resources).success
        assert instance.get_materialized_partitions(postgres.POLICY.backup_asset) == {today}
    finally:
        instance.dispose()
    # ... and one taken outside Dagster, by the command line.
    cli(stack_env, repo_dir, names["service"], "backup", "postgres", "--partition", yesterday)
    expected = {
        ("postgres_backup", yesterday): repo.get("postgres", yesterday),
        ("postgres_backup", today): repo.get("postgres", today),
        ("postgres_backup_verified", today): repo.get("postgres", today),
        ("redis_backup", hour): repo.get("redis", hour),
        ("redis_backup_verified", hour): repo.get("redis", hour),
    }
    assert repo.get("postgres", today).verified and repo.get("redis", hour).verified

    # The disaster: Dagster's storage and the service's database are gone.
    pgutil.drop_database(pg, names["dagster"])
    pgutil.drop_database(pg, names["service"])
    assert not {names["dagster"], names["service"]} & pgutil.databases(pg)

    # 1. PostgreSQL restored with the command line alone.
    database = names["service"]
    cli(stack_env, repo_dir, database, "restore", "postgres", "--partition-key", "latest",
        "--source-database", database, "--target-database", database, "--confirm", database)
    assert pgutil.plain_dump(pg, names["service"]) == before

    # 2. Dagster's storage recreated: the init script, an empty database.
    run_init_script(stack_env, names["server"], names["dagster"])

    # 3. The UI back; 4. the catalog sensor switched on; every backup's partition is back.
    env = {**stack_env, **dagster_env, "RAG_BACKUP_AUTOMATION": "off",
           "RAG_BACKUP_REPOSITORY": str(repo_dir), "RAG_PG_DATABASES": names["service"]}
    with dagster_ui(env, tmp_path / "dagster_home_after") as ui:
        assert ui.graphql(RUNS)["runsOrError"]["results"] == []  # nothing survived
        started = ui.graphql(START_SENSOR, {"selector": {
            "repositoryLocationName": "rag_backup", "repositoryName": "__repository__",
            "sensorName": "catalog_sensor"}})["startSensor"]
        assert started["__typename"] == "Sensor", started
        for asset in ("postgres_backup", "postgres_backup_verified", "redis_backup",
                      "redis_backup_verified"):
            partitions = sorted(p for a, p in expected if a == asset)
            shown = wait_for(lambda: materialized(ui, asset, partitions), 180,
                             f"{asset} {partitions} in the UI", ui)
            for partition in partitions:
                record, entries = expected[(asset, partition)], shown[partition]
                assert entries["backup_id"] == record.backup_id, (asset, partition)
                assert entries["reported_by"] == "catalog_sensor"
                assert entries["run_id"] == ""  # runless: reported, not re-run
                size = "size_bytes" if asset.endswith("_backup") else "bytes_checked"
                assert int(entries[size]) == record.manifest.size_bytes
        policy = ui.graphql(ASSET, {"key": {"path": ["postgres_backup_verified"]},
                                    "partitions": []})["assetNodeOrError"]
        # warned at the RPO (a day), failed past it plus the RPO sensor's grace (30 min)
        assert policy["internalFreshnessPolicy"] == {"failWindowSeconds": 86400 + 1800}
