"""Recovery across stores, without Dagster: every store back to one point in time, and the
restore drill.

- ``plan``: for a point in time (default: now), each store's newest verified backup taken at
  or before it, and how far apart those backups are (``spread_s``).
- ``restore_all``: the chosen backups restored, each store through its engine, into scratch
  targets named with one timestamp (``Scratch``) or over production (``Production``, with each
  store's confirmation, every one checked before anything is restored). The stores are
  restored all at once (each in its own thread: the work is in the stores' servers and in
  subprocesses, so the run takes about as long as its slowest store) or, with
  ``concurrent=False``, one after the other.
- ``drill``: the newest verified backup of every store restored into scratch targets, each
  store on its own (one failure does not stop the others; all at once by default), the
  cross-store consistency rules
  (``rag_backup.consistency``) evaluated on what was restored, every scratch target removed
  (also when something failed); a ``DrillResult`` says what happened.

A store takes part through one entry in the run's table of ``StoreRecovery`` objects
(``PostgresRecovery``, ``RedisRecovery``, ``MinioRecovery``, ``MilvusRecovery``), built from the
engines' connection objects: adding a store means adding an entry, not editing the flow.
"""

from __future__ import annotations

import contextvars
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from rag_backup import consistency, progress
from rag_backup.engines import milvus as milvus_engine
from rag_backup.engines import minio as minio_engine
from rag_backup.engines import postgres as pg_engine
from rag_backup.engines import redis as redis_engine
from rag_backup.engines.comparison import Comparison
from rag_backup.engines.milvus import MilvusServer
from rag_backup.engines.minio import S3Endpoint
from rag_backup.engines.postgres import PostgresServer, pitr
from rag_backup.engines.redis import RedisServer
from rag_backup.errors import BackupNotFound, ConfirmationRequired, InvalidRequest, RagBackupError
from rag_backup.repository import BackupRecord, BackupRepository
from rag_backup.repository.manifest import utcnow

Log = Callable[[str], None]
STORES = ("postgres", "redis", "minio", "milvus")
R = TypeVar("R")


def _quiet(_: str) -> None:
    pass


def new_stamp() -> str:
    """The timestamp in every scratch target name of one run."""
    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")


# -- where a restore goes ------------------------------------------------------------------

@dataclass(frozen=True)
class Scratch:
    """Scratch targets of one run, every name carrying ``label`` and ``stamp``: databases
    ``<db>_<label>_<stamp>``, buckets ``<bucket>-<label>-<stamp>``, collections
    ``<name>_<label>_<stamp>``."""

    label: str = "pit"
    stamp: str = field(default_factory=new_stamp)


@dataclass(frozen=True)
class Production:
    """Over the configured store itself; ``confirm`` must name what is replaced, exactly as
    the store asks (see each entry's ``check_confirmation``)."""

    confirm: str = ""


Into = Scratch | Production


@dataclass
class Restored:
    """What one store's restore produced, and what it compared with the backup."""

    store: str
    partition_key: str
    backup_id: str
    recovery_point: datetime
    target: str
    seconds: float
    comparison: Comparison
    counts: dict[str, int] = field(default_factory=dict)
    handle: Any = None  # source name -> restored name (drills: where the rules look)

    @property
    def matches_manifest(self) -> bool:
        return self.comparison.matches


def _restored(store: str, record: BackupRecord, target: str, started: float,
              comparison: Comparison, counts: dict[str, int], handle: Any = None) -> Restored:
    return Restored(store, record.partition_key, record.backup_id, record.manifest.started_at,
                    target, time.monotonic() - started, comparison, counts, handle)


def _require(into: Into, expected: str, refusal: str) -> None:
    """Production restores need ``into.confirm == expected``; ``refusal`` says what it does."""
    if isinstance(into, Production) and into.confirm != expected:
        raise ConfirmationRequired(f"{refusal} to {expected!r}")


