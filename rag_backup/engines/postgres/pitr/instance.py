"""A private PostgreSQL server on a data directory of our own (``PgInstance``).

Why: a point-in-time restore replays archived WAL into a copy of a base backup, and a base
backup's verification may start one too; both need a postmaster that we start, configure, watch
and stop ourselves, never the production server. It listens on 127.0.0.1 only (by default on a
port the kernel picked), keeps its unix socket in a private directory, and runs as the OS user
that owns the data directory: PostgreSQL refuses to run as root, so as root it runs as
``postgres``.

It runs in its own session with its output in ``log_path``: a Dagster step that ends, or is
killed, does not take it down when the caller leaves it running on purpose; ``stop`` ends it
(pg_ctl's fast shutdown, then SIGKILL of its process group). Its environment is minimal, so no
secret of ours reaches the server or its ``restore_command`` unless passed on purpose.
``recovery_summary`` reads what a recovery did from that log; ``configure`` makes the log
parseable (English messages, UTC times, a known line prefix).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rag_backup import progress
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import InvalidRequest, StoreUnreachable, ToolError
from rag_backup.proc import run, tail

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
HOST = "127.0.0.1"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, minus "/.s.PGSQL.NNNNN"
SHORT_SOCKET_ROOT = Path("/tmp")
POLL_S = 0.25
BIND_ATTEMPTS = 3
LOG_TAIL_CHARS = 1500
BLOCK_BEGIN = "# rag-backup PgInstance: begin (rewritten by configure)"
BLOCK_END = "# rag-backup PgInstance: end"
# What a copied cluster's own configuration must not do in a private instance, whatever it says.
PRIVATE_SETTINGS = {
    "listen_addresses": HOST,
    "archive_mode": "off",  # never push the copy's new timeline into the live WAL archive
    "primary_conninfo": "",  # a standby's copy must not stream from the live primary
    "primary_slot_name": "",
    "synchronous_standby_names": "",  # commits must not wait for the live standbys
    "ssl": "off",  # the source's certificate files need not exist here
    "logging_collector": "off",  # the log goes to log_path, where recovery_summary reads it
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] ",
    "log_timezone": "UTC",
    "timezone": "UTC",
    "lc_messages": "C",
}
SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")
# A log line under PRIVATE_SETTINGS' prefix: time, pid, level, message.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC \[\d+\] ([A-Z]+):  (.*)$")
PROBLEM_LEVELS = ("FATAL", "PANIC")
# FATALs our own connection attempts get while the server is not ready: not its problems.
NOT_READY = ("the database system is starting up", "not yet accepting connections",
             "the database system is shutting down", "the database system is in recovery mode")
# Log lines of a recovery that waits for an operator: it will not finish by itself.
PAUSED = ("recovery has paused", "pausing at the end of recovery")


def find_bindir() -> Path:
    """The newest installed server: Debian's ``/usr/lib/postgresql/<major>/bin``, else the
    directory of ``postgres`` on PATH."""
    versions = [(int(d.name), d / "bin") for d in DEBIAN_PG_ROOT.glob("*")
                if d.name.isdigit() and (d / "bin" / "postgres").exists()]
    if versions:
        return max(versions)[1]
    found = shutil.which("postgres")
    if not found:
        raise ToolError("no PostgreSQL server binaries (looked in /usr/lib/postgresql/*/bin "
                        "and PATH); install the Debian package postgresql")
    return Path(found).parent


def default_os_user() -> str | None:
    """``postgres`` when we are root (the server refuses root), else ``None``: ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def free_port() -> int:
    """A loopback port the kernel says is free now (it may be taken before the server binds:
    ``start`` retries on a bind failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def quote_setting(value: str) -> str:
    """A value as postgresql.conf reads it: single-quoted, quotes doubled."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise InvalidRequest(f"a PostgreSQL setting cannot hold a line break: {value!r}")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class OsUser:
    """The OS identity the server runs as: its uid, primary gid and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> OsUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            raise InvalidRequest(f"the OS user {name!r} to run PostgreSQL as does not exist "
                                 "(install the Debian package postgresql)") from exc
        return cls(name, entry.pw_uid, entry.pw_gid,
                   tuple(os.getgrouplist(name, entry.pw_gid)))


@dataclass(frozen=True)
class RecoverySummary:
    """What the last archive recovery in a server log did; ``None`` where the log is silent."""

    started_at: datetime | None
    finished_at: datetime | None  # the promoted server accepted connections
    # the WAL segments restore_command delivered, each once (PostgreSQL fetches the last one
    # again when it switches to the new timeline)
    restored_wal: tuple[str, ...]
    stop: str | None  # e.g. "recovery stopping before commit of transaction 751, time ..."
    stop_time: datetime | None  # the time of the transaction it stopped at
    last_transaction_at: datetime | None  # the newest transaction the copy holds
    redo_done_lsn: str | None
    new_timeline: int | None

    @property
    def restored_wal_files(self) -> int:
        return len(self.restored_wal)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {"started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                "duration_s": self.duration_s, "restored_wal_files": self.restored_wal_files,
                "restored_wal": list(self.restored_wal), "stop": self.stop,
                "stop_time": iso(self.stop_time),
                "last_transaction_at": iso(self.last_transaction_at),
                "redo_done_lsn": self.redo_done_lsn, "new_timeline": self.new_timeline}


def _log_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)


def _pg_time(text: str) -> datetime | None:
    """A timestamptz as the server prints it in messages (``2026-11-30 08:30:00.12+00``)."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def parse_recovery_log(text: str) -> RecoverySummary:
    """The ``RecoverySummary`` of the last recovery that started in ``text`` (a server log
    written with ``PRIVATE_SETTINGS``' prefix)."""
    lines = [m.groups() for m in map(LOG_LINE.match, text.splitlines()) if m]
    starts = [i for i, (_, _, msg) in enumerate(lines)
              if re.match(r"starting (point-in-time|archive) recovery", msg)]
    lines = lines[starts[-1]:] if starts else lines
    found: dict[str, Any] = {"restored": {}}
    for when, _, msg in lines:
        if m := re.match(r'restored log file "([0-9A-F]{24})" from archive', msg):
            found["restored"].setdefault(m.group(1))
        elif msg.startswith("recovery stopping "):
            found["stop"] = msg
            if m := re.search(r", time (.+)$", msg):
                found["stop_time"] = _pg_time(m.group(1))
        elif m := re.match(r"last completed transaction was at log time (.+)$", msg):
            found["last"] = _pg_time(m.group(1))
        elif m := re.match(r"redo done at ([0-9A-F]+/[0-9A-F]+)", msg):
            found["redo"] = m.group(1)
        elif m := re.match(r"selected new timeline ID: (\d+)", msg):
            found["timeline"] = int(m.group(1))
        elif msg.startswith("database system is ready to accept connections"):
            found.setdefault("finished", _log_time(when))
    return RecoverySummary(
        started_at=_log_time(lines[0][0]) if starts else None,
        finished_at=found.get("finished"), restored_wal=tuple(found["restored"]),
        stop=found.get("stop"), stop_time=found.get("stop_time"),
        last_transaction_at=found.get("last"), redo_done_lsn=found.get("redo"),
        new_timeline=found.get("timeline"))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its new parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: trust kill()
        return True


