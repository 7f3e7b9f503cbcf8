"""PostgreSQL backup and restore: rag-backup's engine against the native tool and the runbook.

What is compared, in one run, on one generated database: ``pgbench -i -s SCALE`` plus a table of
random base64 text (40,000 rows per scale unit, about a third of the database), so compression
ratios are not flattered by pgbench's blank-padded rows.

backup
  native    ``pg_dump --format=custom`` (its built-in gzip, default level) to a file
  runbook   ``pg_dump --format=custom | gzip > file``, the shell pipeline of the runbook
  ours      ``rag_backup.engines.postgres.backup()`` into a fresh filesystem repository: pg_dump -Z0
            on an exported snapshot, zstd (level 3, multithreaded) in-process, sha256, fsync,
            row counts of every table in the same snapshot, plus the globals (pg_dumpall -g)
verify
  ours      ``verify()``: sha256 + zstd decompression of every artifact + ``pg_restore --list``
restore (each into a new database; the clock includes creating it)
  native    ``createdb && pg_restore -j 2``; with ``--serial``, also ``pg_restore`` with one job
  runbook   with ``--serial``: ``createdb && gunzip -c file | pg_restore`` (stdin: no ``-j``)
  ours      ``restore(jobs=2)``: sha256 + zstd decompression to a temporary file, pg_restore -j 2
            into a staging database, row counts checked against the manifest, rename into place
encryption at rest
  ours+enc  our backup and restore again with an encrypted repository (a second directory; a
            key generated for the run, passed as RAG_BACKUP_ENCRYPT_TO / RAG_BACKUP_IDENTITY);
            the report gives encrypted / clear for time and peak memory (target: time <= 1.10)

Every contender runs ``--repeat`` times (default 3), round-robin so drift hits all alike; the
table shows the median of each number and the range of the wall times.

How each contender is measured: it runs as its own child process in its own session (``ours`` in
a fresh Python interpreter running this file's ``_worker`` mode), so nothing of the benchmark's
own memory is attributed to it.

- ``wall s``: elapsed time from spawn to exit, interpreter start included (~0.1 s).
- ``MB/s``: the source database's size (``pg_database_size``) / wall time, for every row,
  so rows compare directly. MB = 10^6 bytes.
- ``artifact MB``: bytes the backup left on disk (ours: the manifest's artifacts, i.e. the
  zstd dump plus the globals; native/runbook: the one file). ``% db``: artifact / database size.
- ``tree RSS MB``: peak of the summed RSS of every process in the contender's session (python,
  pg_dump, gzip, bash, pg_restore and its workers), sampled from /proc every 50 ms. Pages
  shared between processes are counted once per process, so this is an upper bound.
- ``proc RSS MB``: the largest single process's peak RSS (the kernel's VmHWM, read in the same
  samples). Not ``ru_maxrss``: a child's ``ru_maxrss`` includes the RSS of the benchmark's own
  Python process it was forked from, which would put a floor of ~30 MB under every row.
- ``CPU s``: user + system CPU of the contender's processes (``wait4`` rusage).

Not measured: the server's own processes (the backend running COPY for pg_dump, the backends
loading rows and building indexes for pg_restore) are not in the contender's process tree, so
they count in wall time only. Ours fsyncs its artifacts (a backup must be durable); the native
and runbook files are not fsynced. Between contenders the benchmark runs ``sync`` and a
``CHECKPOINT`` (untimed) so no contender pays for its predecessor's writes. The machine's page
cache holds the whole database after generation, so backups read from memory.

How to read the output: the table gives absolute numbers per contender; the ratios below it are
ours / native and ours / runbook (time: below 1 means ours is faster; size: below 1 means ours
is smaller). Then the restored databases' sizes (all should match the source) and our engine's
own log with timestamps (e.g. how long the restore spent unpacking before pg_restore started).
Progress goes to stderr, the report to stdout. Run on a quiet machine.

Usage::

    .venv/bin/python benchmarks/postgres_bench.py [--scale 70] [--serial] [--keep] [--json out.json]
    .venv/bin/python benchmarks/postgres_bench.py --pg-host 127.0.0.1 --pg-port 5432 \\
        --pg-user postgres

Without ``--pg-host`` the benchmark starts a dedicated PostgreSQL with the project's devstack
and stops it at the end. With ``--pg-host`` it uses that server (it creates and drops its own
databases there, named ``pgbench_<hex>*``; the password comes from RAG_PG_PASSWORD only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from measure import (  # noqa: E402
    MB,
    encryption_env,
    encryption_overhead,
    log,
    open_repository,
    render_encryption,
    run_measured,
)
from psycopg2 import sql

from rag_backup.engines import postgres as pg
from rag_backup.proc import run, tail

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
RANDOM_ROWS_PER_SCALE = 40_000
PARTITION = "2026-11-24"
RUN_ID = "postgres-bench"
SETUP_TIMEOUT_S = 3600.0


# -- the server and the data -------------------------------------------------------------

@contextmanager
def postgres_server(args: argparse.Namespace) -> Iterator[tuple[pg.PostgresServer, str]]:
    """The server to benchmark against: an external one, or a dedicated devstack PostgreSQL."""
    if args.pg_host:
        server = pg.PostgresServer(args.pg_host, args.pg_port, args.pg_user,
                                   os.environ.get("RAG_PG_PASSWORD", ""))
        yield server, f"external server {server.describe()}"
        return
    from rag_backup.devstack import DevStack

    root = Path(tempfile.mkdtemp(prefix="pg-bench-stack-", dir=args.workdir))
    stack = DevStack(root=root, services=("postgres",))
    try:
        log(f"starting the devstack PostgreSQL under {root}")
        env = stack.up(seed=False)
        server = pg.PostgresServer(env["RAG_PG_HOST"], int(env["RAG_PG_PORT"]),
                                   env["RAG_PG_USER"], env["RAG_PG_PASSWORD"])
        yield server, f"devstack {server.describe()}"
    finally:
        stack.down()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def admin_execute(server: pg.PostgresServer, statement: sql.Composable | str,
                  database: str = "postgres") -> list[tuple[Any, ...]]:
    """Run one statement outside a transaction block; return its rows, if any."""
    conn = server.connect(database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def drop_database(server: pg.PostgresServer, name: str) -> None:
    admin_execute(server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)))


def database_size(server: pg.PostgresServer, name: str) -> int:
    return int(admin_execute(server, sql.SQL("SELECT pg_database_size({})").format(
        sql.Literal(name)))[0][0])


def settle(server: pg.PostgresServer) -> None:
    """Flush the previous contender's writes so the next one does not pay for them."""
    os.sync()
    try:
        admin_execute(server, "CHECKPOINT")
    except psycopg2.Error as exc:  # needs superuser or pg_checkpoint; sync alone then
        log(f"CHECKPOINT refused ({tail(str(exc))}); settling with sync only")


