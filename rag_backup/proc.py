"""Subprocesses with a deadline, secrets in the environment and stderr in every error."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from rag_backup.errors import StoreWentAway, ToolError

STDERR_TAIL_CHARS = 4000


def tail(text: str | bytes, limit: int = STDERR_TAIL_CHARS) -> str:
    """The last ``limit`` characters of a tool's output, decoded leniently and stripped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def failure(what: str, tool: str, code: int, stderr: str,
            transient: Sequence[str] = ()) -> ToolError:
    """A tool's non-zero exit as an error carrying its stderr: ``StoreWentAway`` (retried)
    when the stderr has one of the ``transient`` markers (the store went away mid-way),
    ``ToolError`` (not retried) otherwise."""
    text = f"{what}: {tool} exited with code {code}: {stderr or '(no stderr)'}"
    lowered = stderr.lower()
    if any(marker.lower() in lowered for marker in transient):
        return StoreWentAway(f"{text} (the store went away during the operation: transient, "
                             "retried)")
    return ToolError(text)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours plus ``extra`` (where secrets such as PGPASSWORD go)."""
    env = dict(os.environ)
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    transient: Sequence[str] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion; raise ``ToolError`` naming ``what`` with the tool's stderr
    (``StoreWentAway`` when it has one of the ``transient`` markers)."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            timeout=timeout,
            env=child_env(env),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{what}: {argv[0]} did not finish within {timeout:.0f} s; "
                        f"stderr: {tail(exc.stderr or b'') or '(empty)'}") from exc
    except FileNotFoundError as exc:
        raise ToolError(f"{what}: {argv[0]} is not installed or not on PATH ({exc})") from exc
    if proc.returncode != 0:
        raise failure(what, argv[0], proc.returncode, tail(proc.stderr), transient)
    return proc


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies (a long-running
    child of a service killed with SIGKILL must not live on, holding what the service's next
    start needs)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@dataclass
class StreamingProcess:
    """A child whose stdout and/or stdin we stream, killed by process group at its deadline.

    stderr is drained in a thread so the child can never block on a full pipe.
    """

    argv: Sequence[str]
    what: str
    timeout: float
    env: Mapping[str, str] | None = None
    stdin: bool = False
    stdout: bool | IO[bytes] = True
    transient: Sequence[str] = ()  # stderr markers of a store that went away (retried)
    die_with_parent: bool = False  # SIGTERM the child when our process dies (Linux)
    proc: subprocess.Popen[bytes] = field(init=False)
    timed_out: bool = field(init=False, default=False)
    _stderr: bytearray = field(init=False, default_factory=bytearray)

    def __post_init__(self) -> None:
        try:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stdout=(subprocess.PIPE if self.stdout is True
                        else subprocess.DEVNULL if self.stdout is False else self.stdout),
                stderr=subprocess.PIPE,
                env=child_env(self.env),
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        except FileNotFoundError as exc:
            raise ToolError(f"{self.what}: {self.argv[0]} is not installed or not on PATH") from exc
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read(65536), b""):  # type: ignore[union-attr]
            self._stderr.extend(chunk)
            if len(self._stderr) > 4 * STDERR_TAIL_CHARS:
                del self._stderr[: len(self._stderr) - 2 * STDERR_TAIL_CHARS]

    def _expire(self) -> None:
        self.timed_out = True
        self.kill()

    def kill(self) -> None:
        """Kill the child's whole process group (it runs in its own session)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def stderr_text(self) -> str:
        return tail(bytes(self._stderr))

    def wait(self) -> int:
        """Wait for the child; raise ``ToolError`` on a timeout or a non-zero exit."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
            self.timed_out = True
        finally:
            self._timer.cancel()
            self._drain.join(timeout=5)
        if self.timed_out:
            raise ToolError(f"{self.what}: {self.argv[0]} did not finish within "
                            f"{self.timeout:.0f} s; stderr: {self.stderr_text or '(empty)'}")
        if code != 0:
            raise failure(self.what, self.argv[0], code, self.stderr_text, self.transient)
        return code

    def abort(self) -> None:
        """Kill the child and reap it, ignoring its exit status (used on our own errors)."""
        self.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            self._timer.cancel()
