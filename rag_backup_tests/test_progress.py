"""Progress of long operations: the tracker's lines (throttled, rate, time left, unknown and
estimated totals, the final line), the helpers the engines use, the rich bars of the command
line, and the lines in real Dagster runs (a PostgreSQL backup, its verification and restore, a
MinIO backup) against the session's stack."""

from __future__ import annotations

import contextvars
import io
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import dagster as dg
import pytest
from botocore.config import Config

from rag_backup import progress
from rag_backup.defs import minio as minio_defs
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs.resources import (
    BackupRepositoryResource,
    MinioResource,
    PostgresResource,
)
from rag_backup.engines.zstream import copy_stream
from rag_backup.repository.manifest import utcnow
from rag_backup_tests import pgutil

STACK_SERVICES = ("postgres", "s3")  # the stores these tests need (see conftest)

TODAY = utcnow().strftime("%Y-%m-%d")
GB = 1000**3


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """Collects progress records: their messages and snapshots."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def captured():
    """The records of the ``rag_backup.progress`` logger while a test runs."""
    handler = Lines()
    logger = progress.LOGGER
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def tracker(total, unit="bytes", *, estimated=False, every_s=30.0, what="pg_dump of ragqa"):
    clock = Clock()
    handler = Lines()
    logger = logging.getLogger(f"test.progress.{uuid.uuid4().hex}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return progress.Progress(what, total, unit, estimated=estimated, every_s=every_s,
                             clock=clock, logger=logger), clock, handler


# -- the tracker -----------------------------------------------------------------------------

def test_a_line_at_most_every_interval_then_a_final_line():
    p, clock, out = tracker(10 * GB)
    for _ in range(29):  # one advance a second: nothing to say before 30 s
        clock.now += 1
        p.advance(10**6)
    assert out.lines == []
    clock.now += 1
    p.advance(10**6)
    assert len(out.lines) == 1
    for _ in range(29):
        clock.now += 1
        p.advance(10**6)
    assert len(out.lines) == 1
    clock.now += 1
    p.advance(0)  # a stalled operation still reports when a line is due
    assert len(out.lines) == 2
    p.finish()
    p.finish()  # once
    p.advance(10**6)  # after the end: ignored
    assert len(out.lines) == 3 and out.lines[-1].startswith("pg_dump of ragqa: finished, ")
    assert [r.progress.final for r in out.records] == [False, False, True]


def test_rate_percent_and_time_left():
    p, clock, out = tracker(int(3.4 * GB), estimated=True, every_s=0)
    clock.now += 10
    p.advance(int(1.2 * GB))
    assert out.lines == ["pg_dump of ragqa: 1.2 GB of ~3.4 GB (35%), 120 MB/s, about 19 s left"]
    snap = out.records[0].progress
    assert (snap.done, snap.total, snap.estimated, snap.percent) == (
        1.2 * GB, 3.4 * GB, True, 35)
    assert snap.rate == pytest.approx(120e6) and snap.eta_s == pytest.approx(2.2e9 / 120e6)
    clock.now += 30
    p.advance(int(2.2 * GB))
    assert out.lines[-1] == "pg_dump of ragqa: 3.4 GB of ~3.4 GB (100%), 85 MB/s"
    clock.now += 1
    p.finish()
    assert out.lines[-1] == "pg_dump of ragqa: finished, 3.4 GB of ~3.4 GB in 41 s (83 MB/s)"


def test_counts_in_other_units_with_long_times_left():
    p, clock, out = tracker(5_000_000, "rows", every_s=0, what="milvus backup of collection docs")
    clock.now += 100
    p.advance(120_000)
    assert out.lines == ["milvus backup of collection docs: 120,000 of 5,000,000 rows (2%), "
                         "1,200 rows/s, about 1 h 7 min left"]
    clock.now += 20
    p.advance(0)
    assert out.lines[-1].endswith("1,000 rows/s, about 1 h 21 min left")


def test_an_unknown_total_gives_done_and_rate_only():
    p, clock, out = tracker(None, every_s=0, what="redis-cli --rdb from Redis h:1")
    clock.now += 2
    p.advance(5_000_000)
    assert out.lines == ["redis-cli --rdb from Redis h:1: 5.0 MB, 2.5 MB/s"]
    snap = out.records[0].progress
    assert snap.percent is None and snap.eta_s is None
    clock.now += 2
    p.finish()
    assert out.lines[-1] == "redis-cli --rdb from Redis h:1: finished, 5.0 MB in 4 s (1.2 MB/s)"


def test_an_estimate_passed_says_so_without_percent_or_time_left():
    p, clock, out = tracker(1_000_000, estimated=True, every_s=0)
    clock.now += 1
    p.advance(1_500_000)
    assert out.lines == ["pg_dump of ragqa: 1.5 MB (more than the estimated ~1.0 MB), 1.5 MB/s"]
    p.set_total(2_000_000)  # a better total learnt later: exact now
    p.advance(0)
    assert out.lines[-1] == "pg_dump of ragqa: 1.5 MB of 2.0 MB (75%), 1.5 MB/s, about 1 s left"


def test_no_time_passed_no_rate():
    p, _, out = tracker(100, "keys", every_s=0)
    p.advance(0)
    assert out.lines == ["pg_dump of ragqa: 0 of 100 keys (0%)"]
    p.finish(failed=True)
    assert out.lines[-1] == "pg_dump of ragqa: stopped after 0 of 100 keys in 0 s"


def test_durations_and_sizes_read_naturally():
    assert [progress.format_duration(s) for s in (0.4, 26, 60, 250, 3600, 4321)] == [
        "0 s", "26 s", "1 min", "4 min 10 s", "1 h 0 min", "1 h 12 min"]
    assert [progress.format_bytes(n) for n in (0, 999, 1000, 84e6, 1.23e9, 5e15)] == [
        "0 B", "999 B", "1.0 kB", "84 MB", "1.2 GB", "5000 TB"]


def test_the_interval_comes_from_the_environment(monkeypatch):
    for value, expected in (("", 30.0), ("0", 0.0), ("2.5", 2.5), ("soon", 30.0), ("-1", 30.0)):
        monkeypatch.setenv(progress.EVERY_ENV, value)
        assert progress.report_every_s() == expected
        assert progress.Progress("x").every_s == expected


# -- what the engines call -------------------------------------------------------------------

def test_advance_feeds_the_current_tracker_of_its_unit_only(captured, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    progress.advance(5)  # nothing tracked: a no-op
    assert captured.lines == [] and progress.current() is None
    with progress.tracking("outer", 100, "rows") as outer:
        assert progress.current() is outer
        copy_stream(io.BytesIO(b"x" * 10), io.BytesIO())  # bytes: not this tracker's unit
        progress.advance(7, unit="rows")
        with progress.tracking("inner", 10) as inner:
            assert progress.current() is inner
            copy_stream(io.BytesIO(b"x" * 10), io.BytesIO(), chunk=4)
        assert progress.current() is outer
    assert progress.current() is None
    assert (outer.done, inner.done) == (7, 10)
    assert [line.split(":")[0] for line in captured.lines] == ["outer"] + ["inner"] * 4 + [
        "outer"]
    assert captured.lines[-2].startswith("inner: finished, 10 B of 10 B in ")


def test_an_operation_that_raises_ends_with_stopped(captured):
    with pytest.raises(RuntimeError):
        with progress.tracking("pg_restore into 'x'", 1000):
            progress.advance(250)
            raise RuntimeError("boom")
    assert len(captured.lines) == 1
    assert captured.lines[0].startswith("pg_restore into 'x': stopped after 250 B of 1.0 kB in")
    assert captured.records[0].progress.failed


def test_follow_measures_a_tool_from_outside(captured, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    out = tmp_path / "growing"
    writer = ("import time, sys\n"
              "with open(sys.argv[1], 'wb') as f:\n"
              "    for _ in range(5):\n"
              "        f.write(b'x' * 1000); f.flush(); time.sleep(0.15)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(out)])
    with progress.tracking("writing", 5000) as p:
        progress.follow(proc, lambda: out.stat().st_size if out.exists() else 0, poll_s=0.05)
    assert proc.returncode == 0 and p.done == 5000
    assert len(captured.lines) >= 3  # several measures, then the final line
    assert captured.lines[-1].startswith("writing: finished, 5.0 kB of 5.0 kB in ")


def test_follow_survives_a_failing_measure(captured):
    def broken() -> int:
        raise OSError("gone")

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    with progress.tracking("tool", 10) as p:
        progress.follow(proc, broken, poll_s=0.05)
    assert proc.returncode == 0 and p.done == 0


def test_a_stopped_operation_stops_at_its_next_checkpoint_in_its_own_thread_only():
    """``stop_when`` in a thread's context: ``advance`` and ``follow`` (a tool that would run
    for a minute) raise ``Stopped`` once the event is set; the caller's context is untouched."""
    stop = threading.Event()
    seen: dict[str, object] = {}

    def operation() -> None:
        progress.stop_when(stop)
        progress.advance(1)  # not stopped yet: nothing happens
        stop.set()
        with pytest.raises(progress.Stopped):
            progress.advance(1)
        tool = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started = time.monotonic()
        try:
            with pytest.raises(progress.Stopped):
                progress.follow(tool, lambda: 0)
            seen["follow_s"] = time.monotonic() - started
        finally:
            tool.kill()
            tool.wait()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(operation,))
    thread.start()
    thread.join()
    assert seen["follow_s"] < 5  # a checkpoint at least every second
    progress.advance(1)  # this context was never told to stop
    progress.checkpoint()