class StoreRecovery(Protocol):
    """What recovery needs of one store. Entries hold the engine's connection object and the
    run's options for that store, never a Dagster resource."""

    store: ClassVar[str]

    def targets(self, record: BackupRecord, into: Into) -> dict[str, str]:
        """Source name -> what a restore into ``into`` creates or replaces (scratch targets:
        exactly what ``remove`` removes)."""
        ...

    def check_confirmation(self, record: BackupRecord, into: Into) -> None:
        """Raise ``ConfirmationRequired`` for a production restore without the confirmation."""
        ...

    def restore(self, repo: BackupRepository, record: BackupRecord, into: Into, *,
                accept_differences: bool, cleanup: ExitStack, log: Log) -> Restored:
        """Restore ``record``; a private target that lives only for the run is entered on
        ``cleanup``."""
        ...

    def remove(self, repo: BackupRepository, record: BackupRecord, scratch: Scratch) -> None:
        """Remove the scratch targets of ``record`` in ``scratch`` that exist."""
        ...

    def rules_data(self, restored: Restored) -> dict[str, Any]:
        """Fields of ``consistency.RestoredData`` for what was restored (``restored.handle``
        is None when the restore failed)."""
        ...


# -- comparisons of the stores whose engines report counts only ----------------------------

def replay_comparison(report: redis_engine.ReplayReport) -> Comparison:
    """A Redis replay: every key of each db of the backup accounted for (restored, already
    there, or expired since)."""
    comparison = Comparison()
    for db in report.dbs:
        if db.skipped_pattern:
            comparison.skip(f"db {db.db}", "only keys matching a pattern were restored")
            continue
        comparison.check("dbs", f"db {db.db}", "keys (restored, kept or expired)",
                         db.in_backup, db.restored + db.skipped_existing + db.skipped_expired)
    return comparison


def placed_comparison(record: BackupRecord, placed: redis_engine.PlaceReport) -> Comparison:
    """A placed RDB: its bytes are the backup's (``place_rdb`` unpacks it against the
    manifest's size and sha256, then ``redis-check-rdb`` reads every key); its key count
    against the fingerprint."""
    comparison = Comparison()
    comparison.count("rdb_bytes_sha256")
    expected = redis_engine.fingerprint_of(record).keys
    comparison.check("rdb", f"RDB {placed.path}", "keys", expected, placed.keys)
    return comparison


def milvus_comparison(report: milvus_engine.RestoreReport) -> Comparison:
    """Rows of every collection and of each of its partitions against the manifest, and the
    backup's probe searches re-run on the restored copy (same nearest id, or the source's nearest
    row in the copy at its distance; collections without rows have none)."""
    comparison = Comparison()
    for c in report.collections:
        item = f"collection {c.source}"
        comparison.check("collections", item, "rows", c.rows_expected, c.rows)
        for label, (expected, actual) in sorted(c.partitions.items()):
            comparison.check("partitions", f"{item} partition {label}", "rows",
                             expected, actual)
        if c.probes and c.probes_top1 == c.probes:
            comparison.count("probe_searches", c.probes)
        elif c.probes:  # the engine let it pass: new ids, or a backup taken during writes
            comparison.skip(f"{item} probe searches", f"{c.probes - c.probes_top1} of "
                            f"{c.probes} return another nearest id, expected for new ids or a "
                            "backup taken during writes")
    return comparison


def failed_comparison(exc: Exception) -> Comparison:
    """What a failed restore compared: the comparison its error carries (a restore that
    differs), else nothing (not run)."""
    report = getattr(exc, "report", None)
    comparison = getattr(report, "comparison", None)
    if isinstance(comparison, Comparison):
        return comparison
    failed = Comparison()
    failed.skip("restore", f"the restore failed: {exc}")
    return failed