REPORTED_SETTINGS = ("shared_buffers", "maintenance_work_mem", "max_wal_size", "fsync",
                     "synchronous_commit", "max_parallel_maintenance_workers")


def server_settings(server: pg.PostgresServer) -> dict[str, str]:
    """The settings that move these numbers, as the server reports them."""
    rows = admin_execute(server, sql.SQL(
        "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings "
        "WHERE name IN ({}) ORDER BY name").format(
        sql.SQL(", ").join(map(sql.Literal, REPORTED_SETTINGS))))
    return {name: value for name, value in rows}


def connection_options(server: pg.PostgresServer) -> list[str]:
    return ["--host", server.host, "--port", str(server.port), "--username", server.user]


RANDOM_TABLE_SQL = """
CREATE TABLE bench_random (id bigint PRIMARY KEY, payload text NOT NULL);
INSERT INTO bench_random
SELECT g, encode(decode(md5(random()::text) || md5(random()::text) || md5(random()::text),
                        'hex'), 'base64')
       || encode(decode(md5(random()::text) || md5(random()::text) || md5(random()::text),
                        'hex'), 'base64')
FROM generate_series(1, %(rows)s) AS g;
"""


@dataclass(frozen=True)
class Dataset:
    database: str
    scale: int
    random_rows: int
    size_bytes: int
    tables: dict[str, int]
    generate_s: float