def test_rich_progress_draws_a_bar_per_tracker_and_restores_the_logger(monkeypatch):
    from rich.console import Console

    monkeypatch.setenv(progress.EVERY_ENV, "7")
    logger = progress.LOGGER
    before = (logger.level, logger.propagate, list(logger.handlers))
    screen = io.StringIO()
    with progress.rich_progress(Console(file=screen, width=120, force_terminal=True,
                                        color_system=None)) as bars:
        assert progress.Progress("x").every_s == 0.2  # bars update often
        with progress.tracking("pg_dump of ragqa", 2000, estimated=True):
            progress.advance(1000)
        with progress.tracking("fetching 3 WAL segment(s)", None):
            progress.advance(10)
    assert len(bars.tasks) == 2
    text = screen.getvalue()
    assert "pg_dump of ragqa" in text and "fetching 3 WAL segment(s)" in text
    assert "finished, 1.0 kB of ~2.0 kB" in text
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert progress.Progress("x").every_s == 7  # the run-log interval again


# -- in real runs ------------------------------------------------------------------------------

# A running line without the operation's name: done [of total] [(percent)], rate[, time left]
DETAIL = re.compile(r"^(?P<done>[\d.,]+)(?: [kMGT]?B)?"
                    r"(?: of (?P<total>~?[\d.,]+)(?: [kMGT]?B)?)?(?: [a-z]+)?"
                    r"(?: \((?P<pct>\d+)%\)| \(more than the estimated ~[^)]*\))?"
                    r", (?P<rate>[\d.,]+ (?:[kMGT]?B|[a-z]+)/s)")


