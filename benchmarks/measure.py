"""Measuring a contender: wall time, CPU and the peak RSS of its whole process tree.

Each contender runs in its own session; a sampler polls /proc for every process of that session
(children such as pg_dump, gzip or redis-cli included) every 50 ms and keeps the peaks of the
summed RSS and of the largest single process (VmHWM). ``ru_maxrss`` is not used: a child's
includes the RSS of the Python parent it was forked from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Self

from rag_backup.proc import tail
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.crypto import Identity
from rag_backup.repository.sealed import ENV_IDENTITY, ENV_RECIPIENTS, Crypto

MB = 1_000_000
SAMPLE_INTERVAL_S = 0.05


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- measuring a process tree ------------------------------------------------------------

def _session_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # fields after "(comm)": state ppid pgrp session ...
    return int(stat[stat.rindex(b")") + 2:].split()[3])


def _memory_kb(pid: str | int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process in kB; zeros once it is gone (or for kernel threads)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


def session_memory(session: int) -> tuple[int, int]:
    """Summed RSS, and the largest single peak RSS, of the live processes of ``session`` (bytes)."""
    members = [_memory_kb(pid) for pid in session_members(session)]
    return (sum(rss for rss, _ in members) * 1024,
            max((hwm for _, hwm in members), default=0) * 1024)


class TreeSampler(threading.Thread):
    """Polls the memory of one session until stopped; keeps the peaks."""

    def __init__(self, session: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name=f"rss-{session}", daemon=True)
        self.session, self.interval_s = session, interval_s
        self.peak_tree_bytes, self.peak_proc_bytes, self.samples = 0, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            tree, proc = session_memory(self.session)
            self.peak_tree_bytes = max(self.peak_tree_bytes, tree)
            self.peak_proc_bytes = max(self.peak_proc_bytes, proc)
            self.samples += 1
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass(frozen=True)
class ProcessStats:
    wall_s: float
    cpu_s: float
    peak_tree_rss_bytes: int
    max_proc_rss_bytes: int
    rss_samples: int
    stdout: str


@dataclass
class MeasuredRow:
    """One line of a benchmark's table: a contender's run in a phase and what
    ``run_measured`` measured of it (memory in MB). Each benchmark adds its own columns."""
    phase: str
    who: str
    what: str
    wall_s: float
    cpu_s: float
    tree_rss_mb: float
    proc_rss_mb: float

    @classmethod
    def of(cls, phase: str, who: str, what: str, stats: ProcessStats, **columns: Any) -> Self:
        return cls(phase, who, what, stats.wall_s, stats.cpu_s, stats.peak_tree_rss_bytes / MB,
                   stats.max_proc_rss_bytes / MB, **columns)


def session_members(session: int) -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _session_of(pid) == session]


def kill_session(session: int) -> None:
    """SIGKILL the contender's session; only while it has members, so its id cannot have been
    reused by an unrelated process."""
    if session_members(session):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)


def run_measured(argv: Sequence[str], *, what: str, timeout_s: float,
                 env: dict[str, str]) -> ProcessStats:
    """Run ``argv`` in its own session; time it, sample its tree's RSS, collect its rusage."""
    expired = threading.Event()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env={**os.environ, **env}, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()

        def expire() -> None:
            expired.set()
            kill_session(proc.pid)

        deadline = threading.Timer(timeout_s, expire)
        deadline.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: take the contender down with us
            kill_session(proc.pid)
            proc.wait()
            raise
        finally:
            wall = time.monotonic() - started
            deadline.cancel()
            sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        kill_session(proc.pid)  # nothing of a finished contender may outlive it
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read()
    if expired.is_set():
        raise RuntimeError(f"{what}: did not finish within {timeout_s:g} s; "
                           f"stderr: {tail(stderr) or '(empty)'}")
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: exited with code {proc.returncode}: "
                           f"{tail(stderr) or '(no stderr)'}")
    return ProcessStats(wall, usage.ru_utime + usage.ru_stime, sampler.peak_tree_bytes,
                        sampler.peak_proc_bytes, sampler.samples, stdout)