def create_dataset(server: pg.PostgresServer, name: str, scale: int, rows: int) -> Dataset:
    """pgbench's tables at ``scale`` plus ``rows`` rows of ``bench_random`` (128 random base64
    characters a row: 6 bits of entropy per byte, so no compressor gets it much below 75 %)."""
    started = time.monotonic()
    admin_execute(server, sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
        sql.Identifier(name)))
    run([server.tool("pgbench"), "--initialize", f"--scale={scale}", "--quiet",
         *connection_options(server), name],
        what=f"pgbench -i -s {scale}", timeout=SETUP_TIMEOUT_S, env=server.env())
    conn = server.connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute(RANDOM_TABLE_SQL, {"rows": rows})
        conn.commit()
        conn.autocommit = True
        with conn.cursor() as cur:  # hint bits and visibility map set now, not by a contender
            cur.execute("VACUUM (FREEZE, ANALYZE)")
    finally:
        conn.close()
    tables = pg.fingerprint_database(server, name).tables
    return Dataset(name, scale, rows, database_size(server, name), tables,
                   time.monotonic() - started)


# -- contenders --------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    phase: str            # backup / verify / restore
    who: str              # ours / ours+enc / native / runbook
    label: str            # what it runs, for the table
    argv: list[str]
    artifact: Path | None = None        # the file the backup writes (native, runbook)
    creates_database: str | None = None  # restores: dropped again after measuring
    env: dict[str, str] = field(default_factory=dict)  # ours: clear or encrypted repository


@dataclass
class Result:
    phase: str
    who: str
    label: str
    wall_s: float
    mb_per_s: float
    cpu_s: float
    peak_tree_rss_bytes: int
    max_proc_rss_bytes: int
    rss_samples: int
    artifact_bytes: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    wall_s_runs: list[float] = field(default_factory=list)


def median_of(runs: Sequence[Result]) -> Result:
    """One row from repeated runs: the median of every measured number, each on its own."""
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs)

    sizes = [r.artifact_bytes for r in runs if r.artifact_bytes is not None]
    return Result(runs[0].phase, runs[0].who, runs[0].label, med("wall_s"), med("mb_per_s"),
                  med("cpu_s"), int(med("peak_tree_rss_bytes")), int(med("max_proc_rss_bytes")),
                  sum(r.rss_samples for r in runs),
                  int(statistics.median(sizes)) if sizes else None, runs[-1].detail,
                  [round(r.wall_s, 3) for r in runs])


def bash(script: str, *args: str) -> list[str]:
    """A bash pipeline that fails when any stage fails; arguments are passed, not quoted in."""
    return ["bash", "-c", f"set -euo pipefail; {script}", "bench", *args]


def worker_argv(server: pg.PostgresServer, action: str, repo: Path, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_worker", action,
            "--repo", str(repo), "--host", server.host, "--port", str(server.port),
            "--user", server.user, *extra]


def backup_contenders(server: pg.PostgresServer, db: str, work: Path,
                      zstd_level: int) -> list[Contender]:
    pg_dump, dsn = server.tool("pg_dump"), server.dsn(db)
    native, runbook, repo = work / "native.dump", work / "runbook.dump.gz", work / "repo"
    clear, encrypted = encryption_env(False), encryption_env(True)
    return [
        Contender("backup", "native", "pg_dump -Fc", [
            pg_dump, "--format=custom", "--no-password", f"--file={native}", f"--dbname={dsn}",
        ], artifact=native),
        Contender("backup", "runbook", "pg_dump -Fc | gzip", bash(
            '"$1" --format=custom --no-password --dbname="$2" | gzip > "$3"',
            pg_dump, dsn, str(runbook)), artifact=runbook),
        Contender("backup", "ours", f"backup() zstd-{zstd_level}", worker_argv(
            server, "backup", repo, "--database", db, "--zstd-level", str(zstd_level)),
            env=clear),
        Contender("backup", "ours+enc", f"backup() zstd-{zstd_level}", worker_argv(
            server, "backup", work / "repo-enc", "--database", db, "--zstd-level",
            str(zstd_level)), env=encrypted),
        Contender("verify", "ours", "verify()", worker_argv(server, "verify", repo), env=clear),
    ]


