"""Helpers for the point-in-time recovery tests: the WAL receiver as a real process, the
archive's catch-up, pgbench, a database's content by an independent means (SQL digests, not
our code), a recovered copy stopped and removed, and repository copies to damage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import psycopg2

from rag_backup.engines.postgres import PostgresServer
from rag_backup.engines.postgres.pitr import PitrReport, current_lag
from rag_backup.engines.postgres.pitr.instance import PgInstance
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.backends import TMP_MARKER

PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
COPY_HOST = "127.0.0.1"


# -- the WAL receiver ----------------------------------------------------------------------
class Receiver:
    """``python -m rag_backup wal-receiver`` in its own session, its output in ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.env, self.log_path, self.cwd = dict(env), log_path, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the receiver already runs"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rag_backup", "wal-receiver"], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=True)

    def kill(self) -> list[int]:
        """SIGKILL the receiver and every process under it (its pg_receivewal runs in a
        session of its own): a crash of the host or container, no chance to archive or report
        anything. Returns the pids killed."""
        assert self.proc is not None and self.proc.poll() is None, \
            f"the receiver is not running; its log: {self.log_tail()}"
        victims = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=15)
        for pid in victims[1:]:
            wait_gone(pid)
        return victims

    def children(self) -> list[tuple[int, str]]:
        """(pid, command) of the processes under the receiver."""
        assert self.proc is not None
        return [(pid, _cmdline(pid)) for pid in descendants(self.proc.pid)]

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM (the receiver stops pg_receivewal and archives what it completed)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._reap_group()

    def _reap_group(self) -> None:
        """Children of our receiver that outlived it (its session is ours alone)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


def wait_caught_up(repo: BackupRepository, server: PostgresServer, receiver: Receiver,
                   timeout_s: float = 90.0) -> None:
    """Wait until the archive holds everything the server has flushed (lag 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = current_lag(repo, server)
        if lag.seconds == 0:
            return
        assert receiver.running(), f"the WAL receiver exited; its log: {receiver.log_tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"the WAL archive did not catch up within {timeout_s:.0f} s: "
                                 f"{lag}; receiver log ends:\n{receiver.log_tail()}")
        time.sleep(0.3)


def wait_for_segment(repo: BackupRepository, name: str, receiver: Receiver,
                     timeout_s: float = 60.0) -> None:
    """Wait until the archive holds segment ``name``."""
    deadline = time.monotonic() + timeout_s
    while repo.wal.get(name) is None:
        assert receiver.running(), f"the WAL receiver exited; its log: {receiver.log_tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the WAL archive lacks {name} after {timeout_s:.0f} s (it holds "
                f"{sorted(s.name for s in repo.wal.segments())[-3:]} ..., histories "
                f"{sorted(repo.wal.histories())}); receiver log ends:\n{receiver.log_tail()}")
        time.sleep(0.3)


# -- the server ----------------------------------------------------------------------------
def connect(server: PostgresServer, database: str):
    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user,
                            password=server.password, dbname=database, connect_timeout=10)
    conn.autocommit = True
    return conn


def query(server: PostgresServer, database: str, statement: str, args=None) -> list[tuple]:
    conn = connect(server, database)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def server_now(server: PostgresServer) -> datetime:
    return query(server, "postgres", "SELECT clock_timestamp()")[0][0]


def pgbench(server: PostgresServer, database: str, *args: str) -> str:
    """pgbench (the native tool) against ``database``; the password only in the environment."""
    proc = subprocess.run(
        [server.tool("pgbench"), "-h", server.host, "-p", str(server.port), "-U", server.user,
         *args, database],
        env={"PATH": "/usr/bin:/bin", "PGPASSWORD": server.password, "LC_ALL": "C"},
        capture_output=True, timeout=300, check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"pgbench {' '.join(args)} failed: {out[-2000:]}"
    return out


def table_digest(server: PostgresServer, database: str, table: str) -> tuple[int, str]:
    """(rows, md5 of every row as text, sorted): the table's content, independent of its
    physical order."""
    (row,) = query(server, database,
                   f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' "
                   f"ORDER BY t::text), '')) FROM {table} t")
    return int(row[0]), row[1]


def bench_state(server: PostgresServer, database: str) -> dict[str, tuple[int, str]]:
    return {table: table_digest(server, database, table) for table in PGBENCH_TABLES}


# -- recovered copies ------------------------------------------------------------------------
def copy_server(report: PitrReport, credentials: PostgresServer) -> PostgresServer:
    """The recovered copy over TCP as the source's role (the copy has its roles)."""
    assert report.port, f"the report names no port: {report}"
    return PostgresServer(COPY_HOST, report.port, credentials.user, credentials.password)


def stop_copy(report: PitrReport) -> None:
    """Stop a copy left running (``keep_running``) and remove its work directory."""
    if not report.data_directory:
        return
    data = Path(report.data_directory)
    PgInstance(data, port=report.port or 0).stop(mode="immediate")
    shutil.rmtree(data.parent, ignore_errors=True)


@contextmanager
def running_copy(report: PitrReport, credentials: PostgresServer) -> Iterator[PostgresServer]:
    try:
        yield copy_server(report, credentials)
    finally:
        stop_copy(report)


# -- repositories --------------------------------------------------------------------------
def copy_repository(source: Path, dest: Path, crypto=None) -> BackupRepository:
    """A copy of a filesystem repository (a receiver may be writing into it: its temporary
    files are skipped) to damage without touching the original, opened with ``crypto``."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(f"*{TMP_MARKER}*"))
    return BackupRepository(FilesystemBackend(dest), crypto)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every live process under ``root`` (children, their children...)."""
    parents = {int(e): _ppid(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and not process_gone(pid):
                found.append(pid)
                frontier.append(pid)
    return found


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout_s} s"
        time.sleep(0.1)