# -- encryption at rest: our contenders with and without it ------------------------------

ENCRYPTION_TARGET = 1.10  # encrypted / clear wall time, backup and restore (issue 14)


@cache
def _run_identity() -> Identity:
    """One key pair per benchmark run, generated here: the encrypted rows' backups and restores
    use the same one."""
    return Identity.generate()


def encryption_env(encrypted: bool) -> dict[str, str]:
    """The environment that makes a worker's repository (``open_repository``) encrypted with
    this run's key (RAG_BACKUP_ENCRYPT_TO / RAG_BACKUP_IDENTITY, as the command line reads
    them), or clear. Clear sets both empty: keys in the caller's own environment must not
    turn a clear row into an encrypted one."""
    if not encrypted:
        return {ENV_RECIPIENTS: "", ENV_IDENTITY: ""}
    identity = _run_identity()
    return {ENV_RECIPIENTS: str(identity.recipient), ENV_IDENTITY: identity.encode()}


def open_repository(path: str | Path) -> BackupRepository:
    """In a worker: the filesystem repository at ``path``, encrypted when the environment
    says so (``encryption_env``)."""
    return BackupRepository(FilesystemBackend(path), Crypto.from_env())


def encryption_overhead(pairs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]
                        ) -> dict[str, dict[str, Any]]:
    """Per phase, from its clear row and its encrypted row (each with ``wall_s`` and
    ``tree_rss_mb``): both wall times and peak tree RSS, the ratios encrypted / clear, and
    whether the time ratio is within ``ENCRYPTION_TARGET``."""
    out = {}
    for phase, (clear, encrypted) in pairs.items():
        ratio = encrypted["wall_s"] / clear["wall_s"]
        out[phase] = {
            "clear_s": round(clear["wall_s"], 3), "encrypted_s": round(encrypted["wall_s"], 3),
            "time_ratio": round(ratio, 4), "target": ENCRYPTION_TARGET,
            "within_target": ratio <= ENCRYPTION_TARGET,
            "clear_tree_rss_mb": round(clear["tree_rss_mb"], 1),
            "encrypted_tree_rss_mb": round(encrypted["tree_rss_mb"], 1),
            "tree_rss_ratio": round(encrypted["tree_rss_mb"] / clear["tree_rss_mb"], 4)}
    return out


def render_encryption(overhead: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The report's lines for ``encryption_overhead``."""
    lines = [f"encryption at rest (encrypted / clear: same data, same run; target: time <= "
             f"{ENCRYPTION_TARGET:.2f})",
             f"  {'':26}{'clear':>9}{'encrypted':>11}{'ratio':>7}"]
    for phase, o in overhead.items():
        verdict = "ok" if o["within_target"] else "ABOVE TARGET"
        lines.append(f"  {phase + ' time s':26}{o['clear_s']:9.2f}{o['encrypted_s']:11.2f}"
                     f"{o['time_ratio']:7.2f}  {verdict}")
        lines.append(f"  {phase + ' tree RSS MB':26}{o['clear_tree_rss_mb']:9.1f}"
                     f"{o['encrypted_tree_rss_mb']:11.1f}{o['tree_rss_ratio']:7.2f}")
    return lines


RECORDED_PACKAGES = ("dagster", "psycopg2-binary", "redis", "hiredis", "boto3", "minio",
                     "pymilvus", "pyarrow", "zstandard", "cryptography")


def versions() -> dict[str, str]:
    """The Python and package versions a benchmark ran with (constraints.txt pins them), so a
    result can be told apart from a drifted install."""
    import importlib.metadata
    import platform

    found = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def bench_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace, Path], dict],
               render: Callable[[dict], str], *, prefix: str) -> int:
    """The command line every store benchmark shares: ``--json FILE`` and ``--keep`` added to
    ``parser``; ``run(args, workdir)`` measures and returns the report, ``render`` prints it;
    the work directory is removed afterwards unless ``--keep``."""
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        report = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.setdefault("versions", versions())
    print(render(report))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
