"""Orphaned runs release their pool: real dagster-webserver and dagster-daemon processes on this
project's dagster.yaml (Dagster's storage in the session's PostgreSQL), with only the run
monitoring intervals shortened.

The test's code location holds one job whose single op takes a slot of a pool (limit 1, as every
store's pool) and keeps it until the test releases it, and the project's own
``run_failure_alert_sensor`` with the project's alert resource, pointed at a real HTTP receiver.

- ``test_a_killed_run_fails_frees_its_pool_slot_and_alerts``: the run worker is SIGKILLed while
  it holds the slot (a container killed, OOM, a crash). The run must end FAILURE, the slot must be
  freed by run monitoring (``free_slots_after_run_end_seconds``; without it the slot stays held
  for ever, the issue's symptom), a second run waiting for the pool must then run to SUCCESS, and
  the failure alert must arrive for the killed run only.
- ``test_a_hung_run_is_failed_by_run_monitoring``: the run worker stays alive and never finishes
  (as a worker stuck on a server that vanished); run monitoring's runtime limit (here the per-run
  tag ``dagster/max_runtime``, which overrides ``max_runtime_seconds``) terminates it and marks it
  FAILURE; its slot is given back and the failure alert goes out.

Locally runs are launched by the code server (DefaultRunLauncher), which reports a dead worker
itself; in the docker-compose deployment the daemon's run monitoring detects the dead container
(DockerRunLauncher health check). Freeing the slot is run monitoring's work in both.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rag_backup_tests.dagster_procs import LAUNCH, PROJECT, RUN_STATUS, DagsterUI, dagster_ui
from rag_backup_tests.receivers import webhook_server

STACK_SERVICES = ("postgres",)

LOCATION = "orphaned_runs_test"
JOB = "hold_pool_slot_job"
SENSOR = "run_failure_alert_sensor"
# The production run_monitoring block with short intervals: the daemon looks every second and
# frees a finished run's slots one second after its end.
TEST_RUN_MONITORING = {
    **yaml.safe_load((PROJECT / "dagster.yaml").read_text())["run_monitoring"],
    "poll_interval_seconds": 1,
    "free_slots_after_run_end_seconds": 1,
}
# Generous upper bounds for a loaded 2-core machine; every wait polls and returns early.
START_S, END_S, FREE_S, ALERT_S = 180, 120, 120, 150

DEFINITIONS = '''
"""Test code location: a job that holds a pool slot until released, and the project's
run-failure alert sensor with the project's alert resource (RAG_ALERT_* of the environment)."""
import os
import time
from pathlib import Path

import dagster as dg

from rag_backup.defs.automation import run_failure_alert_sensor
from rag_backup.defs.resources import default_resources

MARKERS = Path({markers!r})


@dg.op(pool={pool!r})
def hold_pool_slot(context) -> None:
    """Writes <run_id>.pid (this process: the run worker, in-process executor), then holds the
    slot until <run_id>.release exists (at most 10 minutes)."""
    tmp = MARKERS / f"{{context.run_id}}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(MARKERS / f"{{context.run_id}}.pid")
    deadline = time.monotonic() + 600
    while not (MARKERS / f"{{context.run_id}}.release").exists():
        if time.monotonic() > deadline:
            raise dg.Failure("the test never released this run")
        time.sleep(0.2)


@dg.job(executor_def=dg.in_process_executor, tags={{"store": "postgres"}})
def {job}():
    hold_pool_slot()


defs = dg.Definitions(jobs=[{job}], sensors=[run_failure_alert_sensor],
                      resources={{"alerts": default_resources()["alerts"]}})