# -- the stores ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PostgresRecovery:
    """Every chosen database of the backup (default: all): over itself (production, confirmed
    with the comma-separated database list) or into ``<db>_<label>_<stamp>``.

    With ``point`` (a restore to a point in time), the databases come from a point-in-time
    recovery to exactly that time when the WAL archive reaches it (the logical backup's
    fidelity: each database is dumped from the recovered copy and restored and compared by the
    same engine); otherwise from the chosen daily dump, and the log says why."""

    store: ClassVar[str] = "postgres"
    server: PostgresServer
    timeout_s: float = 6 * 3600
    databases: Sequence[str] | None = None
    point: datetime | None = None

    def targets(self, record: BackupRecord, into: Into) -> dict[str, str]:
        available = sorted(pg_engine.fingerprint_of(record).databases)
        chosen = list(self.databases or available)
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise InvalidRequest(f"postgres backup {record.partition_key} has no database(s) "
                                 f"{unknown}; it has {available}")
        if isinstance(into, Production):
            return {db: db for db in chosen}
        return {db: f"{db[:40]}_{into.label}_{into.stamp}" for db in chosen}

    def check_confirmation(self, record: BackupRecord, into: Into) -> None:
        targets = self.targets(record, into)
        _require(into, ",".join(targets), f"restoring PostgreSQL databases {list(targets)} in "
                                          "place replaces them: set postgres_confirm")

    def restore(self, repo: BackupRepository, record: BackupRecord, into: Into, *,
                accept_differences: bool, cleanup: ExitStack, log: Log) -> Restored:
        self.check_confirmation(record, into)
        targets = self.targets(record, into)
        production = isinstance(into, Production)
        started, rows, comparison = time.monotonic(), 0, Comparison()
        chosen = self._pitr_plan(repo, log)
        if chosen is not None:
            report = pitr.restore(repo, chosen, pitr.Into(
                "databases", databases=tuple(targets), target_server=self.server,
                target_names=dict(targets), confirm=",".join(targets) if production else ""),
                self.server, timeout_s=self.timeout_s, log=log)
            for db, found in report.comparisons.items():
                comparison.merge(found, prefix=f"{db}: ")
            return Restored(self.store, f"pitr from {chosen.base.partition_key}",
                            chosen.base.backup_id, report.reached_at or chosen.target.time,
                            ", ".join(targets.values()), time.monotonic() - started,
                            comparison, {"rows": report.rows, "databases": len(targets),
                                         "wal_segments": report.wal_segments}, handle=targets)
        for db, target in targets.items():
            report = pg_engine.restore(repo, record, self.server, source_database=db,
                                       target_database=target,
                                       confirm=target if production else "",
                                       timeout_s=self.timeout_s,
                                       accept_differences=accept_differences, log=log)
            rows += report.rows
            comparison.merge(report.comparison, prefix=f"{db}: ")
        return _restored(self.store, record, ", ".join(targets.values()), started, comparison,
                         {"rows": rows, "databases": len(targets)}, handle=targets)

    def _pitr_plan(self, repo: BackupRepository, log: Log) -> pitr.PitrPlan | None:
        """The point-in-time recovery to ``point``, or None (no point, or not reachable)."""
        if self.point is None:
            return None
        try:
            return pitr.plan(repo, pitr.PitrTarget(time=self.point))
        except RagBackupError as exc:
            log(f"postgres: point-in-time recovery cannot reach {self.point.isoformat()} ({exc});"
                " restoring the daily dump chosen for it instead")
            return None

    def remove(self, repo: BackupRepository, record: BackupRecord, scratch: Scratch) -> None:
        for target in self.targets(record, scratch).values():
            pg_engine.drop_database(self.server, target)

    def rules_data(self, restored: Restored) -> dict[str, Any]:
        return {"postgres": self.server, "databases": dict(restored.handle or {})}


