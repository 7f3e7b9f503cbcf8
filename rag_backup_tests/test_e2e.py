"""End to end with real processes, through the GraphQL API exactly as the UI uses it:
a backfill of missing partitions, a restore launched with launchpad config, partition status."""

from __future__ import annotations

import time
from datetime import timedelta

from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil
from rag_backup_tests.dagster_procs import LAUNCH, RUN_STATUS, DagsterUI, dagster_ui

BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""
PARTITION_STATUS = """
query($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
    }
  }
}"""
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def wait_for(predicate, timeout_s: float, what: str, ui: DagsterUI):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{ui.log_tail()}"
        time.sleep(2)


def test_backfill_restore_and_partition_status_through_the_ui_api(stack_env, pg, tmp_path):
    repo_dir = tmp_path / "repository"
    env = {**stack_env, "RAG_BACKUP_AUTOMATION": "off", "RAG_BACKUP_REPOSITORY": str(repo_dir),
           "RAG_PG_DATABASES": "ragqa"}
    days = [(utcnow() - timedelta(days=n)).strftime("%Y-%m-%d") for n in (2, 1)]
    target = f"ragqa_e2e_{int(time.time())}"
    with dagster_ui(env, tmp_path / "dagster_home") as ui:
        launched = ui.graphql(BACKFILL, {"params": {
            "partitionNames": days,
            "assetSelection": [{"path": [name]} for name in (
                "postgres_backup", "postgres_backup_verified", "postgres_retention")],
        }})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]

        def backfill_done():
            data = ui.graphql(BACKFILL_STATUS, {"id": backfill_id})
            runs = data["runsOrError"]["results"]
            finished = data["partitionBackfillOrError"]["status"] in ("COMPLETED",
                                                                      "COMPLETED_SUCCESS")
            return runs if finished and runs and all(r["status"] in DONE for r in runs) else None

        runs = wait_for(backfill_done, 420, "the backfill", ui)
        assert {r["status"] for r in runs} == {"SUCCESS"}, runs
        repo = BackupRepository(FilesystemBackend(repo_dir))
        assert all(repo.get("postgres", day).verified for day in days)

        statuses = ui.graphql(PARTITION_STATUS, {"key": {"path": ["postgres_backup"]}})
        ranges = statuses["assetNodeOrError"]["assetPartitionStatuses"]["ranges"]
        materialized = [r for r in ranges if r["status"] == "MATERIALIZED"]
        assert any(r["startKey"] <= days[0] and days[1] <= r["endKey"] for r in materialized)

        launched = ui.graphql(LAUNCH, {"params": {
            "selector": {"repositoryLocationName": "rag_backup",
                         "repositoryName": "__repository__", "jobName": "restore_postgres_job"},
            "runConfigData": {"ops": {"restore_postgres": {"config": {
                "partition_key": days[1], "target_database": target}}}},
        }})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status = wait_for(lambda: (s := ui.graphql(RUN_STATUS, {"id": run_id})["runOrError"][
            "status"]) in DONE and s, 300, "the restore run", ui)
        assert status == "SUCCESS", ui.log_tail()
    try:
        assert pgutil.execute(pg, target, "SELECT count(*) FROM documents") == \
            pgutil.execute(pg, "ragqa", "SELECT count(*) FROM documents")
    finally:
        pgutil.drop_database(pg, target)
