"""PostgreSQL point-in-time recovery: rag-backup's WAL receiver, base backup and PITR restore
against pgBackRest (and, for context, the runbook's daily dump), in one run, on one cluster under
a steady pgbench write load.

The cluster: a PostgreSQL cluster of the benchmark's own (initdb under ``--workdir``, run as the
``postgres`` OS user when we are root, on a free 127.0.0.1 port, trust authentication: it is
thrown away), ``wal_level=replica``, ``archive_mode=on`` with pgBackRest's ``archive-push`` as
``archive_command`` and ``archive_timeout=--archive-timeout``. One database, ``bench``:
``pgbench -i -s SCALE`` plus ``bench_random`` (128 random base64 characters a row, 40,000 rows per
scale unit as in postgres_bench.py), so compression is not flattered by pgbench's blank-padded
rows. While the data is generated, ``archive_command`` is ``true``: neither side archives the
generation's WAL, both start from the loaded database.

pgBackRest 2.45 (Debian): its own configuration file in the work directory, stanza ``bench``,
``process-max=1`` (our base backup is one stream), ``start-fast=y`` (immediate checkpoint;
otherwise it waits for the next scheduled one), compress-type and level left at pgBackRest's
defaults (gz, 6 in 2.45; the report says what the backup's manifest recorded).

Ours: ``python -m rag_backup wal-receiver`` (a long-running service streaming WAL with
pg_receivewal into the repository, ``RAG_PG_WAL_SWITCH_AFTER_S=--archive-timeout``),
``take_base_backup()`` and ``restore_to_time()``, each in its own interpreter (this file's
``_worker`` mode) so no memory of the benchmark is attributed to them.

The run, under ``pgbench -c 2 -j 1 -R --load-rate`` from after the receivers start to the end:

base backup  (a ``CHECKPOINT`` before each, untimed)
  ours       ``take_base_backup()`` into a filesystem repository; size = the manifest's artifacts.
             pgBackRest's backup returns only once its archive holds the WAL up to the
             backup's end (archive-check); ours returns before, so the time until our archive
             holds the backup's end WAL is reported too ("restorable after")
  pgBackRest ``pgbackrest backup --type=full``; size = ``pgbackrest info``'s repository size
  runbook    context only, not PITR: the runbook's daily ``pg_dump -Fc | gzip`` of ``bench``
WAL archive lag (the RPO), ``--lag-seconds`` long
  Once a second: the server's ``pg_current_wal_lsn()`` and each archive's newest position (ours:
  the receiver's status, ``archived_lsn``; pgBackRest: the end of the newest segment in its
  repository). A side's lag at a sample is how long ago the server had written what that archive
  holds (an upper bound, within the 1 s sampling). Reported: max and p95 per side.
  ``--lag-mode concurrent`` (default): both sides in one window. Both archives then complete on
  every segment switch, whoever caused it (archive_timeout, our receiver's switch), so each may
  profit from the other. ``--lag-mode separate``: two windows, one per side; ours with
  ``archive_timeout=0``, pgBackRest's with our receiver stopped (it resumes from its slot after).
  T, the recovery target, is the server's ``clock_timestamp()`` at the middle of the (first)
  window. At the end the load stops, ``pg_switch_wal()`` closes the last segment and both
  archives are awaited, so both hold the WAL past T that recovery needs.
PITR restore to T (load stopped; each into a new data directory on a free port)
  pgBackRest ``pgbackrest restore --type=time --target=T --target-action=promote
             --archive-mode=off --pg1-path=DIR``, then ``pg_ctl start`` on DIR, until
             ``pg_is_in_recovery()`` is false
  ours       ``restore_to_time(..., into=PitrTarget.scratch(DIR, port, keep_running=True))``,
             until the same
  Both timed from the start of the restore to the promoted server. Then both restored databases
  must agree: sum(pgbench_accounts.abalance), count(pgbench_history), max(pgbench_history.mtime).
  The base backups are taken one after the other under load, so the first one's restore replays
  more WAL to reach T (``--backup-order``, default ours first); the report gives both amounts.

Memory: ``tree RSS`` is the peak summed RSS of the contender's process session (sampled from
/proc every 50 ms, PostgreSQL server processes excluded), ``proc RSS`` the largest single peak
(VmHWM); ``server RSS`` is the peak of the restored server (postmaster and children) while it
recovers. For the long-running pieces: our receiver's session (python + pg_receivewal) over the
whole run, and the largest pgbackrest archive-push process seen (sampled every 100 ms).

Usage::

    .venv/bin/python benchmarks/pitr_bench.py                       # scale 45 (~1.1 GB), ~20 min
    .venv/bin/python benchmarks/pitr_bench.py --scale 5 --lag-seconds 60   # a quick run
    .venv/bin/python benchmarks/pitr_bench.py --lag-mode separate --json pitr.json
    .venv/bin/python benchmarks/pitr_bench.py --pgbackrest-compress-type zst   # a stiffer rival

Needs pgBackRest (``apt-get install -y pgbackrest``; exit code 2 without it) and the PostgreSQL
15 server binaries. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from measure import MB, log
from pitr_support import (
    HOST,
    PG_SUPERUSER,
    ArchiveReader,
    BackgroundMemory,
    Cluster,
    Load,
    Measured,
    PgBackRest,
    ServerMemory,
    WalSampler,
    archive_lags,
    execute,
    find_bindir,
    format_lsn,
    free_port,
    os_user_ids,
    owned_dir,
    parse_lsn,
    percentile,
    run_contender,
    segment_end_lsn,
    self_reported_lags,
    stop_postmaster,
    tool_output,
    wait_promoted,
)
from postgres_bench import RANDOM_ROWS_PER_SCALE, RANDOM_TABLE_SQL

from rag_backup.engines.postgres import PostgresServer
from rag_backup.proc import run, tail

REPO_ROOT = Path(__file__).resolve().parent.parent
DATABASE = "bench"
PG_MAJOR = 15
RUN_ID = "pitr-bench"
MARKER = ".pitr-bench"
SETUP_TIMEOUT_S = 3600.0
RECEIVER_READY_TIMEOUT_S = 120.0
TARGETS = {"base backup time": 1.1, "base backup size": 1.1, "PITR restore time": 1.1}
MAX_LAG_TARGET_S = 300.0
DETAIL_KEYS = ("api", "restorable_after_s", "start_lsn", "end_lsn", "restore_s",
               "start_to_promoted_s", "extract_s", "fetch_s", "replay_s", "duration_s",
               "worker_wall_s", "wal_segments", "wal_bytes", "stop", "reached_at", "label", "lsn",
               "artifacts")


# -- OUR side: one small function per call, so the names are easy to adapt ---------------------

# name -> the alternatives that provide it ("module:attr,attr"); the first that imports is used.
OUR_CALLS = {
    "wal-receiver": ["rag_backup.__main__:main",
                     "rag_backup.engines.postgres.pitr.receiver:serve"],
    "archive_status": ["rag_backup.engines.postgres.pitr.wal:archive_status"],
    "take_base_backup": ["rag_backup.engines.postgres.pitr.basebackup:BASE_STORE,"
                         "take_base_backup"],
    "restore_to_time": ["rag_backup.engines.postgres.pitr.restore:PitrTarget,restore_to_time",
                        "rag_backup.engines.postgres.pitr.restore:PitrTarget,Into,plan,restore"],
}


def our_receiver_command(repo: Path, spool: Path, cluster: Cluster,
                         switch_after_s: int) -> tuple[list[str], dict[str, str]]:
    """The WAL receiver service: argv and environment (no password: the cluster trusts)."""
    env = {"RAG_BACKUP_REPOSITORY": str(repo), "RAG_PG_HOST": HOST,
           "RAG_PG_PORT": str(cluster.port), "RAG_PG_USER": PG_SUPERUSER,
           "RAG_PG_WAL_SWITCH_AFTER_S": str(switch_after_s), "RAG_PG_WAL_DIR": str(spool)}
    return [sys.executable, "-m", "rag_backup", "wal-receiver"], env


def our_archived_end(repo_dir: Path, segment_size: int) -> int | None:
    """The end LSN of the newest segment in our repository's WAL archive, read from the
    repository itself (a segment is archived once its record ``<segment>.json`` exists), the
    same way as pgBackRest's: not from the receiver's status, which it writes every few
    seconds."""
    root = repo_dir / "postgres_wal" / "segments"
    try:
        timelines = sorted(os.listdir(root), reverse=True)
    except OSError:
        return None
    for timeline in timelines:
        with contextlib.suppress(OSError):
            names = [n[:24] for n in os.listdir(root / timeline)
                     if n.endswith(".json") and len(n) == 29]
            if names:
                return segment_end_lsn(max(names), segment_size)
    return None


def our_archive_status(repo_dir: Path) -> tuple[int | None, float | None]:
    """(archived_lsn, caught_up_at as epoch seconds) as the receiver reports them: the engine's
    ``archive_status(repo)`` when it imports, else ``<repo>/postgres_wal/status.json``."""
    try:
        from rag_backup.engines.postgres.pitr.wal import archive_status
        from rag_backup.repository import BackupRepository, FilesystemBackend
    except ImportError:
        path = repo_dir / "postgres_wal" / "status.json"
        if not path.exists():
            return None, None
        doc = json.loads(path.read_text())
        lsn, caught = doc.get("archived_lsn"), doc.get("caught_up_at")
    else:
        status = archive_status(BackupRepository(FilesystemBackend(repo_dir)))
        if status is None:
            return None, None
        lsn, caught = status.archived_lsn, status.caught_up_at
    if isinstance(lsn, str):
        lsn = parse_lsn(lsn)
    if isinstance(caught, str):
        caught = datetime.fromisoformat(caught.replace("Z", "+00:00"))
    return lsn, (caught.timestamp() if caught is not None else None)


def our_base_backup(repo_dir: Path, server: PostgresServer, partition_key: str,
                    timeout_s: float) -> dict[str, Any]:
    from rag_backup.engines.postgres.pitr.basebackup import BASE_STORE, take_base_backup
    from rag_backup.repository import BackupRepository, FilesystemBackend

    repo = BackupRepository(FilesystemBackend(repo_dir))
    with repo.begin(BASE_STORE, partition_key, RUN_ID) as pending:
        outcome = take_base_backup(server, pending, timeout_s=timeout_s)
        pending.commit(outcome)
    record = repo.get(BASE_STORE, partition_key)
    artifacts = {a.path: a.size for a in record.manifest.artifacts}
    start_lsn = end_lsn = None
    with contextlib.suppress(Exception):  # where the backup is consistent: its WAL must be
        from rag_backup.engines.postgres.pitr.basebackup import fingerprint_of  # archived

        fingerprint = fingerprint_of(record)
        start_lsn, end_lsn = fingerprint.start_lsn, fingerprint.end_lsn
    return {"artifact_bytes": sum(artifacts.values()), "artifacts": artifacts,
            "store": BASE_STORE, "partition_key": partition_key, "start_lsn": start_lsn,
            "end_lsn": end_lsn}


def our_restore(repo_dir: Path, server: PostgresServer, target_time: datetime, data_dir: Path,
                port: int, timeout_s: float) -> dict[str, Any]:
    """Recover to ``target_time`` into a scratch instance left running on ``port``. Uses
    ``restore_to_time`` when the engine has it, else its ``plan`` + ``restore(Into(scratch))``
    (the base backup is not verified first: pgBackRest's restore does not verify first either;
    verification is its own phase in production)."""
    import importlib
    import inspect

    from rag_backup.repository import BackupRepository, FilesystemBackend

    # the module itself: the package may export a function named ``restore``
    pitr = importlib.import_module("rag_backup.engines.postgres.pitr.restore")

    repo = BackupRepository(FilesystemBackend(repo_dir))
    fn = getattr(pitr, "restore_to_time", None)
    params = inspect.signature(fn).parameters if fn else {}
    if "target_time" in params:  # the interface first agreed
        report = fn(repo, server, target_time=target_time,
                    into=pitr.PitrTarget.scratch(data_dir=data_dir, port=port, keep_running=True),
                    timeout_s=timeout_s)
        api = "restore_to_time(target_time=, into=PitrTarget.scratch(...))"
    elif "target" in params:  # restore_to_time(repo, credentials, *, target, into, ...)
        extra = {"allow_unverified": True} if "allow_unverified" in params else {}
        report = fn(repo, server, target=pitr.PitrTarget(time=target_time),
                    into=pitr.Into(mode="scratch", work_dir=data_dir, port=port,
                                   keep_running=True),
                    timeout_s=timeout_s, **extra)
        api = ("restore_to_time(target=PitrTarget(time=T), into=Into(scratch, keep_running)"
               + (", allow_unverified=True)" if extra else ")"))
    else:
        chosen = pitr.plan(repo, pitr.PitrTarget(time=target_time), allow_unverified=True)
        report = pitr.restore(repo, chosen, pitr.Into(mode="scratch", work_dir=data_dir,
                                                      port=port, keep_running=True),
                              server, timeout_s=timeout_s)
        api = "plan(allow_unverified=True) + restore(Into(scratch, keep_running))"
    reached = getattr(report, "reached_at", None)
    return {"api": api,
            "reached_at": reached.isoformat() if hasattr(reached, "isoformat") else reached,
            "port": getattr(report, "port", None) or port,
            "data_directory": getattr(report, "data_directory", None) or str(data_dir),
            "duration_s": getattr(report, "duration_s", None),
            **{k: getattr(report, k) for k in ("extract_s", "fetch_s", "replay_s",
                                                "wal_segments", "wal_bytes", "stop")
               if hasattr(report, k)}}


def probe_ours() -> dict[str, str]:
    """Which of our calls import, in a fresh interpreter: name -> "ok" (or "ok: <the
    alternative used>") or the error of the first alternative."""
    script = (
        "import importlib, json\n"
        f"calls = {OUR_CALLS!r}\n"
        "out = {}\n"
        "for name, alternatives in calls.items():\n"
        "    for i, spec in enumerate(alternatives):\n"
        "        module, _, attrs = spec.partition(':')\n"
        "        try:\n"
        "            mod = importlib.import_module(module)\n"
        "            for attr in filter(None, attrs.split(',')):\n"
        "                getattr(mod, attr)\n"
        "        except Exception as exc:\n"
        "            out.setdefault(name, f'{type(exc).__name__}: {exc}')\n"
        "        else:\n"
        "            out[name] = 'ok' if i == 0 else f'ok: {spec}'\n"
        "            break\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        return {name: f"probe failed: {tail(proc.stderr, 300)}" for name in OUR_CALLS}
    return json.loads(proc.stdout)


def worker(argv: Sequence[str]) -> int:
    """``_worker basebackup|restore``: one engine call; a JSON summary on stdout."""
    parser = argparse.ArgumentParser(prog="pitr_bench.py _worker")
    parser.add_argument("action", choices=("basebackup", "restore"))
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--user", required=True)
    parser.add_argument("--partition")
    parser.add_argument("--target-time")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--restore-port", type=int)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    server = PostgresServer(args.host, args.port, args.user,
                            os.environ.get("RAG_PG_PASSWORD", ""))
    if args.action == "basebackup":
        summary = our_base_backup(args.repo, server, args.partition, args.timeout)
    else:
        summary = our_restore(args.repo, server, datetime.fromisoformat(args.target_time),
                              args.data_dir, args.restore_port, args.timeout)
    print(json.dumps(summary))
    return 0


# -- the report ------------------------------------------------------------------------------

@dataclass
class Row:
    phase: str
    who: str
    label: str
    wall_s: float | None = None
    size_bytes: int | None = None
    tree_rss_bytes: int | None = None
    proc_rss_bytes: int | None = None
    server_rss_bytes: int | None = None
    cpu_s: float | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class LagResult:
    who: str
    window_s: float
    samples: int
    max_s: float | None
    p95_s: float | None
    mean_s: float | None
    empty_samples: int
    status_max_s: float | None = None     # from the side's own status (archived_lsn)
    caught_up_max_s: float | None = None  # now - caught_up_at, as the side reports it
    rss_bytes: int | None = None
    proc_rss_bytes: int | None = None
    note: str = ""


@dataclass
class Report:
    command: str
    versions: dict[str, str]
    settings: dict[str, str]
    cpus: int
    database_bytes: int
    cluster_bytes: int
    scale: int
    random_rows: int
    load: dict[str, Any]
    lag_mode: str
    ours: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    lags: list[LagResult] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)
    restored: dict[str, dict[str, Any]] = field(default_factory=dict)
    pgbackrest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def find(self, phase: str, who: str) -> Row | None:
        return next((r for r in self.rows if r.phase == phase and r.who == who), None)

    def lag(self, who: str) -> LagResult | None:
        return next((r for r in self.lags if r.who == who), None)

    def ratios(self) -> dict[str, float]:
        pairs = {
            "base backup time": ("base backup", "wall_s"),
            "base backup size": ("base backup", "size_bytes"),
            "base backup tree RSS": ("base backup", "tree_rss_bytes"),
            "base backup CPU": ("base backup", "cpu_s"),
            "PITR restore time": ("PITR restore", "wall_s"),
            "PITR restore tool tree RSS": ("PITR restore", "tree_rss_bytes"),
            "PITR restore server RSS": ("PITR restore", "server_rss_bytes"),
        }
        out = {}
        for name, (phase, attr) in pairs.items():
            ours, theirs = self.find(phase, "ours"), self.find(phase, "pgBackRest")
            if ours and theirs and getattr(ours, attr) and getattr(theirs, attr):
                out[name] = getattr(ours, attr) / getattr(theirs, attr)
        ours_base, their_base = self.find("base backup", "ours"), self.find("base backup",
                                                                            "pgBackRest")
        if ours_base and their_base and their_base.wall_s \
                and ours_base.detail.get("restorable_after_s"):
            out["base backup until restorable (archive holds its WAL)"] = (
                ours_base.detail["restorable_after_s"] / their_base.wall_s)
        ours_lag, their_lag = self.lag("ours"), self.lag("pgBackRest")
        if ours_lag and their_lag and ours_lag.max_s is not None and their_lag.max_s:
            out["max archive lag"] = ours_lag.max_s / their_lag.max_s
        if ours_lag and their_lag and ours_lag.rss_bytes and their_lag.rss_bytes:
            out["archiving RSS (receiver tree / archive-push)"] = (ours_lag.rss_bytes
                                                                   / their_lag.rss_bytes)
        return out

    def verdicts(self) -> list[tuple[str, str, str]]:
        """(target, PASS/FAIL/NOT RUN, why)."""
        out = []
        ratios = self.ratios()
        for name, limit in TARGETS.items():
            if name in ratios:
                ok = ratios[name] <= limit
                out.append((f"{name} <= {limit:g}x pgBackRest", "PASS" if ok else "FAIL",
                            f"{ratios[name]:.2f}x"))
            else:
                phase = "base backup" if name.startswith("base") else "PITR restore"
                row = self.find(phase, "ours")
                why = _last_line(row.error) if row and row.error else "ours did not run"
                out.append((f"{name} <= {limit:g}x pgBackRest", "NOT RUN", tail(why, 200)))
        ours_lag = self.lag("ours")
        if ours_lag and ours_lag.max_s is not None:
            ok = ours_lag.max_s <= MAX_LAG_TARGET_S and ours_lag.empty_samples == 0
            out.append((f"our max archive lag <= {MAX_LAG_TARGET_S:g} s",
                        "PASS" if ok else "FAIL", f"{ours_lag.max_s:.1f} s"
                        + (f" ({ours_lag.empty_samples} samples with an empty archive)"
                           if ours_lag.empty_samples else "")))
        else:
            out.append((f"our max archive lag <= {MAX_LAG_TARGET_S:g} s", "NOT RUN",
                        ours_lag.note if ours_lag else "ours did not run"))
        same = self.restored.get("_identical")
        if same is not None:
            out.append(("both restored servers identical at T", "PASS" if same else "FAIL",
                        self.restored.get("_why", "")))
        return out

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratios"] = {k: round(v, 4) for k, v in self.ratios().items()}
        doc["verdicts"] = [{"target": t, "result": r, "value": v} for t, r, v in self.verdicts()]
        return doc


