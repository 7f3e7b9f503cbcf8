"""Process, port and log helpers for the devstack.

Every service runs in its own session (``start_new_session=True``), so its process group id equals
the leader's pid and the whole group can be signalled at once. A process is identified by its pid
*and* its start time (field 22 of ``/proc/<pid>/stat``), so a recycled pid is never mistaken for
one of ours.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

LOG_TAIL_LINES = 40
BIND_FAILURE_MARKERS = (
    "address already in use",
    "could not bind",
    "could not create listen socket",
)


class DevStackError(RuntimeError):
    """A devstack service could not be started, reached or stopped."""


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc/<pid>/stat`` says about a process."""

    pid: int
    state: str
    pgid: int
    sid: int
    start_ticks: int


@dataclass
class ProcessRecord:
    """A process the devstack started; stored in the state file."""

    pid: int
    pgid: int
    start_ticks: int
    log_path: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessRecord:
        return cls(
            pid=int(data["pid"]),  # type: ignore[arg-type]
            pgid=int(data["pgid"]),  # type: ignore[arg-type]
            start_ticks=int(data["start_ticks"]),  # type: ignore[arg-type]
            log_path=str(data["log_path"]),
        )


def read_proc(pid: int) -> ProcInfo | None:
    """Parse ``/proc/<pid>/stat``; ``None`` if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        state=fields[0],
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start_ticks=int(fields[19]),
    )


def is_running(record: ProcessRecord) -> bool:
    """True if the recorded process still exists, is not a zombie and is the same process."""
    info = read_proc(record.pid)
    return (
        info is not None
        and info.state not in ("Z", "X")
        and info.start_ticks == record.start_ticks
    )


def group_members(pgid: int) -> list[ProcInfo]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        info = read_proc(int(entry.name))
        if info is not None and info.pgid == pgid and info.state not in ("Z", "X"):
            members.append(info)
    return members


def _owned_members(record: ProcessRecord) -> list[ProcInfo]:
    """Members of the record's process group that are provably ours.

    If a process with the leader's pid exists but started at another time, the pid (and so the
    group id) was recycled: nothing in that group is ours.
    """
    leader = read_proc(record.pgid)
    if (
        leader is not None
        and leader.pid == record.pid
        and leader.start_ticks != record.start_ticks
    ):
        return []
    return [
        m for m in group_members(record.pgid) if m.start_ticks >= record.start_ticks
    ]


def _signal_members(members: Sequence[ProcInfo], sig: signal.Signals) -> None:
    for member in members:
        try:
            os.kill(member.pid, sig)
        except ProcessLookupError:
            pass


def stop_process_group(
    record: ProcessRecord,
    *,
    first_signal: signal.Signals = signal.SIGTERM,
    grace_s: float = 15.0,
    kill_wait_s: float = 10.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> bool:
    """Stop a recorded process group: ``first_signal``, then SIGKILL after ``grace_s``.

    Signals go to the group's members individually (only the ones that are provably ours), which is
    the same as ``killpg`` for a group we created but cannot hit a recycled group id. Returns
    True if SIGKILL was needed. Raises DevStackError if members survive SIGKILL.
    """
    escalated = False
    members = _owned_members(record)
    if members:
        _signal_members(members, first_signal)
        if not _wait_until(lambda: not _owned_members(record), grace_s, popen):
            escalated = True
            _signal_members(_owned_members(record), signal.SIGKILL)
            if not _wait_until(lambda: not _owned_members(record), kill_wait_s, popen):
                alive = [m.pid for m in _owned_members(record)]
                raise DevStackError(
                    f"processes {alive} of group {record.pgid} survived SIGKILL"
                )
    if popen is not None:
        try:
            popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    return escalated


def _wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    popen: subprocess.Popen[bytes] | None,
) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if popen is not None:
            popen.poll()  # reap our own child so it does not linger as a zombie
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets are held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    """True if a listening socket could be bound to ``host:port`` right now.

    SO_REUSEADDR is set as every server does, so connections in TIME_WAIT do not count as busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
        return True


def port_accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (or a note that it does not exist)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log file at {path})"
    return "\n".join(data.splitlines()[-lines:])


def looks_like_bind_failure(log_text: str) -> bool:
    lowered = log_text.lower()
    return any(marker in lowered for marker in BIND_FAILURE_MARKERS)


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as ``<name>.prev``; the new run starts an empty file."""
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``.

    ``user`` switches the child to that OS user (only possible when we are root). The log file is
    opened by us, so it need not be writable by ``user``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd),
            start_new_session=True,
            user=user,
            group=_primary_group(user),
            extra_groups=[] if user is not None else None,
            restore_signals=True,
        )
    info = read_proc(popen.pid)
    start_ticks = info.start_ticks if info is not None else 0
    record = ProcessRecord(
        pid=popen.pid, pgid=popen.pid, start_ticks=start_ticks, log_path=str(log_path)
    )
    return popen, record


def _primary_group(user: str | None) -> int | None:
    if user is None:
        return None
    import pwd

    return pwd.getpwnam(user).pw_gid


def run_tool(
    argv: Sequence[str],
    *,
    service: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived tool; on failure raise DevStackError carrying the tool's stderr."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            user=user,
            group=_primary_group(user),
            extra_groups=[] if user is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DevStackError(
            f"{service}: `{' '.join(argv[:2])}` did not finish within {timeout_s:.0f} s; "
            f"stderr: {_text(exc.stderr)[-2000:]}"
        ) from exc
    if result.returncode != 0:
        raise DevStackError(
            f"{service}: `{' '.join(argv[:2])}` exited with {result.returncode}; "
            f"stderr: {result.stderr[-2000:]}{result.stdout[-1000:]}"
        )
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def wait_ready(
    *,
    service: str,
    probe: Callable[[], bool],
    popen: subprocess.Popen[bytes] | None,
    record: ProcessRecord,
    timeout_s: float,
    interval_s: float = 0.2,
) -> None:
    """Poll ``probe`` until it returns True; raise with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error = "the probe answered 'not ready'"
    while True:
        if popen is not None:
            popen.poll()
        if not is_running(record):
            raise ServiceExited(service, record.log_path)
        try:
            if probe():
                return
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready yet"
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise DevStackError(
                f"{service} did not become ready within {timeout_s:.0f} s (pid {record.pid}; last probe: "
                f"{last_error}); last lines of {record.log_path}:\n{tail(record.log_path)}"
            )
        time.sleep(interval_s)


class ServiceExited(DevStackError):
    """The service process exited while we waited for it to become ready."""

    def __init__(self, service: str, log_path: str) -> None:
        self.service = service
        self.log_tail = tail(log_path)
        self.bind_failure = looks_like_bind_failure(self.log_tail)
        super().__init__(
            f"{service} exited during startup; last lines of {log_path}:\n{self.log_tail}"
        )