def restore_contenders(server: pg.PostgresServer, db: str, work: Path, jobs: int,
                       serial: bool) -> list[Contender]:
    pg_restore, createdb = server.tool("pg_restore"), server.tool("createdb")
    native, runbook, repo = work / "native.dump", work / "runbook.dump.gz", work / "repo"
    make_db = [createdb, *connection_options(server), "--no-password", "--template=template0"]

    def native_restore(target: str, job_count: int) -> Contender:
        return Contender("restore", "native", f"pg_restore -j {job_count}", bash(
            'db="$1"; dump="$2"; restore="$3"; jobs="$4"; shift 4; "$@" "$db" && '
            '"$restore" --jobs="$jobs" --no-password --dbname="$DSN" "$dump"',
            target, str(native), pg_restore, str(job_count), *make_db),
            creates_database=target)

    contenders = [
        native_restore(f"{db}_native_j{jobs}", jobs),
        Contender("restore", "ours", f"restore(jobs={jobs})", worker_argv(
            server, "restore", repo, "--database", db, "--target", f"{db}_ours",
            "--jobs", str(jobs)), creates_database=f"{db}_ours", env=encryption_env(False)),
        Contender("restore", "ours+enc", f"restore(jobs={jobs})", worker_argv(
            server, "restore", work / "repo-enc", "--database", db, "--target",
            f"{db}_ours_enc", "--jobs", str(jobs)), creates_database=f"{db}_ours_enc",
            env=encryption_env(True)),
    ]
    if serial:
        contenders.append(native_restore(f"{db}_native_j1", 1))
        contenders.append(Contender("restore", "runbook", "gunzip -c | pg_restore", bash(
            'db="$1"; dump="$2"; restore="$3"; shift 3; "$@" "$db" && '
            'gunzip -c "$dump" | "$restore" --no-password --dbname="$DSN"',
            f"{db}_runbook", str(runbook), pg_restore, *make_db),
            creates_database=f"{db}_runbook"))
    return contenders


def measure(server: pg.PostgresServer, contender: Contender, db_size: int,
            timeout_s: float) -> Result:
    env = {**server.env(), **contender.env}
    env["RAG_PG_PASSWORD"] = server.password
    if contender.creates_database:
        env["DSN"] = server.dsn(contender.creates_database)
    what = f"{contender.phase} {contender.who} ({contender.label})"
    stats = run_measured(contender.argv, what=what, timeout_s=timeout_s, env=env)
    detail: dict[str, Any] = (json.loads(stats.stdout) if contender.who.startswith("ours")
                              else {})
    artifact = (contender.artifact.stat().st_size if contender.artifact
                else detail.get("artifact_bytes"))
    if contender.creates_database:
        detail["restored_database_bytes"] = database_size(server, contender.creates_database)
    return Result(contender.phase, contender.who, contender.label, stats.wall_s,
                  db_size / MB / stats.wall_s, stats.cpu_s, stats.peak_tree_rss_bytes,
                  stats.max_proc_rss_bytes, stats.rss_samples, artifact, detail)


# -- the worker: our engine in its own interpreter ---------------------------------------

def worker(argv: Sequence[str]) -> int:
    """``_worker backup|verify|restore``: one engine call; a JSON summary on stdout."""
    parser = argparse.ArgumentParser(prog="postgres_bench.py _worker")
    parser.add_argument("action", choices=("backup", "verify", "restore"))
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--user", required=True)
    parser.add_argument("--database")
    parser.add_argument("--target")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--zstd-level", type=int, default=3)
    args = parser.parse_args(argv)
    server = pg.PostgresServer(args.host, args.port, args.user,
                               os.environ.get("RAG_PG_PASSWORD", ""))
    repo = open_repository(args.repo)
    started, engine_log = time.monotonic(), []

    def note(message: str) -> None:
        engine_log.append([round(time.monotonic() - started, 3), message])

    if args.action == "backup":
        with repo.begin(pg.STORE, PARTITION, RUN_ID) as pending:
            out = pg.backup(server, pending, databases=[args.database],
                            zstd_level=args.zstd_level, log=note)
            manifest = pending.commit(out)
        summary: dict[str, Any] = {
            "artifact_bytes": manifest.size_bytes, "rows": out.rows, "tables": out.tables,
            "artifacts": {a.path: a.size for a in manifest.artifacts}}
    else:
        record = repo.get(pg.STORE, PARTITION)
        if record is None:
            raise SystemExit(f"no backup {PARTITION} in {args.repo}")
        if args.action == "verify":
            summary = pg.verify(repo, record, server=server)
        else:
            report = pg.restore(repo, record, server, source_database=args.database,
                                target_database=args.target, jobs=args.jobs,
                                workdir=str(args.repo.parent), log=note)
            summary = {"rows": report.rows, "tables": report.tables,
                       "matches_manifest": report.matches_manifest,
                       "engine_duration_s": round(report.duration_s, 3)}
    summary["engine_log"] = engine_log
    print(json.dumps(summary))
    return 0