def _last_line(text: str) -> str:
    """The exception line of a traceback (the last non-empty line)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:,.1f}"


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(report: Report) -> str:
    lines = [
        (f"PostgreSQL PITR benchmark: database {DATABASE} {_mb(report.database_bytes)} MB "
         f"(pg_database_size; cluster {_mb(report.cluster_bytes)} MB on disk without pg_wal); "
         f"pgbench scale {report.scale} + {report.random_rows:,} random rows; {report.cpus} CPUs"),
        f"command: {report.command}",
        "versions: " + "; ".join(f"{k}: {v}" for k, v in report.versions.items()),
        "settings: " + ", ".join(f"{k}={v}" for k, v in report.settings.items()),
        ("load: " + ", ".join(f"{k} {v}" for k, v in report.load.items())),
        ("pgBackRest: " + ", ".join(f"{k}={v}" for k, v in report.pgbackrest.items())),
        "",
        (f"{'phase':<14}{'who':<12}{'what':<44}{'wall s':>8}{'size MB':>10}{'% db':>6}"
         f"{'tree RSS MB':>13}{'proc RSS MB':>13}{'server RSS MB':>15}{'CPU s':>8}"),
    ]
    for r in report.rows:
        if r.error:
            lines.append(f"{r.phase:<14}{r.who:<12}{r.label:<44}  NOT RUN / FAILED: "
                         f"{tail(_last_line(r.error), 160)}")
            continue
        share = ("-" if r.size_bytes is None
                 else f"{100 * r.size_bytes / report.database_bytes:.1f}")
        lines.append(
            f"{r.phase:<14}{r.who:<12}{r.label:<44}{_s(r.wall_s):>8}{_mb(r.size_bytes):>10}"
            f"{share:>6}{_mb(r.tree_rss_bytes):>13}{_mb(r.proc_rss_bytes):>13}"
            f"{_mb(r.server_rss_bytes):>15}{_s(r.cpu_s):>8}")
    lines += ["", (f"WAL archive lag under load ({report.lag_mode}; seconds; 1 s samples; "
                   "max/p95/mean from what each repository holds)"),
              (f"{'who':<12}{'window s':>9}{'samples':>8}{'max s':>8}{'p95 s':>8}{'mean s':>8}"
               f"{'status max s':>14}{'caught_up max s':>17}{'peak RSS MB':>13}"
               f"{'proc RSS MB':>13}  note")]
    for lag in report.lags:
        lines.append(
            f"{lag.who:<12}{lag.window_s:>9.0f}{lag.samples:>8}{_s(lag.max_s):>8}"
            f"{_s(lag.p95_s):>8}{_s(lag.mean_s):>8}{_s(lag.status_max_s):>14}"
            f"{_s(lag.caught_up_max_s):>17}{_mb(lag.rss_bytes):>13}"
            f"{_mb(lag.proc_rss_bytes):>13}  {lag.note}")
    lines += ["", "ratios (ours / pgBackRest; < 1 is better for ours)"]
    lines += [f"  {name:<54}{value:>7.2f}" for name, value in report.ratios().items()]
    lines += ["", "targets"]
    lines += [f"  {verdict:<8}{name:<44}{value}" for name, verdict, value in report.verdicts()]
    if report.target:
        lines += ["", "recovery target: " + ", ".join(f"{k} {v}"
                                                      for k, v in report.target.items())]
    for who, facts in report.restored.items():
        if not who.startswith("_"):
            lines.append(f"  restored by {who}: " + ", ".join(f"{k} {v}"
                                                             for k, v in facts.items()))
    details = []
    for r in report.rows:
        shown = {k: v for k, v in r.detail.items() if k in DETAIL_KEYS and v is not None}
        if shown and not r.error:
            details.append(f"  {r.phase} {r.who}: " + ", ".join(f"{k} {v}"
                                                               for k, v in shown.items()))
    if details:
        lines += ["", "phase details:"] + details
    lines += ["", "our calls: " + "; ".join(f"{k} {v}" for k, v in report.ours.items())]
    if report.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in report.notes]
    return "\n".join(lines)


# -- the benchmark ----------------------------------------------------------------------------

def _row(phase: str, who: str, label: str, measured: Measured, **extra: Any) -> Row:
    return Row(phase, who, label, measured.wall_s, tree_rss_bytes=measured.peak_tree_rss_bytes,
               proc_rss_bytes=measured.max_proc_rss_bytes, cpu_s=measured.cpu_s, **extra)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, ours: dict[str, str]) -> None:
        self.args, self.work, self.ours_calls = args, work, ours
        self.receiving = False  # our WAL receiver is running (or ran, in separate mode)
        self.our_base: Row | None = None
        bindir = find_bindir(PG_MAJOR)
        self.cluster = Cluster(bindir, work / "pgdata", free_port(), work / "socket",
                               work / "pgdata.log")
        self.server = self.cluster.server()
        self.pgbr = PgBackRest(work / "pgbackrest", self.cluster,
                               compress_type=args.pgbackrest_compress_type)
        self.our_repo = work / "ours-repo"
        self.receiver: subprocess.Popen | None = None
        self.receiver_log = work / "wal-receiver.log"
        self.load: Load | None = None
        self.sampler: WalSampler | None = None
        self.background = BackgroundMemory()
        self.restored_dirs: list[Path] = []
        self.segment_size = 16 * 1024 * 1024
        self.notes: list[str] = []

    # -- setup ----------------------------------------------------------------------------
    def setup_cluster(self) -> None:
        self.pgbr.write_config()
        settings = {
            "listen_addresses": f"'{HOST}'", "port": str(self.cluster.port),
            "unix_socket_directories": f"'{self.cluster.socket_dir}'",
            "wal_level": "replica", "archive_mode": "on", "archive_command": "'true'",
            "archive_timeout": str(self.args.archive_timeout),
            "max_wal_senders": "10", "max_replication_slots": "10",
            "max_wal_size": "2GB", "log_checkpoints": "on",
        }
        hba = "\n".join([
            "# pitr_bench's throwaway cluster: trust, local and 127.0.0.1 only",
            f"local   all          {PG_SUPERUSER}   trust",
            f"local   replication  {PG_SUPERUSER}   trust",
            f"host    all          {PG_SUPERUSER}   127.0.0.1/32   trust",
            f"host    replication  {PG_SUPERUSER}   127.0.0.1/32   trust", ""])
        log(f"initdb {self.cluster.data_dir} (port {self.cluster.port})")
        self.cluster.initdb(settings, hba)
        self.cluster.start()
        self.segment_size = int(execute(self.server, "SHOW wal_segment_size")[0][0]
                                .replace("MB", "")) * 1024 * 1024

    def generate(self) -> tuple[int, float]:
        """pgbench -i plus bench_random; archiving is off meanwhile (archive_command true)."""
        rows = (self.args.random_rows if self.args.random_rows is not None
                else self.args.scale * RANDOM_ROWS_PER_SCALE)
        started = time.monotonic()
        log(f"generating {DATABASE}: pgbench -i -s {self.args.scale} + {rows:,} random rows")
        execute(self.server, f"CREATE DATABASE {DATABASE}")
        run([self.cluster.tool("pgbench"), "-i", "-s", str(self.args.scale), "-q", "-h", HOST,
             "-p", str(self.cluster.port), "-U", PG_SUPERUSER, DATABASE],
            what="pgbench -i", timeout=SETUP_TIMEOUT_S)
        conn = self.server.connect(DATABASE)
        try:
            with conn.cursor() as cur:
                cur.execute(RANDOM_TABLE_SQL, {"rows": rows})
            conn.commit()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("VACUUM (FREEZE, ANALYZE)")
                cur.execute("CHECKPOINT")
        finally:
            conn.close()
        log(f"generated in {time.monotonic() - started:.0f} s")
        return rows, time.monotonic() - started

    def start_archiving(self) -> None:
        execute(self.server, "ALTER SYSTEM SET archive_command = %s",
                (f"{self.pgbr.archive_script} %p",))
        execute(self.server, "SELECT pg_reload_conf()")
        log("pgbackrest stanza-create and check")
        self.pgbr.run("stanza-create", timeout=300)
        self.pgbr.run("check", timeout=300)

    def start_receiver(self) -> None:
        argv, env = our_receiver_command(self.our_repo, self.work / "ours-spool", self.cluster,
                                         self.args.archive_timeout)
        self.our_repo.mkdir(exist_ok=True)
        (self.work / "ours-spool").mkdir(exist_ok=True)
        log(f"starting our WAL receiver: {' '.join(argv)}")
        out = open(self.receiver_log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.receiver = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT,
                                             env={**os.environ, **env}, cwd=REPO_ROOT,
                                             start_new_session=True)
        finally:
            out.close()
        self.background.sessions.add(self.receiver.pid)
        deadline = time.monotonic() + RECEIVER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.receiver.poll() is not None:
                raise RuntimeError(f"our WAL receiver exited with code "
                                   f"{self.receiver.returncode}: {self.receiver_tail()}")
            rows = execute(self.server, "SELECT active FROM pg_replication_slots "
                                        "WHERE slot_name = 'rag_backup'")
            if rows and rows[0][0]:
                log("our WAL receiver is streaming (slot rag_backup active)")
                return
            time.sleep(0.5)
        raise RuntimeError(f"our WAL receiver did not start streaming within "
                           f"{RECEIVER_READY_TIMEOUT_S:g} s: {self.receiver_tail()}")

    def receiver_tail(self) -> str:
        try:
            return tail(self.receiver_log.read_bytes(), 1200) or "(no output)"
        except OSError:
            return "(no log)"

    def stop_receiver(self) -> None:
        if self.receiver is None:
            return
        proc, self.receiver = self.receiver, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("our WAL receiver ignored SIGTERM for 30 s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # what is left of its session
            os.killpg(proc.pid, signal.SIGKILL)

    def has(self, call: str) -> bool:
        return self.ours_calls.get(call, "").startswith("ok")

    def readers(self) -> dict[str, ArchiveReader]:
        readers: dict[str, ArchiveReader] = {
            "pgBackRest": lambda: (self.pgbr.newest_archived_end(self.segment_size), None, None)}
        if self.receiving:
            def ours() -> tuple[int | None, int | None, float | None]:
                reported, caught = (our_archive_status(self.our_repo)
                                    if self.has("archive_status") else (None, None))
                return our_archived_end(self.our_repo, self.segment_size), reported, caught
            readers["ours"] = ours
        return readers

    # -- base backups --------------------------------------------------------------------------
    def checkpoint(self) -> None:
        os.sync()
        execute(self.server, "CHECKPOINT")

    def base_backup_ours(self) -> Row:
        label = "take_base_backup()"
        if not self.has("take_base_backup"):
            return Row("base backup", "ours", label, error=self.unavailable("take_base_backup"))
        self.checkpoint()
        log("base backup: ours")
        partition = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        try:
            m = run_contender(self.worker_argv("basebackup", "--partition", partition),
                              what="our base backup", timeout_s=self.args.timeout,
                              cwd=REPO_ROOT)
        except Exception as exc:  # noqa: BLE001 - reported, pgBackRest's side goes on
            log(f"  ours failed: {tail(str(exc), 500)}")
            return Row("base backup", "ours", label, error=str(exc))
        detail = json.loads(m.stdout.strip().splitlines()[-1])
        log(f"  {m.wall_s:.1f} s, {_mb(detail['artifact_bytes'])} MB")
        if detail.get("end_lsn") and self.receiving:
            # pgBackRest's backup returns once the archive holds the WAL up to the backup's
            # end (archive-check); ours returns before: when could ours be restored?
            waited = self.wait_archived("ours", parse_lsn(detail["end_lsn"]))
            if waited is not None:
                detail["restorable_after_s"] = round(m.wall_s + waited, 3)
                log(f"  restorable after {detail['restorable_after_s']:.1f} s (the archive "
                    f"holds its end WAL {detail['end_lsn']})")
        return _row("base backup", "ours", label, m, size_bytes=detail["artifact_bytes"],
                    detail=detail)

    def base_backup_pgbackrest(self) -> Row:
        self.checkpoint()
        log("base backup: pgBackRest")
        m = run_contender(self.pgbr.argv("--type=full", "backup"),
                          what="pgbackrest backup", timeout_s=self.args.timeout, cwd=self.work)
        info = json.loads(self.pgbr.run("--output=json", "info", timeout=120))
        backup = info[0]["backup"][-1]
        size = backup["info"]["repository"]["size"]
        options = self.pgbr.backup_options(backup["label"])
        detail = {"label": backup["label"], "lsn": backup.get("lsn"),
                  "database_bytes_seen": backup["info"]["size"],
                  "compress_type": options.get("option-compress-type"),
                  "compress_level": options.get("option-compress-level"),
                  "process_max": options.get("option-process-max")}
        log(f"  {m.wall_s:.1f} s, {_mb(size)} MB ({detail['compress_type']} "
            f"level {detail['compress_level']})")
        return _row("base backup", "pgBackRest",
                    f"backup --type=full ({detail['compress_type']}-{detail['compress_level']}, "
                    f"process-max {detail['process_max']})", m, size_bytes=size, detail=detail)

    def runbook_dump(self) -> Row:
        self.checkpoint()
        log("runbook's daily dump: pg_dump -Fc | gzip (context: not point-in-time)")
        out = self.work / "runbook.dump.gz"
        argv = ["bash", "-c", 'set -euo pipefail; "$1" --format=custom --host="$2" --port="$3" '
                '--username="$4" --no-password "$5" | gzip > "$6"', "bench",
                self.cluster.tool("pg_dump"), HOST, str(self.cluster.port), PG_SUPERUSER,
                DATABASE, str(out)]
        m = run_contender(argv, what="runbook pg_dump -Fc | gzip", timeout_s=self.args.timeout)
        size = out.stat().st_size
        out.unlink()
        return _row("base backup", "runbook", "daily pg_dump -Fc | gzip (NOT PITR)", m,
                    size_bytes=size)

    # -- restores ---------------------------------------------------------------------------
    def restore_pgbackrest(self, target: datetime) -> Row:
        data_dir = owned_dir(self.work / "restore-pgbackrest")
        self.restored_dirs.append(data_dir)
        restored = Cluster(self.cluster.bindir, data_dir, free_port(),
                           owned_dir(self.work / "socket-pgbackrest", 0o755),
                           self.work / "restore-pgbackrest.log")
        target_text = target.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        label = "restore --type=time + start + promote"
        log(f"PITR restore: pgBackRest to {target_text} into {data_dir}")
        memory = ServerMemory(data_dir)
        memory.start()
        started = time.monotonic()
        try:
            m = run_contender(self.pgbr.argv("--type=time", f"--target={target_text}",
                                             "--target-action=promote", "--archive-mode=off",
                                             f"--pg1-path={data_dir}", "restore"),
                              what="pgbackrest restore", timeout_s=self.args.timeout,
                              cwd=self.work)
            restore_s = time.monotonic() - started
            restored.start(options=[f"-c port={restored.port}",
                                    f"-c unix_socket_directories={restored.socket_dir}",
                                    f"-c listen_addresses={HOST}"], wait=False)

            def died() -> str | None:
                if time.monotonic() - started > 5 and memory.postmaster is not None \
                        and not Path(f"/proc/{memory.postmaster}").exists():
                    return f"the restored server exited: {restored.log_tail()}"
                return None

            promoted = wait_promoted(restored.server(), self.args.timeout, died)
        finally:
            memory.stop(raise_error=False)
        wall = promoted - started
        log(f"  {wall:.1f} s (restore {restore_s:.1f} s, start + recovery "
            f"{wall - restore_s:.1f} s)")
        auto_conf = (data_dir / "postgresql.auto.conf").read_text(errors="replace")
        restore_command = next((line for line in auto_conf.splitlines()
                                if line.startswith("restore_command")), "")
        return Row("PITR restore", "pgBackRest", label, wall, None, m.peak_tree_rss_bytes,
                   m.max_proc_rss_bytes, memory.peak.tree_bytes, m.cpu_s, detail={
                       "port": restored.port, "data_dir": str(data_dir),
                       "restore_s": round(restore_s, 3),
                       "start_to_promoted_s": round(wall - restore_s, 3),
                       "restore_command": restore_command})

    def restore_ours(self, target: datetime) -> Row:
        label = "restore_to_time() to a promoted server"
        why = (self.unavailable("restore_to_time") if not self.has("restore_to_time") else
               "our WAL receiver did not run" if not self.receiving else
               "our base backup failed" if self.our_base is None or self.our_base.error else "")
        if why:
            return Row("PITR restore", "ours", label, error=why)
        parent = owned_dir(self.work / "restore-ours", 0o755)
        data_dir = parent / "data"
        self.restored_dirs.append(data_dir)
        port = free_port()
        log(f"PITR restore: ours to {target.isoformat()} into {data_dir}")
        memory = ServerMemory(data_dir)
        memory.start()
        started = time.monotonic()
        try:
            m = run_contender(self.worker_argv(
                "restore", "--target-time", target.isoformat(), "--data-dir", str(data_dir),
                "--restore-port", str(port)), what="our PITR restore",
                timeout_s=self.args.timeout, cwd=REPO_ROOT)
            detail = json.loads(m.stdout.strip().splitlines()[-1])
            server = self.reach(int(detail.get("port") or port),
                                Path(detail.get("data_directory") or data_dir))
            promoted = wait_promoted(server, 120)
            detail["host"] = server.host
        except Exception as exc:  # noqa: BLE001 - reported
            log(f"  ours failed: {tail(str(exc), 500)}")
            return Row("PITR restore", "ours", label, error=str(exc))
        finally:
            memory.stop(raise_error=False)
        wall = promoted - started
        log(f"  {wall:.1f} s (engine's own duration {detail.get('duration_s')})")
        detail.update({"data_dir": str(data_dir), "worker_wall_s": round(m.wall_s, 3)})
        return Row("PITR restore", "ours", label, wall, None, m.peak_tree_rss_bytes,
                   m.max_proc_rss_bytes, memory.peak.tree_bytes, m.cpu_s, detail=detail)

    @staticmethod
    def reach(port: int, data_dir: Path) -> PostgresServer:
        """The restored server as the benchmark can log in: TCP (trust in the source's
        pg_hba), else its unix socket (our scratch copy allows only that without a password:
        ``<data>/../run``, or the data directory itself)."""
        errors = []
        for host in (HOST, str(data_dir.parent / "run"), str(data_dir)):
            server = PostgresServer(host, port, PG_SUPERUSER, "")
            try:
                execute(server, "SELECT 1")
                return server
            except Exception as exc:  # noqa: BLE001 - try the next way in
                errors.append(f"{host}: {tail(str(exc), 160)}")
        raise RuntimeError("cannot log in to the restored server: " + "; ".join(errors))

    def worker_argv(self, action: str, *extra: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "_worker", action,
                "--repo", str(self.our_repo), "--host", HOST, "--port", str(self.cluster.port),
                "--user", PG_SUPERUSER, "--timeout", str(self.args.timeout), *extra]

    def unavailable(self, call: str) -> str:
        return f"{call} is not available: {self.ours_calls.get(call, 'not probed')}"

    # -- the lag windows ----------------------------------------------------------------------
    def wait_under_load(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.load is not None
            self.load.check()
            if self.sampler is not None and self.sampler.error is not None:
                raise RuntimeError(f"WAL sampler failed: {self.sampler.error}")
            if self.receiver is not None and self.receiver.poll() is not None:
                raise RuntimeError(f"our WAL receiver exited with code "
                                   f"{self.receiver.returncode}: {self.receiver_tail()}")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def server_now(self) -> tuple[datetime, int]:
        now, lsn = execute(self.server,
                           "SELECT clock_timestamp(), pg_current_wal_lsn()::text")[0]
        return now, parse_lsn(lsn)

    def lag_windows(self) -> tuple[dict[str, tuple[float, float]], datetime, int]:
        """Run the lag window(s); return each side's (start, end) and T with its LSN."""
        n = self.args.lag_seconds
        sides = ["ours", "pgBackRest"] if self.receiving else ["pgBackRest"]
        if self.args.lag_mode == "concurrent" or not self.receiving:
            log(f"lag window: {n} s, {' and '.join(sides)} together")
            start = time.time()
            self.wait_under_load(n / 2)
            target, target_lsn = self.server_now()
            log(f"recovery target T = {target.isoformat()} (LSN {format_lsn(target_lsn)})")
            self.wait_under_load(n / 2)
            end = time.time()
            return {side: (start, end) for side in sides}, target, target_lsn
        log(f"lag window 1: ours alone for {n} s (archive_timeout = 0)")
        execute(self.server, "ALTER SYSTEM SET archive_timeout = 0")
        execute(self.server, "SELECT pg_reload_conf()")
        windows = {}
        try:
            start = time.time()
            self.wait_under_load(n / 2)
            target, target_lsn = self.server_now()
            log(f"recovery target T = {target.isoformat()} (LSN {format_lsn(target_lsn)})")
            self.wait_under_load(n / 2)
            windows["ours"] = (start, time.time())
        finally:
            execute(self.server, "ALTER SYSTEM RESET archive_timeout")
            execute(self.server, "SELECT pg_reload_conf()")
        log(f"lag window 2: pgBackRest alone for {n} s (our receiver stopped)")
        self.stop_receiver()
        start = time.time()
        self.wait_under_load(n)
        windows["pgBackRest"] = (start, time.time())
        self.start_receiver()
        return windows, target, target_lsn

    def wait_archived(self, side: str, lsn: int) -> float | None:
        """Seconds until ``side``'s archive holds ``lsn`` (None: not within the timeout)."""
        reader = self.readers()[side]
        started = time.monotonic()
        while time.monotonic() - started < self.args.archive_timeout + 180:
            with contextlib.suppress(Exception):
                archived = reader()[0]
                if archived is not None and archived >= lsn:
                    return time.monotonic() - started
            time.sleep(0.1)
        self.notes.append(f"{side}'s archive did not reach {format_lsn(lsn)} within "
                          f"{self.args.archive_timeout + 180} s")
        return None

    def finish_archives(self) -> dict[str, float]:
        """Stop the load, close the last segment, wait until both archives hold it: recovery to
        T needs the first commit after T. Returns how long each side took after the switch."""
        assert self.load is not None
        self.load.stop()
        switch_lsn = parse_lsn(execute(self.server, "SELECT pg_switch_wal()::text")[0][0])
        log(f"load stopped; pg_switch_wal() at {format_lsn(switch_lsn)}; waiting for both "
            "archives")
        started = time.monotonic()
        deadline = started + self.args.archive_timeout + 180
        waits: dict[str, float] = {}
        readers = self.readers()
        while time.monotonic() < deadline and len(waits) < len(readers):
            for side, reader in readers.items():
                if side not in waits:
                    with contextlib.suppress(Exception):
                        archived = reader()[0]
                        if archived is not None and archived >= switch_lsn:
                            waits[side] = time.monotonic() - started
            time.sleep(0.2)
        for side in readers:
            if side not in waits:
                self.notes.append(f"{side}'s archive did not reach the final switch "
                                  f"({format_lsn(switch_lsn)}) within "
                                  f"{deadline - started:.0f} s")
        return waits

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def fingerprint(server: PostgresServer, target: datetime) -> dict[str, Any]:
        row = execute(server, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                              "(SELECT count(*) FROM pgbench_history), "
                              "(SELECT max(mtime) FROM pgbench_history), "
                              "(SELECT count(*) FROM pgbench_history WHERE mtime > %s)",
                      (target,), database=DATABASE)[0]
        return {"sum(abalance)": int(row[0] or 0), "history rows": int(row[1]),
                "max(mtime)": row[2].isoformat() if row[2] else None,
                "history rows after T": int(row[3])}

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Report:
        args = self.args
        self.setup_cluster()
        random_rows, _ = self.generate()
        db_bytes = int(execute(self.server, "SELECT pg_database_size(%s)", (DATABASE,))[0][0])
        cluster_bytes = sum(f.stat().st_size for f in self.cluster.data_dir.rglob("*")
                            if f.is_file() and "pg_wal" not in f.relative_to(
                                self.cluster.data_dir).parts)
        log(f"{DATABASE}: {_mb(db_bytes)} MB; cluster {_mb(cluster_bytes)} MB")
        self.start_archiving()
        self.background.start()
        if self.has("wal-receiver"):
            try:
                self.start_receiver()
                self.receiving = True
            except Exception as exc:  # noqa: BLE001 - reported, pgBackRest's side goes on
                log(f"our WAL receiver failed: {tail(str(exc), 800)}")
                self.ours_calls["wal-receiver"] = f"failed to start: {tail(str(exc), 400)}"
                self.stop_receiver()
        max_load_s = int(args.timeout * 4 + args.lag_seconds * 2 + 600)
        self.load = Load(self.cluster, DATABASE, args.load_rate, max_load_s,
                         self.work / "pgbench.log")
        self.load.start()
        log(f"load: {' '.join(self.load.argv())}")
        self.sampler = WalSampler(self.server, self.readers())
        self.sampler.start()
        self.wait_under_load(args.warmup)

        if args.backup_order == "ours-first":
            self.our_base = self.base_backup_ours()
            rows = [self.our_base, self.base_backup_pgbackrest()]
        else:
            rows = [self.base_backup_pgbackrest()]
            self.our_base = self.base_backup_ours()
            rows.insert(0, self.our_base)
        if not args.no_runbook:
            rows.append(self.runbook_dump())
        self.wait_under_load(5)
        backups_done = time.time()
        windows, target, target_lsn = self.lag_windows()
        switch_waits = self.finish_archives()
        self.sampler.stop()
        history = int(execute(self.server, "SELECT count(*) FROM pgbench_history",
                              database=DATABASE)[0][0])
        load_s = self.load.stopped_at - self.load.started_at
        source_at_t = self.fingerprint(self.server, target)

        lags = self.lag_results(windows)
        rows.append(self.restore_pgbackrest(target))
        rows.append(self.restore_ours(target))
        restored = self.check_restored(rows, target, source_at_t)
        for row in rows:
            if row.phase == "PITR restore" and row.error is None:
                with contextlib.suppress(Exception):
                    stop_postmaster(Path(row.detail["data_dir"]))
        self.background.stop(raise_error=False)
        for lag in lags:
            if lag.who == "ours":
                lag.rss_bytes = self.background.receiver.tree_bytes or None
                lag.proc_rss_bytes = self.background.receiver.proc_bytes or None
            else:
                lag.rss_bytes = self.background.archive_push.tree_bytes or None
                lag.proc_rss_bytes = lag.rss_bytes
        pushes = [p for p in self.pgbr.pushes() if p[0] >= self.load.started_at]
        durations = [end - start for start, end, rc, _ in pushes if rc == 0]
        bench_info = next((r.detail for r in rows if r.who == "pgBackRest"
                           and r.phase == "base backup"), {})
        pgbr_facts: dict[str, Any] = {
            "compress-type": bench_info.get("compress_type"),
            "compress-level": bench_info.get("compress_level"),
            "process-max": bench_info.get("process_max"), "start-fast": "y",
            "archive-async": "n",
            "archive-push runs (load)": len(durations),
            "archive-push s mean/max": (f"{sum(durations) / len(durations):.2f}/"
                                        f"{max(durations):.2f}" if durations else "-"),
            "failed pushes": sum(1 for p in pushes if p[2] != 0),
        }
        if switch_waits:
            pgbr_facts["after final switch s"] = ", ".join(f"{k} {v:.1f}"
                                                           for k, v in switch_waits.items())
        start_lsn = (bench_info.get("lsn") or {}).get("start")
        our_start = self.our_base.detail.get("start_lsn") if self.our_base else None
        target_facts = {
            "T": target.isoformat(), "LSN at T": format_lsn(target_lsn),
            "T after the base backups by s": round(target.timestamp() - backups_done, 1),
            "WAL (LSN distance) from the backup's start to T, MB: pgBackRest": (
                _mb(target_lsn - parse_lsn(start_lsn)) if start_lsn else "-"),
            "ours": (_mb(target_lsn - parse_lsn(our_start)) if our_start else "-"),
            "source history rows at the end": history,
            "source rows with mtime > T": source_at_t["history rows after T"],
        }
        return Report(
            command=shlex.join([sys.executable, *sys.argv]),
            versions=self.versions(),
            settings=self.settings(),
            cpus=os.cpu_count() or 0,
            database_bytes=db_bytes, cluster_bytes=cluster_bytes, scale=args.scale,
            random_rows=random_rows,
            load={"pgbench": f"-c 2 -j 1 -R {args.load_rate}", "for s": round(load_s),
                  "tps achieved": round(history / load_s, 1) if load_s else "-",
                  "WAL MB/s": self.wal_rate()},
            lag_mode=args.lag_mode, ours=self.ours_calls, rows=rows, lags=lags,
            target=target_facts, restored=restored, pgbackrest=pgbr_facts,
            notes=self.notes + self.standing_notes())

    def wal_rate(self) -> str:
        s = self.sampler.samples if self.sampler else []
        if len(s) < 2 or s[-1].t <= s[0].t:
            return "-"
        return f"{(s[-1].lsn - s[0].lsn) / MB / (s[-1].t - s[0].t):.2f}"

    def lag_results(self, windows: dict[str, tuple[float, float]]) -> list[LagResult]:
        assert self.sampler is not None
        out = []
        for side in ("ours", "pgBackRest"):
            if side not in windows:
                out.append(LagResult(side, 0, 0, None, None, None, 0,
                                     note=self.unavailable("wal-receiver")
                                     if side == "ours" else ""))
                continue
            start, end = windows[side]
            lags, empty = archive_lags(self.sampler.samples, side, start, end)
            status_lags, _ = archive_lags(self.sampler.samples, side, start, end, "reported")
            caught = self_reported_lags(self.sampler.samples, side, start, end)
            has_status = any(s.reported.get(side) is not None for s in self.sampler.samples)
            error = self.sampler.reader_errors.get(side, "")
            if not lags:
                out.append(LagResult(side, end - start, 0, None, None, None, 0, note=error))
                continue
            out.append(LagResult(
                side, end - start, len(lags), max(lags), percentile(lags, 0.95),
                sum(lags) / len(lags), empty,
                status_max_s=max(status_lags) if has_status and status_lags else None,
                caught_up_max_s=max(caught) if caught else None,
                note=f"reader error: {error}" if error else ""))
        return out

    def check_restored(self, rows: list[Row], target: datetime,
                       source: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, Any] = {}
        for row in rows:
            if row.phase != "PITR restore" or row.error:
                continue
            port = int(row.detail["port"])
            host = row.detail.get("host", HOST)
            try:
                facts = self.fingerprint(PostgresServer(host, port, PG_SUPERUSER, ""), target)
            except Exception as exc:  # noqa: BLE001 - reported
                facts = {"error": tail(str(exc), 300)}
            out[row.who] = facts
        if "ours" in out and "pgBackRest" in out:
            keys = ("sum(abalance)", "history rows", "max(mtime)")
            same = all(out["ours"].get(k) == out["pgBackRest"].get(k) for k in keys)
            out["_identical"] = same
            out["_why"] = ("sum, count and max(mtime) equal" if same else
                           "differ: " + "; ".join(f"{k} {out['ours'].get(k)} vs "
                                                  f"{out['pgBackRest'].get(k)}" for k in keys))
        for who, facts in out.items():
            if not who.startswith("_") and facts.get("history rows after T"):
                self.notes.append(f"{who}'s restored server has "
                                  f"{facts['history rows after T']} history rows with mtime "
                                  "after T: it recovered past T")
        return out

    def versions(self) -> dict[str, str]:
        import zstandard

        return {
            "pgBackRest": tool_output(["pgbackrest", "version"]),
            "PostgreSQL": execute(self.server, "SHOW server_version")[0][0],
            "pg_basebackup": tool_output([self.cluster.tool("pg_basebackup"), "--version"]),
            "zstd CLI": tool_output(["zstd", "--version"]),
            "python zstandard": f"{zstandard.__version__} (libzstd "
                                f"{zstandard.ZSTD_VERSION[0]}.{zstandard.ZSTD_VERSION[1]}."
                                f"{zstandard.ZSTD_VERSION[2]})",
            "python": sys.version.split()[0],
        }

    def settings(self) -> dict[str, str]:
        names = ("shared_buffers", "max_wal_size", "checkpoint_timeout", "archive_timeout",
                 "synchronous_commit", "full_page_writes", "wal_compression", "data_checksums")
        rows = execute(self.server, "SELECT name, setting || coalesce(' ' || unit, '') "
                                    "FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
                       (list(names),))
        return dict(rows)

    def standing_notes(self) -> list[str]:
        notes = [
            "pgBackRest's lag is bound by segment completion: a segment is archived when full "
            "or switched (archive_timeout, pg_switch_wal); pushes run one at a time, in order.",
            "pgBackRest restore time = restore command + pg_ctl start + recovery to T + "
            "promotion; its restore_command fetches every WAL segment with one "
            "`pgbackrest archive-get` process per segment (archive-async off).",
            "Recovery to a time needs a commit after T in the archived WAL: PostgreSQL 15 "
            "stops with FATAL 'recovery ended before configured recovery target was reached' "
            "otherwise. The benchmark closes the last segment after the load (pg_switch_wal) "
            "and waits for both archives to hold it.",
        ]
        if self.args.lag_mode == "concurrent":
            notes.append("lag mode concurrent: every segment switch (archive_timeout, our "
                         "receiver's) completes a segment for both archives; use "
                         "--lag-mode separate for each side alone.")
        return notes

    # -- cleanup -----------------------------------------------------------------------------
    def cleanup(self) -> None:
        for step in (lambda: self.load and self.load.stop(),
                     lambda: self.sampler and self.sampler.stop(raise_error=False),
                     self.stop_receiver,
                     *[lambda d=d: stop_postmaster(d) for d in self.restored_dirs],
                     self.cluster.stop,
                     lambda: self.background.stop(raise_error=False)):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                log(f"cleanup: {tail(str(exc), 300)}")


