"""The UI's own API, served by real webserver and daemon processes on Postgres storage."""

from __future__ import annotations

import time

from rag_backup_tests.dagster_procs import dagster_ui

ASSETS = """
{ assetNodes { assetKey { path } groupName kinds isPartitioned description } }
"""
DAEMONS = """
{ instance { daemonHealth { allDaemons { daemonType healthy } } } }
"""
STORAGE = """
{ instance { info } }
"""


def test_webserver_and_daemon_on_postgres_storage_show_the_postgres_assets(stack_env, tmp_path):
    with dagster_ui(stack_env, tmp_path / "dagster_home") as ui:
        nodes = {tuple(n["assetKey"]["path"]): n for n in ui.graphql(ASSETS)["assetNodes"]}
        for name in ("postgres_backup", "postgres_backup_verified", "postgres_retention"):
            node = nodes[(name,)]
            assert node["groupName"] == "postgres"
            assert "postgres" in node["kinds"]
            assert node["isPartitioned"]
            assert node["description"]

        info = ui.graphql(STORAGE)["instance"]["info"]
        assert "PostgresRunStorage" in info and "PostgresEventLogStorage" in info
        assert stack_env["DAGSTER_PG_PASSWORD"] not in info

        deadline = time.monotonic() + 120
        while True:
            daemons = ui.graphql(DAEMONS)["instance"]["daemonHealth"]["allDaemons"]
            if daemons and all(d["healthy"] for d in daemons):
                break
            assert time.monotonic() < deadline, (daemons, ui.log_tail())
            time.sleep(2)
        assert {"SCHEDULER", "SENSOR"} <= {d["daemonType"] for d in daemons}