# -- the report --------------------------------------------------------------------------

@dataclass
class Report:
    server: str
    server_version: str
    pg_dump_version: str
    settings: dict[str, str]
    cpus: int
    repeat: int
    dataset: Dataset
    results: list[Result]

    def find(self, phase: str, who: str, label_prefix: str = "") -> Result | None:
        return next((r for r in self.results if r.phase == phase and r.who == who
                     and r.label.startswith(label_prefix)), None)

    def ratios(self) -> dict[str, float]:
        """ours / other, for time, size and memory; only for contenders that ran."""
        pairs = {
            "backup time, ours / native": ("backup", "native", "", "wall_s"),
            "backup time, ours / runbook": ("backup", "runbook", "", "wall_s"),
            "backup size, ours / native": ("backup", "native", "", "artifact_bytes"),
            "backup size, ours / runbook": ("backup", "runbook", "", "artifact_bytes"),
            "backup tree RSS, ours / native": ("backup", "native", "", "peak_tree_rss_bytes"),
            "backup tree RSS, ours / runbook": ("backup", "runbook", "", "peak_tree_rss_bytes"),
            "backup CPU, ours / native": ("backup", "native", "", "cpu_s"),
            "restore time, ours / native (same jobs)": ("restore", "native", "pg_restore -j ",
                                                        "wall_s"),
            "restore time, ours / native -j 1": ("restore", "native", "pg_restore -j 1", "wall_s"),
            "restore time, ours / runbook": ("restore", "runbook", "", "wall_s"),
            "restore tree RSS, ours / native": ("restore", "native", "pg_restore -j ",
                                                "peak_tree_rss_bytes"),
        }
        out: dict[str, float] = {}
        for name, (phase, who, prefix, attr) in pairs.items():
            ours, other = self.find(phase, "ours"), self.find(phase, who, prefix)
            if ours and other and getattr(other, attr):
                out[name] = getattr(ours, attr) / getattr(other, attr)
        return out

    def encryption(self) -> dict[str, dict[str, Any]]:
        """Encrypted / clear for our backup and restore (``measure.encryption_overhead``)."""
        def row(phase: str, who: str) -> dict[str, float]:
            found = self.find(phase, who)
            assert found is not None
            return {"wall_s": found.wall_s, "tree_rss_mb": found.peak_tree_rss_bytes / MB}

        return encryption_overhead({phase: (row(phase, "ours"), row(phase, "ours+enc"))
                                    for phase in ("backup", "restore")})

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "server_version": self.server_version,
                "pg_dump_version": self.pg_dump_version, "settings": self.settings,
                "cpus": self.cpus,
                "repeat": self.repeat,
                "dataset": asdict(self.dataset),
                "results": [asdict(r) for r in self.results],
                "ratios": {k: round(v, 4) for k, v in self.ratios().items()},
                "encryption": self.encryption()}


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:,.1f}"


def render(report: Report) -> str:
    ds = report.dataset
    lines = [
        (f"PostgreSQL backup benchmark: database {ds.database}, {_mb(ds.size_bytes)} MB "
         f"(pg_database_size); pgbench scale {ds.scale} + {ds.random_rows:,} random rows; "
         f"{sum(ds.tables.values()):,} rows in {len(ds.tables)} tables"),
        (f"server: {report.server}, PostgreSQL {report.server_version}; client: "
         f"{report.pg_dump_version}; {report.cpus} CPUs; medians of {report.repeat} round(s)"),
        "settings: " + ", ".join(f"{k}={v}" for k, v in report.settings.items()),
        "",
        (f"{'phase':<8}{'who':<10}{'what':<24}{'wall s':>8}{'runs s':>13}{'MB/s':>8}"
         f"{'artifact MB':>13}{'% db':>6}{'tree RSS MB':>13}{'proc RSS MB':>13}{'CPU s':>7}"),
    ]
    for r in report.results:
        share = "-" if r.artifact_bytes is None else f"{100 * r.artifact_bytes / ds.size_bytes:.1f}"
        spread = f"{min(r.wall_s_runs):.1f}-{max(r.wall_s_runs):.1f}"
        lines.append(
            f"{r.phase:<8}{r.who:<10}{r.label:<24}{r.wall_s:>8.1f}{spread:>13}{r.mb_per_s:>8.1f}"
            f"{_mb(r.artifact_bytes):>13}{share:>6}{_mb(r.peak_tree_rss_bytes):>13}"
            f"{_mb(r.max_proc_rss_bytes):>13}{r.cpu_s:>7.1f}")
    lines += ["", "ratios (ours / other; time and size: < 1 is better for ours)"]
    lines += [f"  {name:<42}{value:>7.2f}" for name, value in report.ratios().items()]
    lines += ["", *render_encryption(report.encryption())]
    restored = [f"{r.who} {r.label}: {_mb(r.detail['restored_database_bytes'])} MB"
                for r in report.results if "restored_database_bytes" in r.detail]
    if restored:
        lines += ["", "restored database sizes (source: " + _mb(ds.size_bytes) + " MB): "
                  + "; ".join(restored)]
    steps = [f"  {r.who} {r.label}: at {t:.1f} s: {message}" for r in report.results
             for t, message in r.detail.get("engine_log", [])]
    if steps:
        lines += ["", "our engine's own log, last round (seconds since the worker started):",
                  *steps]
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------