# -- the command line ------------------------------------------------------------------------

def check_prerequisites() -> None:
    if not shutil.which("pgbackrest"):
        print("pitr_bench: pgBackRest is not installed. Install it with:\n"
              "    apt-get update && apt-get install -y pgbackrest", file=sys.stderr)
        raise SystemExit(2)
    if os.geteuid() == 0:
        try:
            os_user_ids()
        except KeyError:
            print("pitr_bench: running as root needs the OS user 'postgres' to run the server "
                  "(apt-get install -y postgresql-15 creates it)", file=sys.stderr)
            raise SystemExit(2) from None
    find_bindir(PG_MAJOR)
    for tool in ("pg_ctl", "pgbench", "pg_dump"):
        if not (find_bindir(PG_MAJOR) / tool).exists():
            raise SystemExit(f"pitr_bench: {tool} missing from {find_bindir(PG_MAJOR)}")


def prepare_workdir(path: Path) -> Path:
    """An empty work directory; one a previous run left (``.pitr-bench`` marker) is removed if
    no server still runs in it; anything else that is not empty is refused."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise SystemExit(f"pitr_bench: {path} is not empty and not a pitr_bench work "
                             "directory; choose another --workdir")
        for pid_file in path.glob("**/postmaster.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pid_file.read_text().splitlines()[0])
                if Path(f"/proc/{pid}").exists():
                    raise SystemExit(f"pitr_bench: a server still runs in {pid_file.parent} "
                                     f"(pid {pid}); stop it or choose another --workdir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    (path / MARKER).write_text("pitr_bench work directory: removed by the next run\n")
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=45,
                        help="pgbench scale factor (45 + the random table: about 1.1 GB)")
    parser.add_argument("--random-rows", type=int,
                        help=f"rows of random text (default: {RANDOM_ROWS_PER_SCALE:,} x scale)")
    parser.add_argument("--load-rate", type=int, default=100,
                        help="pgbench -R: transactions per second of the write load (2 clients)")
    parser.add_argument("--lag-seconds", type=int, default=300,
                        help="length of the archive lag window (per side with --lag-mode "
                             "separate)")
    parser.add_argument("--lag-mode", choices=("concurrent", "separate"), default="concurrent")
    parser.add_argument("--archive-timeout", type=int, default=60,
                        help="archive_timeout for pgBackRest's archiving and "
                             "RAG_PG_WAL_SWITCH_AFTER_S for ours (seconds)")
    parser.add_argument("--pgbackrest-compress-type", choices=("gz", "zst", "lz4", "bz2", "none"),
                        help="pgBackRest's compress-type (default: pgBackRest's own default, "
                             "gz in 2.45)")
    parser.add_argument("--backup-order", choices=("ours-first", "pgbackrest-first"),
                        default="ours-first",
                        help="which base backup is taken first; the first one's restore "
                             "replays more WAL to reach T (default: ours, the conservative "
                             "choice for ours)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before the first base backup")
    parser.add_argument("--no-runbook", action="store_true",
                        help="skip the runbook's daily pg_dump (context only)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed to each base backup and each restore")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pitr-bench"),
                        help="where the cluster, both repositories and the restores go")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (servers are stopped anyway)")
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_prerequisites()
    ours = probe_ours()
    if any(v != "ok" for v in ours.values()):
        log("OUR SIDE IS NOT AVAILABLE, measuring pgBackRest's side only: "
            + "; ".join(f"{k}: {v}" for k, v in ours.items() if v != "ok"))

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    work = prepare_workdir(args.workdir.resolve())
    bench = Bench(args, work, ours)
    try:
        report = bench.run()
    finally:
        bench.cleanup()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