def _chown_tree(root: Path, user: OsUser) -> None:
    os.lchown(root, user.uid, user.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), user.uid, user.gid)


def _make_traversable(path: Path, user: OsUser) -> None:
    """Give ``user`` search (x) permission on ``path`` and its ancestors, adding only that bit
    (others can traverse, not list): a 0700 temporary directory above the data would stop the
    server's OS user."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        needed = (stat.S_IXUSR if st.st_uid == user.uid
                  else stat.S_IXGRP if st.st_gid in user.groups else stat.S_IXOTH)
        if not st.st_mode & needed:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | needed)


class PgInstance:
    """A postmaster of our own on ``data_dir``: prepare, configure, start, watch, stop."""

    def __init__(self, data_dir: Path, *, port: int = 0, bindir: Path | None = None,
                 os_user: str | None = None, log_path: Path | None = None) -> None:
        """``port`` 0: a free loopback port now, another on a bind failure. ``os_user``: the
        server's OS user (default ``postgres`` when we are root, else ourselves).
        ``log_path``: the server's output (default ``postgres.log`` beside the data)."""
        self.data_dir = Path(data_dir).absolute()
        self._auto_port = port == 0
        self.port = free_port() if self._auto_port else port
        self.bindir = bindir or find_bindir()
        name = os_user or default_os_user()
        self.os_user = None if name in (None, _current_user()) else OsUser.lookup(name)
        if self.os_user is not None and os.geteuid() != 0:
            raise InvalidRequest(f"only root can run PostgreSQL as {name!r} (we are "
                                 f"{_current_user()!r}); pass os_user=None")
        self.log_path = Path(log_path or self.data_dir.parent / "postgres.log").absolute()
        self.socket_dir = socket_dir_for(self.data_dir)
        self._settings: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def describe(self) -> str:
        return f"private PostgreSQL on {self.data_dir} ({HOST}:{self.port})"

    def server(self, user: str, password: str = "") -> PostgresServer:
        """How to reach this instance as ``user`` (over TCP: the copy's own roles)."""
        return PostgresServer(HOST, self.port, user, password, bin_dir=str(self.bindir))

    # -- the data directory ------------------------------------------------------------------
    def prepare_ownership(self, shared: Sequence[Path] = ()) -> None:
        """Make the data directory the server's: owned by its OS user (when we are root),
        mode 0700 (PostgreSQL refuses anything else), reachable through its ancestors.
        ``shared``: directories the server reads too (the WAL its restore_command copies)."""
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        for path in (self.data_dir, self.socket_dir):
            os.chmod(path, 0o700)
        if self.os_user is None:
            return
        for path in (self.data_dir, self.socket_dir, *map(Path, shared)):
            _chown_tree(path, self.os_user)
            _make_traversable(path.parent, self.os_user)

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        os.chmod(path, 0o600)
        if self.os_user is not None:
            os.chown(path, self.os_user.uid, self.os_user.gid)

    def configure(self, settings: Mapping[str, str] | None = None,
                  hba: str | None = None) -> None:
        """Write this instance's settings into postgresql.auto.conf (read last, so they win
        over the copied cluster's postgresql.conf and its includes): ``PRIVATE_SETTINGS``, the
        caller's (restore_command, recovery_target_*...), then the port, socket directory and
        pid file, always ours. ``hba``: the pg_hba.conf to use instead of the copied one."""
        conf = self.data_dir / "postgresql.conf"
        if not conf.exists():  # Debian keeps a cluster's configuration in /etc
            self._write_owned(conf, "# Written by rag-backup: the copied cluster had none; "
                                    "the settings are in postgresql.auto.conf.\n")
        files: dict[str, str] = {}
        if hba is not None:
            self._write_owned(self.data_dir / "pg_hba.conf", hba)
            ident = self.data_dir / "pg_ident.conf"
            if not ident.exists():
                self._write_owned(ident, "")
            files = {"hba_file": str(self.data_dir / "pg_hba.conf"), "ident_file": str(ident)}
        for name in (settings or {}):
            if not SETTING_NAME.match(name):
                raise InvalidRequest(f"{name!r} is not a PostgreSQL setting name")
        self._settings = {**PRIVATE_SETTINGS, **files, **(settings or {})}
        self._write_settings()

    def _write_settings(self) -> None:
        """Replace our block in postgresql.auto.conf (keeping the copied cluster's lines)."""
        auto = self.data_dir / "postgresql.auto.conf"
        kept = auto.read_text(encoding="utf-8") if auto.exists() else ""
        kept = re.sub(rf"\n?{re.escape(BLOCK_BEGIN)}\n.*?{re.escape(BLOCK_END)}\n", "", kept,
                      flags=re.S)
        values = {**self._settings, "port": str(self.port),
                  "unix_socket_directories": str(self.socket_dir),
                  # never the live server's pid file, should the copied configuration name it
                  "external_pid_file": str(self.socket_dir / "postgres.pid")}
        block = "".join(f"{name} = {quote_setting(value)}\n" for name, value in values.items())
        prefix = kept if not kept or kept.endswith("\n") else kept + "\n"
        self._write_owned(auto, f"{prefix}{BLOCK_BEGIN}\n{block}{BLOCK_END}\n")

    # -- the server process ------------------------------------------------------------------
    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        pid = self._postmaster_pid()
        return pid is not None and _alive(pid)

    def _clear_stale_pid(self) -> None:
        pid = self._postmaster_pid()
        if pid is not None and _alive(pid):
            raise InvalidRequest(f"a postmaster (pid {pid}) already runs on {self.data_dir}; "
                                 "stop it first")
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _identity(self) -> dict[str, Any]:
        if self.os_user is None:
            return {}
        return {"user": self.os_user.uid, "group": self.os_user.gid,
                "extra_groups": list(self.os_user.groups)}

    def _launch(self, env: Mapping[str, str]) -> None:
        child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", **env}
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                cwd="/", start_new_session=True, **self._identity())

    def _listening(self) -> bool:
        """The postmaster has opened its sockets: postmaster.pid has its status line."""
        try:
            return len((self.data_dir / "postmaster.pid").read_text().splitlines()) >= 8
        except FileNotFoundError:
            return False

    def start(self, timeout_s: float = 60.0, env: Mapping[str, str] | None = None) -> None:
        """Start ``postgres -D data_dir`` in its own session and wait until it listens (not
        until it accepts connections: ``wait_ready``). ``env``: extra environment for the
        server and its restore_command (e.g. credentials a fetch command needs)."""
        if self.is_running():
            raise InvalidRequest(f"{self.describe()} is already running")
        if not self._settings:
            raise InvalidRequest(f"{self.describe()}: call configure() before start()")
        self._clear_stale_pid()
        for attempt in range(1, BIND_ATTEMPTS + 1):
            self._launch(env or {})
            deadline = time.monotonic() + timeout_s
            while self.is_running() and not self._listening():
                if time.monotonic() > deadline:
                    self.stop()
                    raise ToolError(f"{self.describe()} did not open its sockets within "
                                    f"{timeout_s:.0f} s; {self._log_report()}")
                time.sleep(POLL_S)
            if self.is_running():
                return
            lost_port = "could not create any TCP/IP sockets" in self._log_text()
            if not (self._auto_port and lost_port) or attempt == BIND_ATTEMPTS:
                raise ToolError(f"{self.describe()} exited at start; {self._log_report()}")
            self.port = free_port()
            self._write_settings()

    def wait_ready(self, server: PostgresServer, timeout_s: float = 60.0,
                   database: str = "postgres") -> None:
        """Wait until ``server`` (this instance) accepts a connection; ``ToolError`` with the
        log if the server exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive("exited before accepting connections")
            try:
                server.connect(database).close()
                return
            except StoreUnreachable:
                pass
            if time.monotonic() > deadline:
                raise ToolError(f"{self.describe()} did not accept connections within "
                                f"{timeout_s:.0f} s; {self._log_report()}")
            time.sleep(POLL_S)

    def wait_recovery_finished(self, server: PostgresServer, timeout_s: float,
                               database: str = "postgres") -> None:
        """Wait until the recovery is over and the copy promoted (``pg_is_in_recovery()`` is
        false). ``ToolError`` carrying the server's FATAL lines if it exits (e.g. "recovery
        ended before configured recovery target was reached"), pauses (it would wait for an
        operator forever) or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive("exited during recovery")
            log = self._log_text()
            if any(marker in log for marker in PAUSED):
                raise ToolError(f"{self.describe()}: the recovery paused instead of promoting "
                                "(recovery_target_action 'pause', or hot standby impossible with "
                                f"these settings); {self._log_report()}")
            if self._in_recovery(server, database) is False:
                return
            if time.monotonic() > deadline:
                raise ToolError(f"{self.describe()}: recovery not finished within "
                                f"{timeout_s:.0f} s; {self._log_report()}")
            progress.checkpoint()  # WAL replay may take hours
            time.sleep(POLL_S)

    def _in_recovery(self, server: PostgresServer, database: str) -> bool | None:
        """``pg_is_in_recovery()``, or ``None`` while the server refuses connections."""
        try:
            conn = server.connect(database)
        except StoreUnreachable:
            return None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                return bool(cur.fetchone()[0])
        finally:
            conn.close()

    def _check_alive(self, what: str) -> None:
        if not self.is_running():
            raise ToolError(f"{self.describe()} {what}; {self._log_report()}")

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """Stop the server (``pg_ctl stop -m mode``), then SIGKILL its process group if it is
        still there; nothing to do if it is not running."""
        if not self.is_running():
            return
        try:
            run(self._as_os_user([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir),
                                  "-m", mode, "-t", str(int(timeout_s)), "-s"]),
                what=f"stopping {self.describe()}", timeout=timeout_s + 15)
        except ToolError:
            pass  # it did not stop in time (or pg_ctl could not tell): killed below
        if self.is_running():
            self._kill()
        if self.socket_dir.parent == SHORT_SOCKET_ROOT and not self.is_running():
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _kill(self) -> None:
        pid = self._proc.pid if self._proc is not None else self._postmaster_pid()
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)  # started by us: its own session, backends included
        except ProcessLookupError:
            try:
                os.kill(pid, signal.SIGKILL)  # started by someone else, in another group
            except ProcessLookupError:
                return
        deadline = time.monotonic() + 15
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _as_os_user(self, argv: list[str]) -> list[str]:
        return argv if self.os_user is None else ["runuser", "-u", self.os_user.name, "--",
                                                  *argv]

    # -- the log -----------------------------------------------------------------------------
    def _log_text(self, since_start: bool = True) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset if since_start else 0)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_report(self) -> str:
        """The server's FATAL/PANIC lines of this start, then the log's tail, for errors."""
        text = self._log_text()
        problems = [line for line in text.splitlines()
                    if any(f"{level}:  " in line for level in PROBLEM_LEVELS)
                    and not any(noise in line for noise in NOT_READY)]
        head = f"its errors: {' | '.join(problems[-5:])}; " if problems else ""
        return f"{head}log {self.log_path} ends: {tail(text, LOG_TAIL_CHARS) or '(empty)'}"

    def recovery_summary(self) -> RecoverySummary:
        """What the last recovery in this instance's log did (see ``parse_recovery_log``)."""
        return parse_recovery_log(self._log_text(since_start=False))


def socket_dir_for(data_dir: Path) -> Path:
    """Where an instance on ``data_dir`` keeps its unix socket: ``run/`` beside the data, or, when
    that path is too long for a socket (108 bytes on Linux: deep work directories are), a short
    directory under /tmp named after the data directory (the same for every ``PgInstance`` on
    it, so a kept-running copy is found again)."""
    beside = data_dir.parent / "run"
    if len(str(beside / ".s.PGSQL.65535")) <= SOCKET_PATH_MAX:
        return beside
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return SHORT_SOCKET_ROOT / f"rag-pg-{digest}"


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
