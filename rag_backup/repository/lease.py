"""One writer per store: a lease in the repository.

Dagster's pools keep two Dagster runs off one store, but they do not see the command line (nor
a second Dagster instance). Every writer of a store (a backup, retention, an in-place restore)
holds the store's lease while it works: ``leases/<store>.json`` with the holder, its purpose,
when it took the lease and when the lease expires. Taking it is one conditional write (absent,
or expired and unchanged since read), so two writers can never both hold it; a writer that finds
it held is refused with ``StoreBusy`` naming the holder. The holder renews it in the background
(every third of its time to live); a holder that crashed stops renewing, and its lease expires
after ``ttl`` (default 10 minutes, ``RAG_BACKUP_LEASE_TTL_S``), at once if its process is gone
from this host; the same holder retrying in the same process takes it back. Readers (listing,
verification, scratch restores) take none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from rag_backup.errors import InvalidRequest, StoreBusy
from rag_backup.repository.backends import Backend, cleanup_after
from rag_backup.repository.manifest import _aware, utcnow

LEASE_PREFIX = "leases"
# Tokens of the leases this process released, also those whose record it could not delete.
_RELEASED: set[str] = set()
DEFAULT_TTL = timedelta(minutes=10)
log = logging.getLogger(__name__)


def default_ttl() -> timedelta:
    raw = os.environ.get("RAG_BACKUP_LEASE_TTL_S", "").strip()
    if not raw:
        return DEFAULT_TTL
    try:
        seconds = float(raw)
    except ValueError as exc:
        raise InvalidRequest(f"RAG_BACKUP_LEASE_TTL_S is {raw!r}, not a number of seconds") \
            from exc
    if seconds < 1:
        raise InvalidRequest(f"RAG_BACKUP_LEASE_TTL_S is {raw!r}: at least 1 second")
    return timedelta(seconds=seconds)


def holder_name(what: str) -> str:
    """Who holds a lease, for the refusal an operator reads: what, host and pid."""
    return f"{what} on {socket.gethostname()} (pid {os.getpid()})"


@dataclass(frozen=True)
class LeaseRecord:
    store: str
    holder: str
    purpose: str
    token: str
    acquired_at: datetime
    expires_at: datetime
    host: str = ""
    pid: int = 0

    def gone_or_ours(self, holder: str) -> bool:
        """Its holder process is gone (same host, no such pid), or it is this very holder
        again (a retry of the same run in the same process): it may be taken at once."""
        if self.host != socket.gethostname() or not self.pid:
            return False
        if self.pid == os.getpid():
            return self.holder == holder
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["acquired_at"] = self.acquired_at.isoformat()
        doc["expires_at"] = self.expires_at.isoformat()
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord | None:
        """The record, or ``None`` if it cannot be read (treated as expired: a lease nobody
        can read protects nothing and must not block the store for ever)."""
        try:
            doc = json.loads(data)
            return cls(doc["store"], doc["holder"], doc["purpose"], doc["token"],
                       _aware(doc["acquired_at"], "acquired_at"),
                       _aware(doc["expires_at"], "expires_at"), str(doc.get("host", "")),
                       int(doc.get("pid", 0)))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return (f"{self.holder} holds the {self.store} lease for {self.purpose} since "
                f"{self.acquired_at:%Y-%m-%d %H:%M:%S} UTC (until "
                f"{self.expires_at:%H:%M:%S} UTC unless renewed)")


class Lease:
    """A held lease, renewed in the background until ``release``."""

    def __init__(self, backend: Backend, record: LeaseRecord, raw: bytes,
                 ttl: timedelta) -> None:
        self.backend, self.record, self._raw, self.ttl = backend, record, raw, ttl
        self._stop = threading.Event()
        self.lost: str | None = None  # why the lease was lost while held (renewal refused)
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease-{record.store}")
        self._thread.start()

    @property
    def key(self) -> str:
        return f"{LEASE_PREFIX}/{self.record.store}.json"

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl.total_seconds() / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - retried at the next tick; logged
                log.warning(f"renewing the {self.record.store} lease failed: {exc}")

    def renew(self) -> None:
        renewed = dataclasses.replace(self.record, expires_at=utcnow() + self.ttl)
        raw = renewed.to_json()
        if self.backend.put_if(self.key, raw, self._raw):
            self.record, self._raw = renewed, raw
        else:
            self.lost = "another writer took the lease (it had expired: this holder stalled)"
            self._stop.set()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # Whatever the delete below does (the repository may be away), this process no longer
        # uses the lease: its next writer of the store takes it over at once.
        _RELEASED.add(self.record.token)
        if self.lost is None:
            self.backend.delete_if(self.key, self._raw)


def acquire(backend: Backend, store: str, holder: str, purpose: str,
            ttl: timedelta | None = None) -> Lease:
    """Take the lease of ``store`` or raise ``StoreBusy`` naming its holder."""
    ttl = ttl or default_ttl()
    key = f"{LEASE_PREFIX}/{store}.json"
    now = utcnow()
    record = LeaseRecord(store, holder, purpose, uuid.uuid4().hex, now, now + ttl,
                         socket.gethostname(), os.getpid())
    raw = record.to_json()
    current = backend.read_bytes(key)
    if current is None:
        if backend.put_if(key, raw, None):
            return Lease(backend, record, raw, ttl)
        current = backend.read_bytes(key)
    held = LeaseRecord.from_json(current) if current is not None else None
    if held is not None and held.expires_at > now and not held.gone_or_ours(holder) \
            and held.token not in _RELEASED:
        raise StoreBusy(f"{store} is busy: {held.describe()}; try again when it is done "
                        f"(a holder that died releases the lease when it expires)")
    # Absent now, expired or unreadable: replace exactly what we read, nobody else's.
    if backend.put_if(key, raw, current):
        if held is not None and held.holder != holder:
            log.warning(f"took over the {store} lease of {held.holder} (expired, or its "
                        "process is gone)")
        return Lease(backend, record, raw, ttl)
    again = LeaseRecord.from_json(backend.read_bytes(key) or b"")
    raise StoreBusy(f"{store} is busy: "
                    f"{again.describe() if again else 'another writer took its lease just now'}")


@contextmanager
def held(backend: Backend, store: str, holder: str, purpose: str,
         ttl: timedelta | None = None) -> Iterator[Lease]:
    """Hold ``store``'s lease for the block; released afterwards, whatever happens."""
    lease = acquire(backend, store, holder, purpose, ttl)
    try:
        yield lease
    except BaseException as exc:
        # The block's error is the news: a repository that went away cannot take the lease
        # back either; it expires, or this holder's retry takes it over.
        cleanup_after(exc, f"releasing the {store} lease", lease.release)
        raise
    lease.release()


def current(backend: Backend, store: str) -> LeaseRecord | None:
    """The lease of ``store`` if one is held now (not expired)."""
    raw = backend.read_bytes(f"{LEASE_PREFIX}/{store}.json")
    record = LeaseRecord.from_json(raw) if raw is not None else None
    return record if record is not None and record.expires_at > utcnow() else None
