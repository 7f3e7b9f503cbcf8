"""The machinery of ``pitr_bench.py``: a throwaway PostgreSQL cluster run by the ``postgres`` OS
user, pgBackRest configured on it, the pgbench write load, and the samplers (the WAL positions
once a second; the memory of long-running processes and of restored servers).

Nothing here decides what is compared; ``pitr_bench.py`` does. Every subprocess has a timeout;
every server started here is stopped by whoever started it (``Cluster.stop``,
``stop_postmaster``), also on an exception.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from measure import SAMPLE_INTERVAL_S, log
from measure import _memory_kb as memory_kb

from rag_backup.engines.postgres import PostgresServer
from rag_backup.proc import run, tail

OS_USER = "postgres"           # the server, pgBackRest and pg_ctl run as this user when we are root
PG_SUPERUSER = "postgres"      # the cluster's bootstrap superuser: the benchmark's only role
HOST = "127.0.0.1"
STANZA = "bench"
PG_CTL_TIMEOUT_S = 120.0
SEGMENT_FILE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})-[0-9a-f]{40}(\.\w+)?$")


# -- small helpers ---------------------------------------------------------------------

def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_end_lsn(name: str, segment_size: int) -> int:
    """The LSN just past WAL segment ``name`` (24 hex digits: timeline, log, segment)."""
    log_id, seg = int(name[8:16], 16), int(name[16:24], 16)
    return (log_id * (0x1_0000_0000 // segment_size) + seg + 1) * segment_size


def as_os_user(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the server's OS user when we are root (initdb and postgres refuse root).
    ``setpriv`` execs in place, so the process tree holds no extra wrapper process."""
    if os.geteuid() != 0:
        return list(argv)
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--",
                *argv]
    return ["runuser", "-u", OS_USER, "--", *argv]