@pytest.fixture
def instance():
    """A Dagster instance that captures the progress logger, as dagster.yaml configures it."""
    with dg.instance_for_test(overrides={"python_logs": {
            "managed_python_loggers": ["rag_backup.progress"],
            "python_log_level": "INFO"}}) as found:
        yield found


def progress_lines(instance: dg.DagsterInstance, run_id: str, what: str) -> list[str]:
    """The run's log lines (as the UI shows them) about an operation whose name starts with
    ``what``, without the name."""
    return [e.user_message.split(": ", 1)[1] for e in instance.all_logs(run_id)
            if e.dagster_event is None and e.user_message.startswith(what)]


def running(lines: list[str]) -> list[re.Match]:
    """The lines before the final one, parsed; each must be a well-formed progress line."""
    found = [DETAIL.match(line) for line in lines[:-1]]
    assert found and all(found), lines
    return found  # type: ignore[return-value]


def test_the_run_log_pattern_reads_the_lines_the_tracker_writes():
    for line in ("1.2 GB of ~3.4 GB (35%), 120 MB/s, about 19 s left",
                 "1,200 of 5,000 rows (24%), 1,200 rows/s", "3 objects, 300 objects/s",
                 "1.5 MB (more than the estimated ~1.0 MB), 1.5 MB/s"):
        assert DETAIL.match(line), line