@dataclass(frozen=True)
class RedisRecovery:
    """Production: replay into the server, flushing each db of the backup first (confirmed
    with ``host:port``). Scratch with ``scratch_dir``: the RDB placed and checked in a new
    directory ``redis-<stamp>-<backup id>`` under it, ready for a redis-server to start on.
    Scratch without: replayed into a private, empty redis-server that lives as long as the
    run's ``cleanup`` (drills)."""

    store: ClassVar[str] = "redis"
    server: RedisServer
    timeout_s: float = 3600
    scratch_dir: str | None = None

    def _name(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def targets(self, record: BackupRecord, into: Into) -> dict[str, str]:
        if isinstance(into, Production):
            return {"server": self._name()}
        if self.scratch_dir:
            return {"rdb": str(Path(self.scratch_dir) / f"redis-{into.stamp}-{record.backup_id}")}
        return {}  # a private server, stopped by the run's cleanup

    def check_confirmation(self, record: BackupRecord, into: Into) -> None:
        name = self._name()
        _require(into, name, f"restoring Redis in place flushes every db of the backup on "
                             f"{name}: set redis_confirm")

    def restore(self, repo: BackupRepository, record: BackupRecord, into: Into, *,
                accept_differences: bool, cleanup: ExitStack, log: Log) -> Restored:
        self.check_confirmation(record, into)
        if isinstance(into, Production):
            started, name = time.monotonic(), self._name()
            report = redis_engine.replay(repo, record, self.server, flush=True, confirm=name,
                                         timeout_s=self.timeout_s, log=log)
            return _restored(self.store, record, name, started, replay_comparison(report),
                             {"keys": report.restored})
        if not self.scratch_dir:
            target = cleanup.enter_context(redis_engine.scratch_target(timeout_s=self.timeout_s))
            started = time.monotonic()
            report = redis_engine.replay(repo, record, target, timeout_s=self.timeout_s, log=log)
            return _restored(self.store, record, "private redis-server", started,
                             replay_comparison(report), {"keys": report.restored}, handle=target)
        started = time.monotonic()
        directory = Path(self.targets(record, into)["rdb"])
        directory.mkdir(parents=True)
        placed = redis_engine.place_rdb(repo, record, str(directory), timeout_s=self.timeout_s)
        return _restored(self.store, record, placed.path, started,
                         placed_comparison(record, placed), {"keys": placed.keys})

    def remove(self, repo: BackupRepository, record: BackupRecord, scratch: Scratch) -> None:
        for directory in self.targets(record, scratch).values():
            if Path(directory).exists():
                shutil.rmtree(directory)

    def rules_data(self, restored: Restored) -> dict[str, Any]:
        return {}  # no cross-store rule reads Redis


@dataclass(frozen=True)
class MinioRecovery:
    """Production: every bucket of the snapshot back to its state, objects added since
    removed (confirmed with the comma-separated bucket list). Scratch: each bucket into a new
    bucket ``<bucket>-<label>-<stamp>``."""

    store: ClassVar[str] = "minio"
    endpoint: S3Endpoint
    workers: int = minio_engine.DEFAULT_WORKERS

    def targets(self, record: BackupRecord, into: Into) -> dict[str, str]:
        return {b: b if isinstance(into, Production) else f"{b[:40]}-{into.label}-{into.stamp}"
                for b in minio_engine.snapshot_buckets(record)}

    def check_confirmation(self, record: BackupRecord, into: Into) -> None:
        targets = self.targets(record, into)
        _require(into, ",".join(targets), f"restoring MinIO buckets {list(targets)} in place "
                                          "removes objects added since the snapshot: set "
                                          "minio_confirm")

    def restore(self, repo: BackupRepository, record: BackupRecord, into: Into, *,
                accept_differences: bool, cleanup: ExitStack, log: Log) -> Restored:
        self.check_confirmation(record, into)
        started, production = time.monotonic(), isinstance(into, Production)
        targets = self.targets(record, into)
        comparison, objects = Comparison(), 0
        for bucket, target in targets.items():
            report = minio_engine.restore(
                repo, record, self.endpoint, buckets=[bucket], target_bucket=target,
                remove_extra=production, confirm=target if production else "",
                workers=self.workers, accept_differences=accept_differences, log=log)
            comparison.merge(report.comparison)  # items name the target bucket already
            objects += report.total("in_snapshot")
        return _restored(self.store, record, ", ".join(targets.values()), started, comparison,
                         {"objects": objects, "buckets": len(targets)}, handle=targets)

    def remove(self, repo: BackupRepository, record: BackupRecord, scratch: Scratch) -> None:
        for bucket in self.targets(record, scratch).values():
            minio_engine.remove_bucket(self.endpoint, bucket, repo=repo)

    def rules_data(self, restored: Restored) -> dict[str, Any]:
        return {"s3": self.endpoint, "buckets": dict(restored.handle or {})}


@dataclass(frozen=True)
class MilvusRecovery:
    """Production: every collection of the backup over itself (confirmed with the
    comma-separated collection list). Scratch: ``<name>_<label>_<stamp>``."""

    store: ClassVar[str] = "milvus"
    server: MilvusServer
    batch_rows: int = 0

    def targets(self, record: BackupRecord, into: Into) -> dict[str, str]:
        return {name: name if isinstance(into, Production)
                else f"{name[:180]}_{into.label}_{into.stamp}"
                for name in sorted(milvus_engine.fingerprint_of(record).collections)}

    def check_confirmation(self, record: BackupRecord, into: Into) -> None:
        targets = self.targets(record, into)
        _require(into, ",".join(targets), f"restoring Milvus collections {list(targets)} in "
                                          "place drops them: set milvus_confirm")

    def restore(self, repo: BackupRepository, record: BackupRecord, into: Into, *,
                accept_differences: bool, cleanup: ExitStack, log: Log) -> Restored:
        self.check_confirmation(record, into)
        started, targets = time.monotonic(), self.targets(record, into)
        report = milvus_engine.restore(
            repo, record, self.server, targets=targets,
            confirm=list(targets) if isinstance(into, Production) else (),
            batch_rows=self.batch_rows, log=log)
        return _restored(self.store, record, ", ".join(targets.values()), started,
                         milvus_comparison(report),
                         {"rows": report.rows, "collections": len(targets)}, handle=targets)

    def remove(self, repo: BackupRepository, record: BackupRecord, scratch: Scratch) -> None:
        milvus_engine.drop_collections(self.server,
                                       list(self.targets(record, scratch).values()))

    def rules_data(self, restored: Restored) -> dict[str, Any]:
        return {"milvus": self.server, "collections": dict(restored.handle or {})}


# -- choosing one recovery point -----------------------------------------------------------

def parse_point(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise); empty: now."""
    if not text:
        return utcnow()
    try:
        point = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequest(f"point_in_time {text!r} is not an ISO 8601 time, e.g. "
                             "2026-11-24T09:30:00Z") from exc
    return point if point.tzinfo else point.replace(tzinfo=timezone.utc)


def choose(repo: BackupRepository, stores: Sequence[str], point: datetime
           ) -> dict[str, BackupRecord]:
    """Each store's newest verified backup taken at or before ``point``; an error naming the
    stores that have none."""
    chosen = {store: repo.latest_verified(store, at_or_before=point) for store in stores}
    missing = [store for store, record in chosen.items() if record is None]
    if missing:
        raise BackupNotFound(f"no verified backup at or before {point:%Y-%m-%d %H:%M} UTC for "
                             f"{', '.join(missing)}; choose a later point in time")
    return chosen  # type: ignore[return-value]


def spread_s(records: Mapping[str, BackupRecord]) -> float:
    """How far apart (seconds) the recovery points of the chosen backups are."""
    points = [r.manifest.started_at for r in records.values()]
    return (max(points) - min(points)).total_seconds() if points else 0.0


@dataclass(frozen=True)
class Plan:
    """The backups chosen for one point in time."""

    point: datetime
    chosen: dict[str, BackupRecord]

    @property
    def spread_s(self) -> float:
        return spread_s(self.chosen)


def plan(repo: BackupRepository, stores: Sequence[str] = (), point: datetime | str = ""
         ) -> Plan:
    """Each of ``stores`` (empty: all) at ``point`` (a time or ISO 8601 text; empty: now)."""
    stores = list(stores) or list(STORES)
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        raise InvalidRequest(f"unknown store(s) {unknown}; known: {sorted(STORES)}")
    when = point if isinstance(point, datetime) else parse_point(point)
    return Plan(when, choose(repo, stores, when))


# -- restoring everything ------------------------------------------------------------------

def _entries(stores: Sequence[StoreRecovery], wanted: Sequence[str]) -> dict[str, StoreRecovery]:
    entries = {s.store: s for s in stores}
    missing = sorted(set(wanted) - set(entries))
    if missing:
        raise InvalidRequest(f"no connection given for store(s) {missing}")
    return entries


class StoresFailed(RagBackupError):
    """Several stores of one run failed; ``errors`` holds each one's error, ``restored`` what
    the other stores restored meanwhile."""

    def __init__(self, errors: Mapping[str, Exception], restored: Sequence[Restored]) -> None:
        self.errors, self.restored = dict(errors), list(restored)
        super().__init__("; ".join(f"{store}: {exc}" for store, exc in self.errors.items())
                         + _restored_meanwhile(self.restored))


def _restored_meanwhile(restored: Sequence[Restored]) -> str:
    if not restored:
        return " (no store was restored)"
    return " (restored meanwhile: " + ", ".join(f"{r.store} into {r.target}"
                                                  for r in restored) + ")"


STOP_GRACE_S = 120.0  # after an interrupt, how long the stores get to stop and clean up


def each_store(stores: Sequence[str], work: Callable[[str, ExitStack, Log], R],
               cleanup: ExitStack, log: Log, *, concurrent: bool = True
               ) -> tuple[dict[str, R], dict[str, Exception]]:
    """``work(store, its_cleanup, its_log)`` for every store: all at once, each in its own
    thread (in a copy of the caller's context, so progress is tracked), or one after the
    other, stopping at the first failure. Returns the results and the errors by store, both
    in the order of ``stores``. Each store's own ``ExitStack`` (what lives as long as the run:
    private targets, removals) is handed to ``cleanup`` whatever happened. A thread's log
    lines reach ``log`` on the calling thread (a Dagster run's log is not for other threads),
    each starting with its store.

    Interrupted (a run terminated from the UI, Ctrl-C: any ``BaseException`` in the calling
    thread), the stores still restoring are told to stop (``progress.Stopped`` at their next
    checkpoint: their tools killed, their staging copies dropped) and given
    ``STOP_GRACE_S`` to do so; then the interrupt goes on. The threads are daemons: one that
    does not stop in time does not keep the process alive."""
    done: dict[str, R] = {}
    failed: dict[str, Exception] = {}
    if not concurrent or len(stores) < 2:
        for store in stores:
            try:
                done[store] = work(store, cleanup.enter_context(ExitStack()), log)
            except Exception as exc:  # noqa: BLE001 - the caller decides what a failure means
                failed[store] = exc
                break
        return done, failed
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    handing, stop = threading.Lock(), threading.Event()
    outcomes: dict[str, tuple[bool, Any]] = {}

    ended = threading.Semaphore(0)  # released by each store's thread as its last act

    def run(store: str) -> None:
        progress.stop_when(stop)
        own = ExitStack()
        try:
            outcomes[store] = (True, work(store, own, lambda line: lines.put(
                line if line.startswith(f"{store}:") else f"{store}: {line}")))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            outcomes[store] = (False, exc)
        finally:
            with handing:
                cleanup.push(own)
            ended.release()

    def forward() -> None:
        while not lines.empty():
            log(lines.get())

    waiting = len(stores)

    def wait(until: float) -> None:
        # Not Thread.join: interrupted, it may mark a live thread as ended (CPython 3.11)
        nonlocal waiting
        while waiting and time.monotonic() < until:
            if ended.acquire(timeout=0.2):
                waiting -= 1
            forward()
        forward()

    for store in stores:
        threading.Thread(target=contextvars.copy_context().run, args=(run, store),
                         name=f"restore-{store}", daemon=True).start()
    try:
        wait(float("inf"))
    except BaseException:
        stop.set()
        running = [store for store in stores if store not in outcomes]
        if running:
            log(f"interrupted: stopping the restores of {', '.join(running)} (up to "
                f"{STOP_GRACE_S:.0f} s for them to clean up)")
            wait(time.monotonic() + STOP_GRACE_S)
        raise
    for store in stores:
        ok, value = outcomes[store]
        if ok:
            done[store] = value
        elif isinstance(value, Exception):
            failed[store] = value
        else:
            raise value  # not a store's failure (an interrupt of its own)
    return done, failed


def restore_all(repo: BackupRepository, stores: Sequence[StoreRecovery],
                chosen: Mapping[str, BackupRecord], *, production: bool = False,
                confirm: Mapping[str, str] | None = None, accept_differences: bool = False,
                stamp: str | None = None, concurrent: bool = True, log: Log = _quiet
                ) -> list[Restored]:
    """Restore each chosen backup: into scratch targets named with one timestamp (``stamp``,
    default now) or, with ``production``, over the stores themselves; every store's
    confirmation (``confirm[store]``) is checked before anything is restored.
    All stores at once (``concurrent``), or one after the other, stopping at the first failure.
    A restore that fails raises once the others ended (they stay restored, and the log says
    where): its own error when one store failed, ``StoresFailed`` when several did. One that
    differs from its backup raises unless ``accept_differences`` (PostgreSQL, MinIO), else it
    is returned with ``matches_manifest`` false."""
    entries = _entries(stores, list(chosen))
    scratch, confirm = Scratch("pit", stamp or new_stamp()), confirm or {}
    into: dict[str, Into] = {store: Production(confirm.get(store, "")) if production
                             else scratch for store in chosen}
    for store, record in chosen.items():
        entries[store].check_confirmation(record, into[store])

    def restore(store: str, cleanup: ExitStack, store_log: Log) -> Restored:
        return entries[store].restore(repo, chosen[store], into[store],
                                      accept_differences=accept_differences, cleanup=cleanup,
                                      log=store_log)

    with ExitStack() as cleanup:
        done, failed = each_store(list(chosen), restore, cleanup, log, concurrent=concurrent)
        restored = list(done.values())
        if len(failed) > 1:
            raise StoresFailed(failed, restored)
        if failed:
            [(store, exc)] = failed.items()
            if restored or len(chosen) > 1:
                log(f"{store}: the restore failed: {exc}{_restored_meanwhile(restored)}")
            raise exc
        return restored


# -- the drill -----------------------------------------------------------------------------

@dataclass
class DrillResult:
    """What a drill did: each store's restore (a failed one with what its error carried and
    the time until it failed), why stores failed, the rules' results and every problem."""

    chosen: dict[str, BackupRecord]
    restored: dict[str, Restored]
    errors: dict[str, str]
    rules: list[consistency.RuleResult]
    problems: list[str]
    wall_s: float = 0.0  # from the first restore's start to the last one's end

    @property
    def spread_s(self) -> float:
        return spread_s(self.chosen)

    @property
    def total_restore_s(self) -> float:
        return sum(r.seconds for r in self.restored.values())

    @property
    def consistent(self) -> bool:
        return not self.problems


def _removing(problems: list[str], what: str, remove: Callable[..., None], *args: Any
              ) -> Callable[[], None]:
    def run() -> None:
        try:
            remove(*args)
        except Exception as exc:  # noqa: BLE001 - every problem is reported, the rest cleaned
            problems.append(f"{what} could not be removed (remove them by hand if they "
                            f"exist): {exc}")
    return run


def drill(repo: BackupRepository, stores: Sequence[StoreRecovery],
          rules: Sequence[Any], *, point: datetime | None = None, stamp: str | None = None,
          concurrent: bool = True, log: Log = _quiet, log_error: Log | None = None
          ) -> DrillResult:
    """Restore the newest verified backup (at ``point``, default now) of every store into
    scratch targets labelled ``drill``, each store on its own (all at once with
    ``concurrent``; its removal registered before its restore, so a half-done restore is
    removed too), evaluate ``rules`` on what was restored, and remove every scratch target,
    also when something failed."""
    log_error = log_error or log
    entries = {entry.store: entry for entry in stores}
    chosen = choose(repo, list(entries), point or utcnow())
    scratch = Scratch("drill", stamp or new_stamp())
    problems: list[str] = []

    def restore(store: str, cleanup: ExitStack, store_log: Log) -> tuple[Restored, str]:
        entry, record = entries[store], chosen[store]
        started, planned = time.monotonic(), {}
        try:
            planned = entry.targets(record, scratch)
            if planned:
                cleanup.callback(_removing(problems, f"{store} scratch target(s) "
                                           f"{', '.join(planned.values())}", entry.remove,
                                           repo, record, scratch))
            restored = entry.restore(repo, record, scratch, accept_differences=False,
                                     cleanup=cleanup, log=store_log)
            error = ""
        except Exception as exc:  # noqa: BLE001 - the other stores are still drilled
            error = str(exc)
            restored = Restored(store, record.partition_key, record.backup_id,
                                record.manifest.started_at, ", ".join(planned.values()), 0.0,
                                failed_comparison(exc))
        restored.seconds = restored.seconds or time.monotonic() - started
        return restored, error

    started = time.monotonic()
    with ExitStack() as cleanup:
        done, _ = each_store(list(entries), restore, cleanup, log, concurrent=concurrent)
        wall_s = time.monotonic() - started
        restored = {store: r for store, (r, _) in done.items()}
        errors = {store: error for store, (_, error) in done.items() if error}
        for store, error in errors.items():
            log_error(f"{store}: the restore failed: {error}")
            problems.append(f"{store}: the restore failed: {error}")
        fields: dict[str, Any] = {}
        for entry in stores:
            fields.update(entry.rules_data(restored[entry.store]))
        data = consistency.RestoredData(
            **fields, not_restored={store: f"its restore failed: see {store}_not_compared"
                                    for store in errors})
        results = consistency.evaluate(rules, data)
    for r in restored.values():
        if r.store not in errors and not r.matches_manifest:
            problems.append(f"{r.store}: the restored data differ from the backup: "
                            f"{r.comparison.summary()}")
    problems += [r.summary() for r in results if not r.passed]
    return DrillResult(chosen, restored, errors, results, problems, wall_s)