def run_round(server: pg.PostgresServer, contenders: Sequence[Contender], db_size: int,
              args: argparse.Namespace, last: bool) -> list[Result]:
    """Every contender once, in order; restored databases dropped again (kept on the last
    round with ``--keep``)."""
    results = []
    for contender in contenders:
        settle(server)
        log(f"{contender.phase} {contender.who}: {contender.label}")
        result = measure(server, contender, db_size, args.timeout)
        log(f"  {result.wall_s:.1f} s, {result.mb_per_s:.1f} MB/s")
        results.append(result)
        if contender.creates_database and not (args.keep and last):
            drop_database(server, contender.creates_database)
    return results


def benchmark(server: pg.PostgresServer, origin: str, args: argparse.Namespace,
              work: Path) -> Report:
    """Generate the data, run ``--repeat`` rounds of every contender, report the medians."""
    db = f"pgbench_{uuid.uuid4().hex[:8]}"
    contenders = (backup_contenders(server, db, work, args.zstd_level)
                  + restore_contenders(server, db, work, args.jobs, args.serial))
    created = [db] + [c.creates_database for c in contenders if c.creates_database]
    random_rows = (args.random_rows if args.random_rows is not None
                   else args.scale * RANDOM_ROWS_PER_SCALE)
    try:
        log(f"generating {db} with pgbench -i -s {args.scale} and {random_rows:,} random rows "
            f"on {origin}")
        dataset = create_dataset(server, db, args.scale, random_rows)
        log(f"{db}: {_mb(dataset.size_bytes)} MB in {dataset.generate_s:.0f} s")
        rounds = []
        for number in range(1, args.repeat + 1):
            log(f"round {number} of {args.repeat}")
            rounds.append(run_round(server, contenders, dataset.size_bytes, args,
                                    last=number == args.repeat))
        results = [median_of(runs) for runs in zip(*rounds, strict=True)]
        return Report(origin, pg.server_version(server), pg.tool_version(server, "pg_dump"),
                      server_settings(server), os.cpu_count() or 0, args.repeat, dataset,
                      results)
    finally:
        if args.keep:
            log(f"kept databases {', '.join(created)} and files under {work}")
        else:
            for name in created:
                drop_database(server, name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=70,
                        help="pgbench scale factor (70: about 1.3 GB with the random table)")
    parser.add_argument("--random-rows", type=int,
                        help=f"rows of random text (default: {RANDOM_ROWS_PER_SCALE:,} x scale)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every contender; the table shows medians")
    parser.add_argument("--jobs", type=int, default=2, help="pg_restore jobs, ours and native")
    parser.add_argument("--zstd-level", type=int, default=3, help="our zstd level")
    parser.add_argument("--serial", action="store_true",
                        help="also restore with pg_restore -j 1 and the runbook's gunzip | "
                             "pg_restore")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed to each contender")
    parser.add_argument("--workdir", help="where dumps and the repository go (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the databases and files (the devstack is stopped anyway)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--pg-host", help="use this server instead of a devstack PostgreSQL "
                                          "(password: RAG_PG_PASSWORD)")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pg-bench-", dir=args.workdir))
    try:
        with postgres_server(args) as (server, origin):
            report = benchmark(server, origin, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
