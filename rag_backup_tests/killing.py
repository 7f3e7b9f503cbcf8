"""Kill a real backup mid-way: the shared part of every store's crash test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BACKUP_SCRIPT = """
import os
from rag_backup.engines import {store} as engine
from rag_backup.repository import BackupRepository, FilesystemBackend
repo = BackupRepository(FilesystemBackend({repo_dir!r}))
server = {server}
with repo.begin({store!r}, {partition!r}, "doomed") as pending:
    out = engine.backup(server, pending{backup_args})
    pending.commit(out)
"""


def kill_backup_while_writing(*, store: str, repo_dir: Path, partition: str, server: str,
                              password: str, backup_args: str = "",
                              timeout_s: float = 120) -> None:
    """Run ``engine.backup`` of ``store`` in a child (``server``: a Python expression building
    the engine's server object; its password is in ``os.environ['PW']``) and SIGKILL the
    child's process group as soon as an artifact is being written."""
    script = textwrap.dedent(BACKUP_SCRIPT).format(
        store=store, repo_dir=str(repo_dir), partition=partition, server=server,
        backup_args=backup_args)
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                             env={**os.environ, "PW": password})
    directory = repo_dir / store / partition
    deadline = time.monotonic() + timeout_s
    # an artifact being written: a temporary name inside the backup's own directory (not the
    # in-progress marker, whose write also goes through a temporary name)
    while not any(".tmp-" in p.name and p.parent != directory for p in directory.rglob("*")):
        assert child.poll() is None, "the backup finished before it could be killed"
        assert time.monotonic() < deadline, "the backup never started writing"
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
