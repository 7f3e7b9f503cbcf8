"""The WAL receiver: a long-running service that streams PostgreSQL's write-ahead log into the
repository, continuously, and keeps the archive's lag (the RPO) bounded.

Why ``pg_receivewal`` through a physical replication slot rather than ``archive_command``:

- nothing to configure or restart on the server (``archive_command`` needs ``archive_mode``,
  a restart, and our code and repository credentials on the database host);
- WAL arrives as it is written, not when a 16 MB segment is full: an idle database's last
  minutes are on our side within seconds;
- the slot makes the server keep every segment the receiver has not yet confirmed, so a
  receiver that is down or restarting loses nothing (bounded by ``max_slot_wal_keep_size``,
  see docs/deployment.md, so the server's disk cannot fill; the lag sensor alerts long before).

What it does, every ``poll_s``:

1. supervises ``pg_receivewal`` (``--no-loop``: every exit is seen here, logged with the tool's
   own words, and restarted with a back-off; it is also restarted every ``run_limit_s``, its
   deadline), which writes into a local spool directory and renames a segment from
   ``.partial`` to its name once it is complete and synced;
2. archives every complete segment of the spool (compressed, with its sha256 and its first
   and last commit times read by ``pg_waldump``), then deletes it from the spool; a segment
   received twice after a restart is a no-op, never a duplicate;
3. archives new timeline history files;
4. forces a segment switch (``pg_switch_wal()``) when WAL has waited unarchived in the current
   segment for ``switch_after_s``: a nearly idle database's segment may take hours to fill, and
   must not hold the RPO hostage (the same role as ``archive_timeout``);
5. writes its status (``postgres_wal/status.json``): the server's position, the archive's end,
   ``caught_up_at`` (the newest time at which the archive held everything the server had
   written), and the slot's state; the lag sensor reads it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg2

from rag_backup.engines.postgres.pitr.wal import (
    DEFAULT_SEGMENT_BYTES,
    WalIndex,
    commit_times,
    format_lsn,
    segno_of,
)
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import InvalidRequest, RagBackupError
from rag_backup.proc import StreamingProcess, tail
from rag_backup.repository import BackupRepository

log = logging.getLogger("rag_backup.wal_receiver")
SEGMENT_FILE = re.compile(r"^[0-9A-F]{24}$")
HISTORY_FILE = re.compile(r"^[0-9A-F]{8}\.history$")
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0  # a pg_receivewal that ran this long resets the back-off


@dataclass
class ReceiverConfig:
    spool: Path
    slot: str = "rag_backup"
    switch_after_s: float = 60.0
    poll_s: float = 1.0
    status_every_s: float = 5.0
    run_limit_s: float = 6 * 3600.0  # pg_receivewal's deadline: restarted at least this often

    @classmethod
    def from_env(cls) -> ReceiverConfig:
        def number(name: str, default: float) -> float:
            raw = os.environ.get(name, "").strip()
            try:
                return float(raw) if raw else default
            except ValueError as exc:
                raise InvalidRequest(f"{name} is {raw!r}, not a number of seconds") from exc

        slot = os.environ.get("RAG_PG_WAL_SLOT", "rag_backup").strip() or "rag_backup"
        if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
            raise InvalidRequest(f"RAG_PG_WAL_SLOT {slot!r}: a replication slot name is lower "
                                 "case letters, digits and underscores")
        return cls(spool=Path(os.environ.get("RAG_PG_WAL_DIR", "").strip()
                              or "/var/lib/rag-backup/wal-spool"),
                   slot=slot, switch_after_s=number("RAG_PG_WAL_SWITCH_AFTER_S", 60.0),
                   poll_s=number("RAG_PG_WAL_POLL_S", 1.0))


@dataclass
class _Observation:
    at: datetime
    lsn: int
    timeline: int | None


@dataclass
class WalReceiver:
    """One receiver for one server into one repository; ``run`` until ``stop`` is set."""

    server: PostgresServer
    repo: BackupRepository
    config: ReceiverConfig
    seg_size: int = DEFAULT_SEGMENT_BYTES
    # The end of the archived WAL per timeline: after a point-in-time restore in place the
    # server continues on a new timeline from an LSN below the old timeline's end.
    ends: dict[int, int] = field(default_factory=dict)
    caught_up_at: datetime | None = None
    server_lsn: int | None = None
    timeline: int | None = None  # the server's current timeline
    last_error: str | None = None
    _child: StreamingProcess | None = None
    _child_started: float = 0.0
    _backoff_s: float = 1.0
    _next_start: float = 0.0
    _pending: collections.deque = field(default_factory=collections.deque)
    _last_switch: float = 0.0
    _last_status: float = 0.0
    _histories: set[str] = field(default_factory=set)
    _slot: dict | None = None
    _switch_refused: bool = False

    # -- setup ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the server can stream WAL, bind the archive to its cluster, make the slot and
        the spool, and read how far the archive goes."""
        conn = self.server.connect("postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW wal_level")
                level = cur.fetchone()[0]
                if level not in ("replica", "logical"):
                    raise InvalidRequest(f"{self.server.describe()} has wal_level={level}: "
                                         "WAL archiving needs 'replica' (the default)")
                cur.execute("SELECT system_identifier::text FROM pg_control_system()")
                system_id = cur.fetchone()[0]
                cur.execute("SELECT setting::bigint FROM pg_settings "
                            "WHERE name = 'wal_segment_size'")
                self.seg_size = int(cur.fetchone()[0])
                self.repo.wal.claim(system_id, self.seg_size)
                cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                            (self.config.slot,))
                if cur.fetchone() is None:
                    cur.execute("SELECT pg_create_physical_replication_slot(%s, true)",
                                (self.config.slot,))
                    log.info(f"created the physical replication slot {self.config.slot!r} on "
                             f"{self.server.describe()}")
        finally:
            conn.close()
        self.config.spool.mkdir(parents=True, exist_ok=True)
        index = WalIndex.read(self.repo)
        for segment in index.segments.values():
            self._archived(segment.timeline, index.end_lsn(segment))

    @property
    def archived_lsn(self) -> int | None:
        """The end of the archived WAL on the server's current timeline."""
        return self.ends.get(self.timeline) if self.timeline is not None else None

    def _archived(self, timeline: int, end: int) -> None:
        self.ends[timeline] = max(self.ends.get(timeline, 0), end)

    def _ready_to_stream(self) -> None:
        """Before each start of pg_receivewal: the slot exists (a server restored from a base
        backup has none: slots are not copied), and the spool holds no unfinished segment of
        another timeline (after a restore in place the server forked; pg_receivewal would
        resume from the abandoned timeline and be refused for ever)."""
        conn = self.server.connect("postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                self.timeline = _server_timeline(cur)
                cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                            (self.config.slot,))
                if cur.fetchone() is None:
                    cur.execute("SELECT pg_create_physical_replication_slot(%s, true)",
                                (self.config.slot,))
                    log.warning(f"the replication slot {self.config.slot!r} was missing on "
                                f"{self.server.describe()} (a new or restored server): created "
                                "it; WAL written before now was not streamed")
        finally:
            conn.close()
        for name in os.listdir(self.config.spool):
            if name.endswith(".partial") and int(name[:8], 16) != self.timeline:
                (self.config.spool / name).unlink()
                log.warning(f"removed {name} from the spool: the server is on timeline "
                            f"{self.timeline} now (restored in place); that timeline's WAL "
                            "is streamed from the slot")

    # -- pg_receivewal -------------------------------------------------------------------
    def _supervise(self) -> None:
        now = time.monotonic()
        child = self._child
        if child is not None and child.proc.poll() is None:
            if now - self._child_started > HEALTHY_AFTER_S:
                self._backoff_s = 1.0  # a later failure starts the back-off anew
            if now - self._child_started > self.config.run_limit_s:
                log.info("restarting pg_receivewal (its run limit)")
                child.proc.send_signal(signal.SIGTERM)
            return
        if child is not None:
            code = child.proc.wait()
            child.abort()
            self.last_error = (f"pg_receivewal exited with code {code}: "
                               f"{child.stderr_text or '(no stderr)'}")
            log.warning(f"{self.last_error}; restarting in {self._backoff_s:.0f} s")
            self._child = None
            self._next_start = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
            return
        if now < self._next_start:
            return
        self._ready_to_stream()
        self._child = StreamingProcess(
            [self.server.tool("pg_receivewal"), f"--directory={self.config.spool}",
             f"--slot={self.config.slot}", "--no-loop", "--no-password",
             "--status-interval=1", f"--dbname={self.server.dsn('replication')}"],
            what=f"pg_receivewal from {self.server.describe()}",
            timeout=self.config.run_limit_s + 300, env=self.server.env(), stdout=False,
            die_with_parent=True)
        self._child_started = now

    # -- archiving -----------------------------------------------------------------------
    def archive_spool(self) -> int:
        """Archive every complete segment and new history file in the spool; returns how many
        segments were archived."""
        spool = self.config.spool
        names = sorted(os.listdir(spool))
        for name in names:
            if HISTORY_FILE.fullmatch(name) and name not in self._histories:
                self.repo.wal.put_history(name, (spool / name).read_bytes())
                self._histories.add(name)
                log.info(f"archived timeline history {name}")
        archived = 0
        waldump = self.server.tool("pg_waldump")
        for name in names:
            if not SEGMENT_FILE.fullmatch(name):
                continue
            times = commit_times(waldump, spool, name, int(name[:8], 16))
            with open(spool / name, "rb") as source:
                segment, new = self.repo.wal.put(
                    name, source, first_commit_at=times.first, last_commit_at=times.last,
                    commits=times.count, restore_points=times.restore_points)
            (spool / name).unlink()
            self._archived(int(name[:8], 16), (segno_of(name, self.seg_size) + 1) * self.seg_size)
            archived += new
            if new:
                log.info(f"archived WAL segment {name} ({segment.stored_size} bytes stored, "
                         f"{segment.commits} commits)")
        return archived

    # -- lag and segment switches --------------------------------------------------------
    def observe(self) -> None:
        """Read the server's position and the slot; advance ``caught_up_at``; force a segment
        switch when WAL has waited too long in a segment that is not full."""
        now = datetime.now(timezone.utc)
        conn = self.server.connect("postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT CASE WHEN pg_is_in_recovery() THEN "
                            "pg_last_wal_receive_lsn() ELSE pg_current_wal_flush_lsn() END")
                self.server_lsn = _lsn(cur.fetchone()[0])
                self.timeline = _server_timeline(cur)
                cur.execute("SELECT active, wal_status, safe_wal_size, "
                            "pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN "
                            "pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END, "
                            "restart_lsn)::bigint FROM pg_replication_slots "
                            "WHERE slot_name = %s", (self.config.slot,))
                row = cur.fetchone()
                self._slot = None if row is None else {
                    "name": self.config.slot, "active": row[0], "wal_status": row[1],
                    "safe_wal_size": row[2], "retained_bytes": row[3]}
                self._track(now)
                self._maybe_switch(cur)
        finally:
            conn.close()

    def _track(self, now: datetime) -> None:
        """Positions are compared on the server's current timeline only: observations of an
        earlier timeline are dropped when it changes (they are not comparable)."""
        if self.server_lsn is None:
            return
        archived = self.archived_lsn or 0
        if self._pending and self._pending[-1].timeline != self.timeline:
            self._pending.clear()
        if not self._pending or self._pending[-1].lsn != self.server_lsn:
            self._pending.append(_Observation(now, self.server_lsn, self.timeline))
        while self._pending and self._pending[0].lsn <= archived:
            self.caught_up_at = self._pending.popleft().at
        if not self._pending:
            self.caught_up_at = now

    def _maybe_switch(self, cur) -> None:
        if not self._pending or self.server_lsn is None or self._switch_refused:
            return
        waited = (datetime.now(timezone.utc) - self._pending[0].at).total_seconds()
        # Complete segments still in the spool: the lag is a backlog, a switch would not help.
        backlog = any(SEGMENT_FILE.fullmatch(n) for n in os.listdir(self.config.spool))
        since_last = time.monotonic() - self._last_switch
        if waited < self.config.switch_after_s or backlog \
                or since_last < self.config.switch_after_s:
            return
        try:
            cur.execute("SELECT pg_switch_wal()")
            self._last_switch = time.monotonic()
            log.info(f"forced a WAL segment switch: WAL waited {waited:.0f} s unarchived")
        except psycopg2.errors.InsufficientPrivilege as exc:
            self._switch_refused = True
            log.warning(f"cannot force WAL segment switches ({tail(str(exc))}): an idle "
                        "database's RPO is then bounded by archive_timeout on the server; "
                        f"grant it: GRANT EXECUTE ON FUNCTION pg_switch_wal() TO "
                        f"{self.server.user}")

    def status(self) -> dict:
        return {
            "updated_at": datetime.now(timezone.utc).isoformat(),
            "server_lsn": format_lsn(self.server_lsn) if self.server_lsn is not None else None,
            "archived_lsn": format_lsn(self.archived_lsn) if self.archived_lsn else None,
            "timeline": self.timeline,
            "caught_up_at": self.caught_up_at.isoformat() if self.caught_up_at else None,
            "receiver": f"{socket.gethostname()} pid {os.getpid()}",
            "server": self.server.describe(),
            "slot": self._slot,
            "last_error": self.last_error,
        }

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> None:
        """One round: supervise, archive, observe, report. A failure is logged and retried
        next round (the store or the repository may be away for a while)."""
        for what, action in (("supervising pg_receivewal", self._supervise),
                             ("archiving the spool", self.archive_spool),
                             ("reading the server's WAL position", self.observe)):
            try:
                action()
            except (RagBackupError, psycopg2.Error, OSError) as exc:
                self.last_error = f"{what}: {tail(str(exc), 1000)}"
                log.warning(self.last_error)
        if time.monotonic() - self._last_status >= self.config.status_every_s:
            with contextlib.suppress(RagBackupError, OSError):
                self.repo.wal.write_status(self.status())
                self._last_status = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.prepare()
                break
            except (RagBackupError, psycopg2.Error, OSError) as exc:
                log.warning(f"WAL receiver not ready: {tail(str(exc), 1000)}; retrying")
                if stop.wait(min(self._backoff_s, MAX_BACKOFF_S)):
                    return
                self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        self._backoff_s = 1.0
        log.info(f"WAL receiver: {self.server.describe()} slot {self.config.slot!r} -> "
                 f"{self.repo.wal.location()} (spool {self.config.spool})")
        while not stop.is_set():
            self.step()
            stop.wait(self.config.poll_s)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop pg_receivewal cleanly, archive what it completed, write a last status."""
        child, self._child = self._child, None
        if child is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout=15)
            except Exception:  # noqa: BLE001 - killed below
                pass
            child.abort()
        with contextlib.suppress(RagBackupError, OSError):
            self.archive_spool()
            self.repo.wal.write_status(self.status())


def _server_timeline(cur) -> int:
    """The timeline the server writes (a standby: the one it replays)."""
    cur.execute("SELECT CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM "
                "pg_control_checkpoint()) ELSE ('x' || substr(pg_walfile_name("
                "pg_current_wal_lsn()), 1, 8))::bit(32)::int END")
    return int(cur.fetchone()[0])


def _lsn(text: str | None) -> int | None:
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def serve() -> int:
    """``python -m rag_backup wal-receiver``: run until SIGTERM or SIGINT."""
    from rag_backup.settings import postgres_from_env, repository_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    receiver = WalReceiver(postgres_from_env(), repository_from_env(), ReceiverConfig.from_env())
    receiver.run(stop)
    return 0