def os_user_ids() -> tuple[int, int] | None:
    """(uid, gid) of the server's OS user when we are root, None when we run as ourselves."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(OS_USER)
    return entry.pw_uid, entry.pw_gid


def owned_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` for the server's OS user (the postgres user when we are root)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    ids = os_user_ids()
    if ids:
        os.chown(path, *ids)
    return path


def owned_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    ids = os_user_ids()
    if ids:
        os.chown(path, *ids)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, int(-(-share * len(ordered) // 1)))  # ceil
    return ordered[min(rank, len(ordered)) - 1]


def tool_output(argv: Sequence[str], timeout: float = 30.0) -> str:
    """First line of a tool's output (a version string); the error text if it fails."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({argv[0]}: {exc})"
    text = (proc.stdout or proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else f"({argv[0]} printed nothing)"


# -- /proc ----------------------------------------------------------------------------

def _stat(pid: str) -> tuple[str, int, int] | None:
    """``(comm, ppid, session)`` of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    close = raw.rindex(b")")
    comm = raw[raw.index(b"(") + 1:close].decode(errors="replace")
    fields = raw[close + 2:].split()
    return comm, int(fields[1]), int(fields[3])


def cmdline(pid: str | int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes() -> Iterable[tuple[str, str, int, int]]:
    """``(pid, comm, ppid, session)`` of every live process."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            st = _stat(pid)
            if st is not None:
                yield (pid, *st)


def is_server_process(comm: str) -> bool:
    """PostgreSQL server processes keep the comm ``postgres`` whatever their title says."""
    return comm == "postgres"


@dataclass
class Peak:
    """Peak summed RSS of a group of processes, and the largest single peak (VmHWM), bytes."""
    tree_bytes: int = 0
    proc_bytes: int = 0
    samples: int = 0

    def add(self, pids: Iterable[str | int]) -> None:
        mems = [memory_kb(pid) for pid in pids]
        if not mems:
            return
        self.tree_bytes = max(self.tree_bytes, sum(r for r, _ in mems) * 1024)
        self.proc_bytes = max(self.proc_bytes, max(h for _, h in mems) * 1024)
        self.samples += 1


class Poller(threading.Thread):
    """Calls ``tick`` every ``interval_s`` until stopped; an exception in ``tick`` is kept and
    ends the thread (re-raised by ``stop``)."""

    def __init__(self, name: str, interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def tick(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - reported by stop()
                self.error = exc
                return
            next_at += self.interval_s
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self, raise_error: bool = True) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=30)
        if raise_error and self.error is not None:
            raise RuntimeError(f"{self.name}: {self.error}") from self.error


class SessionMemory(Poller):
    """Peak RSS of one session's processes, PostgreSQL server processes excluded (those are
    measured per server by ``ServerMemory``)."""

    def __init__(self, session: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(f"rss-session-{session}", interval_s)
        self.session = session
        self.peak = Peak()

    def members(self, include_servers: bool = False) -> list[str]:
        return [pid for pid, comm, _, sid in processes()
                if sid == self.session and (include_servers or not is_server_process(comm))]

    def tick(self) -> None:
        self.peak.add(self.members())


class ServerMemory(Poller):
    """Peak RSS of the PostgreSQL server running on ``data_dir`` (postmaster and its children),
    found by its ``postmaster.pid`` (in ``data_dir`` or two levels below) or, failing that, by a
    postmaster whose command line names the directory."""

    def __init__(self, data_dir: Path, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(f"rss-server-{data_dir.name}", interval_s)
        self.data_dir = data_dir
        self.peak = Peak()
        self.postmaster: int | None = None

    def tick(self) -> None:
        if self.postmaster is None or not Path(f"/proc/{self.postmaster}").exists():
            self.postmaster = find_postmaster(self.data_dir)
        if self.postmaster is None:
            return
        pm = str(self.postmaster)
        members = [pid for pid, comm, ppid, _ in processes()
                   if pid == pm or (ppid == self.postmaster and is_server_process(comm))]
        self.peak.add(members)


def postmaster_pid_file(data_dir: Path) -> Path | None:
    """``postmaster.pid`` in ``data_dir`` or up to two levels below it."""
    for pattern in ("postmaster.pid", "*/postmaster.pid", "*/*/postmaster.pid"):
        with contextlib.suppress(OSError):
            found = next(iter(data_dir.glob(pattern)), None)
            if found is not None:
                return found
    return None


def find_postmaster(data_dir: Path) -> int | None:
    pid_file = postmaster_pid_file(data_dir)
    if pid_file is not None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if Path(f"/proc/{pid}").exists():
                return pid
    needle = str(data_dir)
    for pid, comm, _, _ in processes():
        if is_server_process(comm) and needle in cmdline(pid):
            st = _stat(pid)
            parent = _stat(str(st[1])) if st else None
            if parent is None or not is_server_process(parent[0]):  # the postmaster itself
                return int(pid)
    return None


def stop_postmaster(data_dir: Path, timeout_s: float = 60.0) -> bool:
    """Stop whatever server runs on ``data_dir``: fast shutdown (SIGINT), then SIGQUIT, then
    SIGKILL. We are root or the server's owner, so a signal reaches it whoever started it.
    Returns whether a server was running."""
    pid = find_postmaster(data_dir)
    if pid is None:
        return False
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGQUIT, 10.0),
                        (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return True
            time.sleep(0.1)
    return True


# -- measuring a contender -------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float
    peak_tree_rss_bytes: int
    max_proc_rss_bytes: int
    rss_samples: int
    stdout: str
    stderr: str


def run_contender(argv: Sequence[str], *, what: str, timeout_s: float,
                  env: dict[str, str] | None = None, cwd: Path | None = None) -> Measured:
    """Like ``measure.run_measured`` (own session, RSS of the session sampled from /proc every
    50 ms, CPU from wait4), with two differences: PostgreSQL server processes in the session are
    neither counted (``ServerMemory`` measures servers) nor killed when the contender exits (a
    restore may leave the server it started running, on purpose); and stderr is returned."""
    expired = threading.Event()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                cwd=cwd)
        sampler = SessionMemory(proc.pid)
        sampler.start()

        def kill_tools() -> None:
            for pid in sampler.members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

        def expire() -> None:
            expired.set()
            kill_tools()

        deadline = threading.Timer(timeout_s, expire)
        deadline.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill_tools()
            proc.wait()
            raise
        finally:
            wall = time.monotonic() - started
            deadline.cancel()
            sampler.stop(raise_error=False)
        proc.returncode = os.waitstatus_to_exitcode(status)
        kill_tools()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if expired.is_set():
        raise RuntimeError(f"{what}: did not finish within {timeout_s:g} s; "
                           f"stderr: {tail(stderr) or '(empty)'}")
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: exited with code {proc.returncode}: "
                           f"{tail(stderr) or tail(stdout) or '(no output)'}")
    return Measured(wall, usage.ru_utime + usage.ru_stime, sampler.peak.tree_bytes,
                    sampler.peak.proc_bytes, sampler.peak.samples, stdout, stderr)


# -- the cluster -----------------------------------------------------------------------

def find_bindir(major: int | None = None) -> Path:
    """Debian's ``/usr/lib/postgresql/<major>/bin`` (the newest, or ``major``)."""
    root = Path("/usr/lib/postgresql")
    found = sorted((int(p.name), p / "bin") for p in root.glob("*")
                   if p.name.isdigit() and (p / "bin" / "postgres").exists()) \
        if root.is_dir() else []
    if major is not None:
        found = [f for f in found if f[0] == major]
    if not found:
        raise SystemExit(f"PostgreSQL {major or ''} server binaries not found under {root}: "
                         "apt-get install -y postgresql-15")
    return found[-1][1]


@dataclass
class Cluster:
    """A PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port`` and a unix socket
    in ``socket_dir``, run as the ``postgres`` OS user (when we are root) with pg_ctl."""

    bindir: Path
    data_dir: Path
    port: int
    socket_dir: Path
    log_file: Path
    started: bool = field(default=False, init=False)

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def server(self) -> PostgresServer:
        return PostgresServer(HOST, self.port, PG_SUPERUSER, "", bin_dir=str(self.bindir))

    def initdb(self, settings: dict[str, str], hba: str) -> None:
        owned_dir(self.data_dir)
        owned_dir(self.socket_dir, 0o755)
        run(as_os_user([self.tool("initdb"), "-D", str(self.data_dir), "-U", PG_SUPERUSER,
                        "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"]),
            what="initdb", timeout=PG_CTL_TIMEOUT_S)
        lines = ["", "# pitr_bench"] + [f"{k} = {v}" for k, v in settings.items()]
        with open(self.data_dir / "postgresql.conf", "a") as fh:
            fh.write("\n".join(lines) + "\n")
        (self.data_dir / "pg_hba.conf").write_text(hba)

    def start(self, options: Sequence[str] = (), wait: bool = True) -> None:
        """pg_ctl start; ``options`` go to postgres (``-c name=value``). Without ``wait`` it
        returns once the postmaster is spawned (a recovering server is waited for by the
        caller)."""
        argv = [self.tool("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                "-t", str(int(PG_CTL_TIMEOUT_S)), "-w" if wait else "-W"]
        if options:
            argv += ["-o", " ".join(options)]
        self.log_file.touch()
        ids = os_user_ids()
        if ids:
            os.chown(self.log_file, *ids)
        run(as_os_user([*argv, "start"]), what=f"pg_ctl start {self.data_dir}",
            timeout=PG_CTL_TIMEOUT_S + 10)
        self.started = True

    def stop(self) -> None:
        if not self.started and find_postmaster(self.data_dir) is None:
            return
        try:
            run(as_os_user([self.tool("pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                            "-t", "60", "stop"]), what=f"pg_ctl stop {self.data_dir}",
                timeout=90)
        except Exception as exc:  # noqa: BLE001 - fall back to signals
            log(f"pg_ctl stop failed ({tail(str(exc), 300)}); signalling the postmaster")
            stop_postmaster(self.data_dir)
        self.started = False

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return tail(self.log_file.read_text(errors="replace"), chars)
        except OSError:
            return "(no server log)"


def execute(server: PostgresServer, statement: str, params: Sequence | dict | None = None,
            database: str = "postgres") -> list[tuple]:
    """One statement in autocommit mode; its rows, if any."""
    conn = server.connect(database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_promoted(server: PostgresServer, timeout_s: float,
                  alive: Callable[[], str | None] | None = None) -> float:
    """Poll until the server accepts connections and ``pg_is_in_recovery()`` is false; the
    monotonic time when it was seen. ``alive()`` returns an error text once the server died."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = server.connect("postgres")
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_is_in_recovery()")
                    if not cur.fetchone()[0]:
                        return time.monotonic()
                    last = "still in recovery"
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - starting up, refused: try again
            last = tail(str(exc), 300)
        if alive is not None:
            died = alive()
            if died:
                raise RuntimeError(died)
        time.sleep(0.1)
    raise RuntimeError(f"{server.describe()} not promoted within {timeout_s:g} s ({last})")


# -- pgBackRest ------------------------------------------------------------------------

@dataclass
class PgBackRest:
    """pgBackRest with its own configuration file, repository, log, lock and spool directories
    under ``root``, for stanza ``bench`` on ``cluster``."""

    root: Path
    cluster: Cluster
    process_max: int = 1
    compress_type: str | None = None  # None: pgBackRest's default

    @property
    def config(self) -> Path:
        return self.root / "pgbackrest.conf"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def push_log(self) -> Path:
        return self.root / "archive-push.times"

    @property
    def archive_script(self) -> Path:
        return self.root / "archive-push.sh"

    def write_config(self) -> None:
        owned_dir(self.root, 0o755)
        for sub in ("repo", "log", "lock", "spool"):
            owned_dir(self.root / sub)
        # compress-type (unless asked) and compress-level are left at pgBackRest's defaults.
        compress = [f"compress-type={self.compress_type}"] if self.compress_type else []
        owned_file(self.config, "\n".join([
            "[global]",
            *compress,
            f"repo1-path={self.repo}",
            "repo1-retention-full=2",
            f"log-path={self.root / 'log'}",
            f"lock-path={self.root / 'lock'}",
            f"spool-path={self.root / 'spool'}",
            f"process-max={self.process_max}",
            "start-fast=y",
            "log-level-console=warn",
            "log-level-file=info",
            "",
            f"[{STANZA}]",
            f"pg1-path={self.cluster.data_dir}",
            f"pg1-port={self.cluster.port}",
            f"pg1-socket-path={self.cluster.socket_dir}",
            f"pg1-user={PG_SUPERUSER}",
            "",
        ]), 0o644)
        # archive_command: pgBackRest's archive-push, with the start and end of every push
        # appended to a file (two `date` calls: ~2 ms per 16 MB segment).
        owned_file(self.push_log, "", 0o644)
        owned_file(self.archive_script, "\n".join([
            "#!/bin/sh",
            "# pitr_bench: pgbackrest archive-push, timed",
            'start=$(date +%s.%N)',
            f'{shutil.which("pgbackrest")} --config={self.config} --stanza={STANZA} '
            'archive-push "$1"',
            "rc=$?",
            f'echo "$start $(date +%s.%N) $rc $1" >> {self.push_log}',
            "exit $rc",
            "",
        ]), 0o755)

    def argv(self, *args: str) -> list[str]:
        return as_os_user(["pgbackrest", f"--config={self.config}", f"--stanza={STANZA}", *args])

    def run(self, *args: str, timeout: float) -> str:
        proc = run(self.argv(*args), what=f"pgbackrest {args[-1]}", timeout=timeout,
                   env={"PGBACKREST_CONFIG": str(self.config)})
        return proc.stdout.decode(errors="replace")

    def newest_archived_end(self, segment_size: int) -> int | None:
        """The end LSN of the newest WAL segment in the repository's archive (None if none)."""
        stanza_dir = self.repo / "archive" / STANZA
        try:
            archive_ids = sorted((d for d in os.listdir(stanza_dir) if "-" in d), reverse=True)
        except OSError:
            return None
        for archive_id in archive_ids:
            try:
                log_dirs = sorted((d for d in os.listdir(stanza_dir / archive_id)
                                   if len(d) == 16), reverse=True)
            except OSError:
                continue
            for log_dir in log_dirs:
                try:
                    names = [n for n in os.listdir(stanza_dir / archive_id / log_dir)
                             if SEGMENT_FILE.match(n)]
                except OSError:
                    continue
                if names:
                    return segment_end_lsn(max(names)[:24], segment_size)
        return None

    def pushes(self) -> list[tuple[float, float, int, str]]:
        """Every timed archive-push: (start, end, exit code, WAL path)."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.push_log.read_text().splitlines():
                parts = line.split(" ", 3)
                if len(parts) == 4:
                    with contextlib.suppress(ValueError):
                        out.append((float(parts[0]), float(parts[1]), int(parts[2]), parts[3]))
        return out

    def backup_options(self, label: str) -> dict[str, str]:
        """The ``[backup:option]`` section of a backup's manifest (what it really used:
        compress-type, compress-level, process-max, ...)."""
        manifest = self.repo / "backup" / STANZA / label / "backup.manifest"
        options: dict[str, str] = {}
        section = ""
        with contextlib.suppress(OSError):
            for line in manifest.read_text().splitlines():
                if line.startswith("["):
                    section = line.strip("[]")
                elif section == "backup:option" and "=" in line:
                    key, value = line.split("=", 1)
                    options[key] = value.strip('"')
        return options


# -- the load ----------------------------------------------------------------------------

@dataclass
class Load:
    """``pgbench -c 2 -j 1 -R <rate>`` against ``database``: started, later stopped."""

    cluster: Cluster
    database: str
    rate: int
    max_seconds: int
    log_file: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    stopped_at: float = 0.0

    def argv(self) -> list[str]:
        return [self.cluster.tool("pgbench"), "-c", "2", "-j", "1", "-R", str(self.rate),
                "-T", str(self.max_seconds), "-n", "-P", "30", "-h", HOST,
                "-p", str(self.cluster.port), "-U", PG_SUPERUSER, self.database]

    def start(self) -> None:
        self._out = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.time()

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"pgbench stopped early (code {self.proc.returncode}): "
                               f"{tail(self.log_file.read_bytes(), 800)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.stopped_at = time.time()
        self._out.close()
        self.proc = None


# -- WAL positions, once a second --------------------------------------------------------

@dataclass(frozen=True)
class WalSample:
    t: float                        # epoch seconds, when the server's position was read
    lsn: int                        # pg_current_wal_lsn(): what the server had written
    archived: dict[str, int | None]  # per side: the end of what its archive holds
    reported: dict[str, int | None]  # per side: the archive's end as the side reports it
    caught_up_at: dict[str, float | None]  # per side, where it says so itself


# () -> (archived end read from the repository, archived end as reported, caught_up_at epoch)
ArchiveReader = Callable[[], tuple[int | None, int | None, float | None]]


class WalSampler(Poller):
    """Reads the server's WAL write position and each side's archived position every second."""

    def __init__(self, server: PostgresServer, readers: dict[str, ArchiveReader],
                 interval_s: float = 1.0) -> None:
        super().__init__("wal-sampler", interval_s)
        self.server = server
        self.readers = readers
        self.samples: list[WalSample] = []
        self.reader_errors: dict[str, str] = {}
        self._conn = None

    def tick(self) -> None:
        if self._conn is None:
            self._conn = self.server.connect("postgres")
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text")
            lsn = parse_lsn(cur.fetchone()[0])
        t = time.time()
        archived: dict[str, int | None] = {}
        reported: dict[str, int | None] = {}
        caught: dict[str, float | None] = {}
        for side, reader in self.readers.items():
            try:
                archived[side], reported[side], caught[side] = reader()
            except Exception as exc:  # noqa: BLE001 - a side that cannot be read has no position
                self.reader_errors[side] = tail(f"{type(exc).__name__}: {exc}", 300)
                archived[side], reported[side], caught[side] = None, None, None
        self.samples.append(WalSample(t, lsn, archived, reported, caught))

    def stop(self, raise_error: bool = True) -> None:
        super().stop(raise_error)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def lsn_at(self, t: float) -> int | None:
        """The server's write position at the last sample taken at or before ``t``."""
        times = [s.t for s in self.samples]
        i = bisect.bisect_right(times, t) - 1
        return self.samples[i].lsn if i >= 0 else None


def archive_lags(samples: Sequence[WalSample], side: str, start: float, end: float,
                 source: str = "archived") -> tuple[list[float], int]:
    """The lag of ``side``'s archive at every sample in [start, end]: how long ago the server
    had written the newest position the archive holds. With samples a second apart this is an
    upper bound, within one sample interval: the server passed that position between the last
    sample at or below it and the next. Returns (lags, samples where the archive was still
    empty, counted as the whole time since the first sample). ``source``: ``archived`` (read
    from the repository) or ``reported`` (the side's own status)."""
    lsns = [s.lsn for s in samples]
    lags, empty = [], 0
    for i, s in enumerate(samples):
        if not start <= s.t <= end:
            continue
        archived = getattr(s, source).get(side)
        if archived is None:
            lags.append(s.t - samples[0].t)
            empty += 1
            continue
        if archived >= s.lsn:
            lags.append(0.0)
            continue
        j = bisect.bisect_right(lsns, archived, 0, i + 1) - 1
        lags.append(s.t - samples[max(j, 0)].t)
        if j < 0:
            empty += 1
    return lags, empty


def self_reported_lags(samples: Sequence[WalSample], side: str, start: float,
                       end: float) -> list[float]:
    """``now - caught_up_at`` as the side reports it (ours' status.json), per sample."""
    return [s.t - s.caught_up_at[side] for s in samples
            if start <= s.t <= end and s.caught_up_at.get(side) is not None]


# -- the long-running processes' memory -----------------------------------------------------

class BackgroundMemory(Poller):
    """Peaks of the long-running pieces, for the whole run: one session (our WAL receiver and
    its pg_receivewal) and every ``pgbackrest ... archive-push`` the server's archiver runs
    (short-lived: one per segment; its VmHWM is read while it lives, every 100 ms)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        super().__init__("rss-background", interval_s)
        self.sessions: set[int] = set()
        self.receiver = Peak()
        self.archive_push = Peak()
        self.archive_push_pids: set[str] = set()
        self._not_push: set[str] = set()

    def tick(self) -> None:
        receiver, pushes = [], []
        for pid, comm, _, sid in processes():
            if sid in self.sessions:
                receiver.append(pid)
            elif comm == "pgbackrest" and pid not in self._not_push:
                if "archive-push" in cmdline(pid):
                    pushes.append(pid)
                    self.archive_push_pids.add(pid)
                else:
                    self._not_push.add(pid)
        self.receiver.add(receiver)
        for pid in pushes:  # one at a time: the archiver runs one archive_command at once
            self.archive_push.add([pid])
