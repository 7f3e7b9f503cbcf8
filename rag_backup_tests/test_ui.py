"""The UI's own API, served by real webserver and daemon processes on Postgres storage."""

from __future__ import annotations

import time

from rag_backup_tests.dagster_procs import dagster_ui

ASSETS = """
{ assetNodes { assetKey { path } groupName kinds isPartitioned description } }
"""
DAEMONS = """
{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }
"""
STORAGE = """
{ instance { info } }
"""


def test_webserver_and_daemon_on_postgres_storage_show_the_backup_assets(stack_env, tmp_path):
    env = {**stack_env, "RAG_BACKUP_AUTOMATION": "off"}
    with dagster_ui(env, tmp_path / "dagster_home") as ui:
        nodes = {tuple(n["assetKey"]["path"]): n for n in ui.graphql(ASSETS)["assetNodes"]}
        for store in ("postgres", "redis", "milvus", "minio"):
            for name in (f"{store}_backup", f"{store}_backup_verified", f"{store}_retention"):
                node = nodes[(name,)]
                assert node["groupName"] == store
                assert store in node["kinds"]
                assert node["isPartitioned"]
                assert node["description"]

        info = ui.graphql(STORAGE)["instance"]["info"]
        assert "PostgresRunStorage" in info and "PostgresEventLogStorage" in info
        assert stack_env["DAGSTER_PG_PASSWORD"] not in info

        deadline = time.monotonic() + 120
        while True:
            daemons = ui.graphql(DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
            if daemons and all(d["healthy"] for d in daemons if d["required"]):
                break
            assert time.monotonic() < deadline, (daemons, ui.log_tail())
            time.sleep(2)
        assert {"SCHEDULER", "SENSOR"} <= {d["daemonType"] for d in daemons}