def pg_resources(pg, repo_dir: Path) -> dict:
    return {"repository": BackupRepositoryResource(location=str(repo_dir)),
            "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                         password=pg.password, databases="ragqa")}


def test_runs_log_progress_of_a_postgres_backup_verification_and_restore(
        pg, repo, repo_dir, instance, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0")  # every advance logs: the data is small
    result = dg.materialize([pg_defs.postgres_backup, pg_defs.postgres_backup_verified],
                            partition_key=TODAY, instance=instance,
                            resources=pg_resources(pg, repo_dir))
    assert result.success
    dumped = progress_lines(instance, result.run_id, "pg_dump of ragqa: ")
    for found, line in zip(running(dumped), dumped):  # against the server's estimate
        assert (found["total"] or "").startswith("~") or "than the estimated ~" in line, line
    assert dumped[-1].startswith("finished, ") and dumped[-1].endswith("/s)"), dumped
    verified = progress_lines(instance, result.run_id, f"verifying postgres backup {TODAY}: ")
    assert all(found["pct"] for found in running(verified)), verified  # an exact total
    total = sum(a.size for a in repo.get("postgres", TODAY).manifest.artifacts)
    assert verified[-1].startswith(f"finished, {progress.format_bytes(total)} of "
                                   f"{progress.format_bytes(total)} in "), verified

    before = pgutil.databases(pg)
    run = pg_defs.restore_postgres_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_postgres": pg_defs.RestorePostgresConfig()}),
        resources=pg_resources(pg, repo_dir), instance=instance)
    try:
        assert run.success
        unpacked = progress_lines(instance, run.run_id, "unpacking postgres archive ragqa")
        assert all(found["pct"] for found in running(unpacked))
        assert unpacked[-1].startswith("finished, "), unpacked
        loaded = progress_lines(instance, run.run_id, "pg_restore of ragqa into ragqa_restore_")
        assert loaded and loaded[-1].startswith("finished, "), loaded
    finally:
        for name in pgutil.databases(pg) - before:
            pgutil.drop_database(pg, name)


def test_runs_log_progress_of_a_minio_backup(stack_env, repo_dir, instance, monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    client = boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                          aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                          aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                          region_name=stack_env["RAG_S3_REGION"],
                          config=Config(s3={"addressing_style": "path"}))
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    keys = [f"doc-{i}.txt" for i in range(3)]
    try:
        for key in keys:
            client.put_object(Bucket=bucket, Key=key, Body=key.encode() * 100)
        resources = {"repository": BackupRepositoryResource(location=str(repo_dir)),
                     "minio": MinioResource(endpoint=stack_env["RAG_S3_ENDPOINT"],
                                            access_key=stack_env["RAG_S3_ACCESS_KEY"],
                                            secret_key=stack_env["RAG_S3_SECRET_KEY"],
                                            region=stack_env["RAG_S3_REGION"], buckets=bucket)}
        result = dg.materialize([minio_defs.minio_backup, minio_defs.minio_backup_verified],
                                partition_key=TODAY, instance=instance, resources=resources)
        assert result.success
        copied = progress_lines(instance, result.run_id, f"minio backup of {bucket}: ")
        # no earlier snapshot: the total is unknown, so done and rate only
        assert [(m["done"], m["total"], m["pct"]) for m in running(copied)] == [
            (str(n), None, None) for n in (1, 2, 3)], copied
        assert copied[-1].startswith("finished, 3 objects in "), copied
        rehashed = progress_lines(instance, result.run_id, "re-hashing the blobs of minio ")
        assert all(found["pct"] for found in running(rehashed)), rehashed
        assert rehashed[-1].startswith("finished, 2.7 kB of 2.7 kB in "), rehashed
    finally:
        for key in keys:
            client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)