'''

SENSOR_TICKS = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 1) { status } } }
  }
}"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class Harness:
    ui: DagsterUI
    instance: object  # dagster.DagsterInstance, on the same storage as the daemon
    pool: str
    markers: Path
    hooks: list[dict]

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, \
                f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.ui.log_tail()}"
            time.sleep(0.5)

    def launch(self, tags: dict[str, str] | None = None) -> str:
        params = {"selector": {"repositoryLocationName": LOCATION,
                               "repositoryName": "__repository__", "jobName": JOB},
                  "runConfigData": {}}
        if tags:
            params["executionMetadata"] = {"tags": [{"key": k, "value": v}
                                                    for k, v in tags.items()]}
        launched = self.ui.graphql(LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def status(self, run_id: str) -> str:
        return self.ui.graphql(RUN_STATUS, {"id": run_id})["runOrError"]["status"]

    def wait_finished(self, run_id: str, timeout_s: float) -> str:
        return self.wait_for(lambda: (s := self.status(run_id)) in FINISHED and s, timeout_s,
                             f"run {run_id} to finish")

    def worker_pid(self, run_id: str, timeout_s: float = START_S) -> int:
        """The run worker's pid, once its op runs (and so holds the pool slot)."""
        marker = self.markers / f"{run_id}.pid"

        def started():
            assert self.status(run_id) not in FINISHED, \
                f"run {run_id} ended before its op started\n{self.ui.log_tail()}"
            return marker.exists() and int(marker.read_text())
        return self.wait_for(started, timeout_s, f"run {run_id} to take the pool slot")

    def release(self, run_id: str) -> None:
        (self.markers / f"{run_id}.release").touch()

    def slot_holders(self) -> list[str]:
        info = self.instance.event_log_storage.get_concurrency_info(self.pool)
        return sorted(slot.run_id for slot in info.claimed_slots)

    def alerts_for(self, run_id: str) -> list[dict]:
        return [h["json"] for h in self.hooks if h["json"]["details"].get("run_id") == run_id]


@pytest.fixture(scope="module")
def harness(stack_env, tmp_path_factory) -> Iterator[Harness]:
    """One webserver + daemon for the module, on a fresh pool name (other tests share the
    session's Dagster storage)."""
    from dagster import DagsterInstance

    root = tmp_path_factory.mktemp("orphaned_runs")
    markers = root / "markers"
    markers.mkdir()
    pool = f"orphan_test_{uuid.uuid4().hex[:8]}"
    (root / "orphan_defs.py").write_text(textwrap.dedent(DEFINITIONS).format(
        markers=str(markers), pool=pool, job=JOB))
    workspace = root / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_file": {
        "relative_path": "orphan_defs.py", "location_name": LOCATION,
        "working_directory": str(root)}}]}))
    home = root / "dagster_home"
    saved = {k: os.environ.get(k) for k in stack_env if k.startswith("DAGSTER_PG_")}
    with webhook_server() as (url, hooks):
        env = {**stack_env, "RAG_BACKUP_AUTOMATION": "on", "RAG_ALERT_WEBHOOK_URL": url}
        os.environ.update({k: stack_env[k] for k in saved})  # for the test's own instance
        try:
            with dagster_ui(env, home, workspace=workspace,
                            instance_overrides={"run_monitoring": TEST_RUN_MONITORING}) as ui, \
                    DagsterInstance.from_config(str(home)) as instance:
                h = Harness(ui, instance, pool, markers, hooks)
                # A run-failure sensor starts watching at its first tick: wait for it.
                selector = {"repositoryLocationName": LOCATION,
                            "repositoryName": "__repository__", "sensorName": SENSOR}

                def ticked():
                    sensor = ui.graphql(SENSOR_TICKS, {"selector": selector})["sensorOrError"]
                    assert sensor["__typename"] == "Sensor", sensor
                    return sensor["sensorState"]["ticks"]
                h.wait_for(ticked, START_S, f"the first tick of {SENSOR}")
                try:
                    yield h
                finally:
                    # Nothing keeps running: release every run (the processes stop anyway).
                    for marker in markers.glob("*.pid"):
                        h.release(marker.name.removesuffix(".pid"))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def test_a_killed_run_fails_frees_its_pool_slot_and_alerts(harness):
    h = harness
    first = h.launch()
    pid = h.worker_pid(first)
    assert pid not in h.ui.pids.values(), "the op must run in the run worker, not the daemon"
    assert h.slot_holders() == [first]

    # A second run of the same pool waits: it cannot take the slot while the first holds it.
    second = h.launch()
    assert h.status(second) not in FINISHED
    assert not (h.markers / f"{second}.pid").exists() and h.slot_holders() == [first]

    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    assert h.wait_finished(first, END_S) == "FAILURE"
    failed_s = time.monotonic() - killed_at
    h.wait_for(lambda: first not in h.slot_holders(), FREE_S,
               f"run monitoring to free the slot of the killed run {first}")
    freed_s = time.monotonic() - killed_at

    # The second run now gets the slot, runs its op and succeeds.
    h.worker_pid(second)
    second_started_s = time.monotonic() - killed_at
    assert h.slot_holders() == [second]
    h.release(second)
    assert h.wait_finished(second, END_S) == "SUCCESS"
    h.wait_for(lambda: h.slot_holders() == [], FREE_S, "the second run to give its slot back")

    [alert] = h.wait_for(lambda: h.alerts_for(first), ALERT_S,
                         f"the run-failure alert for {first}")
    alerted_s = time.monotonic() - killed_at
    assert alert["kind"] == "run_failed" and alert["store"] == "postgres"
    assert alert["title"] == f"{JOB} failed"
    assert alert["details"]["job"] == JOB and alert["details"]["run_id"] == first
    assert h.alerts_for(second) == [], "the successful run must not alert"
    print(f"\nkilled -> FAILURE {failed_s:.1f} s, slot freed {freed_s:.1f} s, second run "
          f"started {second_started_s:.1f} s, alert {alerted_s:.1f} s")


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_hung_run_is_failed_by_run_monitoring(harness):
    """A worker that is alive but never finishes (never released here) is stopped by run
    monitoring's runtime limit and marked FAILURE; its slot is given back; the alert goes out."""
    h = harness
    hung = h.launch(tags={"dagster/max_runtime": "5"})
    pid = h.worker_pid(hung)
    assert h.slot_holders() == [hung]
    started_at = time.monotonic()
    assert h.wait_finished(hung, END_S) == "FAILURE"
    failed_s = time.monotonic() - started_at
    h.wait_for(lambda: hung not in h.slot_holders(), FREE_S, f"the slot of the hung run {hung}")
    h.wait_for(lambda: process_gone(pid), END_S, f"the worker {pid} of the hung run to exit")
    [alert] = h.wait_for(lambda: h.alerts_for(hung), ALERT_S,
                         f"the run-failure alert for {hung}")
    assert alert["details"]["run_id"] == hung and alert["kind"] == "run_failed"
    print(f"\nhung run: FAILURE {failed_s:.1f} s after its op started, alert "
          f"{time.monotonic() - started_at:.1f} s")
