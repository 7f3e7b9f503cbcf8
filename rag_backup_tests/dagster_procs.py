"""Real dagster-webserver and dagster-daemon processes on this project's dagster.yaml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.sys.executable).parent

# GraphQL the UI sends: launch a run, read its status.
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN_STATUS = """
query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DagsterUI:
    url: str
    home: Path
    logs: list[Path]
    pids: dict[str, int]

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"GraphQL {exc.code}: {exc.read().decode(errors='replace')}")

        assert "errors" not in doc, doc["errors"]
        return doc["data"]

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.logs if p.exists())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``. Members that outlive the leader
    get 5 s more, then SIGKILL: a code server waits for its runs to end before exiting (a run
    blocked on a pool slot never does), and its run workers are in the same group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def write_instance_yaml(home: Path, overrides: Mapping | None = None) -> dict:
    """``home/dagster.yaml``: the project's dagster.yaml with ``overrides`` replacing whole
    top-level sections (e.g. short ``run_monitoring`` intervals for a test). Returns it."""
    config = yaml.safe_load((PROJECT / "dagster.yaml").read_text())
    if overrides:
        config.update(overrides)
        (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    return config


@contextmanager
def dagster_ui(env: dict[str, str], home: Path, *, daemon: bool = True,
               startup_timeout: float = 180, workspace: Path | None = None,
               instance_overrides: Mapping | None = None) -> Iterator[DagsterUI]:
    """Start the webserver (and daemon) with ``home`` as DAGSTER_HOME; stop them afterwards.
    ``workspace``: another workspace.yaml than the project's; ``instance_overrides``: top-level
    sections of dagster.yaml to replace (see ``write_instance_yaml``)."""
    home.mkdir(parents=True, exist_ok=True)
    write_instance_yaml(home, instance_overrides)
    workspace = workspace or PROJECT / "workspace.yaml"
    port = free_port()
    child_env = {**os.environ, **env, "DAGSTER_HOME": str(home)}
    commands = {"webserver": [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                              str(port), "-w", str(workspace)]}
    if daemon:
        commands["daemon"] = [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)]
    procs, logs = [], []
    try:
        for name, argv in commands.items():
            log = home / f"{name}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(argv, cwd=PROJECT, env=child_env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        ui = DagsterUI(f"http://127.0.0.1:{port}", home, logs,
                       {name: proc.pid for name, proc in zip(commands, procs)})
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{ui.url}/server_info", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"dagster did not start:\n{ui.log_tail()}") from None
                time.sleep(1)
        yield ui
    finally:
        for proc in procs:
            _stop(proc)
