"""The backup repository: atomic commit, listing, verification state, deletion.

Layout (identical on every backend)::

    <store>/<partition_key>/manifest.json       the commit record, written last
    <store>/<partition_key>/verification.json   the latest verification of that backup
    <store>/<partition_key>/tombstone.json      left by retention when it deleted the backup
    <store>/<partition_key>/<backup_id>/...     the artifact files
    <store>/<partition_key>/<backup_id>.pending.json   while a run writes that backup: the
                                                run, its start, the backup it will replace

A partition without a manifest has no backup, whatever else lies there. A partition whose
manifest or verification record cannot be read is DAMAGED: listed as such (``DamagedRecord``),
skipped by ``latest``, retention and the sensors, and refused with the file and the parse error
when asked for by key. Every other partition keeps working.

Two runs writing one partition (no Dagster pool, a second instance) cannot destroy each other's
work: a commit removes only the directory of the backup it replaces (the one committed when it
began); a commit that finds the manifest changed since it began fails with ``ConcurrentBackup``
naming the other run, and removes only its own files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from rag_backup.errors import (
    BackupExpired,
    BackupNotFound,
    BackupUnverified,
    ConcurrentBackup,
    DamagedBackup,
    IntegrityError,
    InvalidRequest,
)
from rag_backup.repository.backends import TMP_MARKER, Backend, S3Backend, cleanup_after, safe_key
from rag_backup.repository.blobs import BLOB_PREFIX, BlobStore, blob_key  # noqa: F401 - re-export
from rag_backup.repository.manifest import (
    Artifact,
    BackupOutcome,
    Manifest,
    PartitionWindow,
    PendingMarker,
    Tombstone,
    Verification,
    utcnow,
)
from rag_backup.repository import lease
from rag_backup.repository.crypto import IdentityError
from rag_backup.repository.sealed import Crypto, SealedBackend, seal_manifest, unseal_manifest
from rag_backup.repository.wal import WalStore
from rag_backup.repository.retention import (
    RetentionCandidate,
    RetentionDecision,
    damaged_decision,
    plan_retention,
)

MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
TOMBSTONE = "tombstone.json"
RECORD_FILES = frozenset({MANIFEST, VERIFICATION, TOMBSTONE})
PENDING_SUFFIX = ".pending.json"
CHUNK = 1024 * 1024
LATEST = "latest"
# Longer than the longest backup: a temporary file, multipart upload or in-progress backup
# older than this belongs to a run that died, and retention collects it.
DEFAULT_STALE_AGE = timedelta(hours=12)

BACKUP_ID_TIME = re.compile(r"(\d{8}T\d{6}Z)-[0-9a-f]{8}")

log = logging.getLogger(__name__)


def backup_id_time(key: str) -> datetime | None:
    """When the backup named in ``key`` (``<YYYYmmddTHHMMSSZ>-<hex>``) started, if it names
    one: every backup directory and the MinIO engine's temporaries carry it."""
    found = BACKUP_ID_TIME.search(key)
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class DamagedRecord:
    """A partition whose manifest or verification record cannot be read or is invalid."""

    store: str
    partition_key: str
    kind: str  # "manifest" | "verification record"
    file: str  # the damaged file's location
    error: str  # the parse error
    backup_id: str | None = None  # known when only the verification record is damaged

    @property
    def identity(self) -> str:
        """Stable while the damage is the same (alerts are sent once per identity)."""
        return hashlib.sha256(f"{self.file}\n{self.error}".encode()).hexdigest()[:16]

    def describe(self) -> str:
        fix = (f"re-run {self.store}_backup for partition {self.partition_key} to replace it"
               if self.kind == "manifest" else
               f"re-materialize {self.store}_backup_verified for partition "
               f"{self.partition_key} to verify the backup again")
        return (f"{self.store} backup for partition {self.partition_key} is DAMAGED: its "
                f"{self.kind} {self.file} cannot be read ({self.error}); it is skipped by "
                f"'latest', retention and catch-up counts it as missing. To repair: {fix}.")

    def error_(self) -> DamagedBackup:
        return DamagedBackup(self.describe(), file=self.file, error=self.error)


@dataclass(frozen=True)
class BackupRecord:
    """A committed backup and what is known about its verification. ``damage`` is set when its
    verification record is damaged (then it does not count as verified)."""

    manifest: Manifest
    verification: Verification | None
    location: str
    damage: DamagedRecord | None = None

    @property
    def partition_key(self) -> str:
        return self.manifest.partition_key

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def verified(self) -> bool:
        return self.damage is None and self.verification is not None and self.verification.ok


F = TypeVar("F")


def check_totals(doc: dict[str, Any], found: Any, totals: tuple[str, ...], over: str) -> None:
    """A fingerprint's stored totals must equal what its parts add up to (``found``, the typed
    fingerprint read from ``doc``); ``ValueError`` naming the first that does not."""
    for total in totals:
        if total in doc and doc[total] != getattr(found, total):
            raise ValueError(f"total {total} {doc[total]!r} is not the sum over its {over} "
                             f"({getattr(found, total)!r})")


def typed_fingerprint(source: BackupRecord | Manifest | BackupOutcome, store: str,
                      from_dict: Callable[[dict[str, Any]], F]) -> F:
    """The typed fingerprint of a backup (its record or manifest) or of a backup's outcome, read
    by the store engine's ``from_dict``; an invalid one raises ``DamagedBackup`` naming the
    backup (every engine's ``fingerprint_of`` is this)."""
    manifest = source.manifest if isinstance(source, BackupRecord) else source
    if isinstance(manifest, Manifest) and manifest.sealed is not None and not manifest.fingerprint:
        raise IdentityError(
            f"{store} backup {manifest.partition_key} ({manifest.backup_id}): "
            + (manifest.encryption or {}).get("unopened", "its fingerprint is sealed and no "
                                              "identity is configured: set RAG_BACKUP_IDENTITY"))
    try:
        return from_dict(manifest.fingerprint)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        where = (f"the manifest of {store} backup {manifest.partition_key} ({manifest.backup_id})"
                 if isinstance(manifest, Manifest) else f"a {store} backup's outcome")
        error = f"{type(exc).__name__}: {exc}"
        raise DamagedBackup(f"{where} has an invalid fingerprint: {error}", file=where,
                            error=error) from exc


@dataclass(frozen=True)
class RepositoryListing:
    """Every partition of one store: the healthy backups and the damaged ones."""

    store: str
    backups: list[BackupRecord]
    damaged: list[DamagedRecord]


@dataclass(frozen=True)
class StaleWrite:
    """Something an unfinished write left behind, collected once older than the stale age."""

    kind: str  # "multipart upload" | "temporary file" | "abandoned backup"
    location: str
    since: datetime
    size: int | None = None

    def describe(self) -> str:
        size = f", {self.size} bytes" if self.size is not None else ""
        return f"{self.kind} {self.location} (since {self.since:%Y-%m-%d %H:%M} UTC{size})"


class HashingWriter:
    """Counts and hashes what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.size, self.hash = sink, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:  # zstandard's stream writer calls flush on its sink
        pass


def _digest(raw: bytes | None) -> str | None:
    return hashlib.sha256(raw).hexdigest() if raw is not None else None


@dataclass
class PendingBackup:
    """A backup being written. Nothing is visible to readers until ``commit``."""

    repo: BackupRepository
    store: str
    partition_key: str
    run_id: str
    backup_id: str
    started_at: datetime = field(default_factory=utcnow)
    artifacts: list[Artifact] = field(default_factory=list)
    base_digest: str | None = None  # sha256 of the manifest when this backup began (None: none)
    base_backup_id: str | None = None  # the backup that manifest committed (None: none/damaged)
    window: PartitionWindow | None = None  # the partition's window, from Dagster (None: unknown)
    committed: bool = False

    @property
    def prefix(self) -> str:
        return f"{self.store}/{self.partition_key}/{self.backup_id}"

    @property
    def part(self) -> str:
        return f"{self.store}/{self.partition_key}"

    @property
    def marker_key(self) -> str:
        return f"{self.part}/{self.backup_id}{PENDING_SUFFIX}"

    @contextmanager
    def artifact(self, name: str) -> Iterator[HashingWriter]:
        """Open artifact ``name`` for writing; it is recorded once the block exits cleanly."""
        safe_key(name)
        if any(a.path == name for a in self.artifacts):
            raise InvalidRequest(f"artifact {name!r} written twice in backup {self.prefix}")
        with self.repo.backend.open_write(f"{self.prefix}/{name}") as fh:
            writer = HashingWriter(fh)
            yield writer
        self.artifacts.append(Artifact(name, writer.size, writer.hash.hexdigest()))

    def _changed_since_begin(self) -> str | None:
        """Why the partition's manifest is not the one this backup began on, or ``None``."""
        backend = self.repo.backend
        raw = backend.read_bytes(f"{self.part}/{MANIFEST}")
        if _digest(raw) == self.base_digest:
            return None
        if raw is None:
            tomb = self.repo.tombstone(self.store, self.partition_key)
            what = (f"deleted on {tomb.deleted_at:%Y-%m-%d %H:%M} UTC ({tomb.reason})"
                    if tomb is not None else "deleted")
            return f"its backup {self.base_backup_id} was {what} while this run was writing"
        try:
            other = Manifest.from_json(raw, backend.location(f"{self.part}/{MANIFEST}"))
        except DamagedBackup as exc:
            return f"its manifest was replaced by an unreadable one ({exc.error})"
        if other.backup_id == self.backup_id:
            return None
        return (f"run {other.run_id} committed backup {other.backup_id} (started "
                f"{other.started_at:%Y-%m-%d %H:%M:%S} UTC) while this run was writing")

    def _refuse(self, why: str) -> ConcurrentBackup:
        return ConcurrentBackup(
            f"{self.store} partition {self.partition_key}: {why}; this run ({self.run_id}, "
            f"backup {self.backup_id}, started {self.started_at:%Y-%m-%d %H:%M:%S} UTC) did not "
            "commit and removed only its own files. The partition's current backup stands; "
            "re-run the backup only if you need a newer one. Two writers on one partition mean "
            "two schedulers or instances run this job: check the pools and deployments.")

    def commit(self, outcome: BackupOutcome) -> Manifest:
        """Write the manifest (the commit point), then remove the directory of the backup it
        replaced; never another run's files. Raises ``ConcurrentBackup`` (naming the other run)
        if the partition's manifest changed since this backup began."""
        manifest = Manifest(
            store=self.store, partition_key=self.partition_key, backup_id=self.backup_id,
            run_id=self.run_id, started_at=self.started_at, ended_at=utcnow(),
            tool_versions=outcome.tool_versions, server_version=outcome.server_version,
            fingerprint=outcome.fingerprint, artifacts=tuple(self.artifacts),
            partition_window=self.window, recovery_point=outcome.recovery_point,
        )
        backend = self.repo.backend
        why = self._changed_since_begin()
        if why is not None:
            raise self._refuse(why)
        recipients = self.repo.sealed.encrypting_to()
        data = (seal_manifest(manifest, recipients) if recipients else manifest).to_json()
        backend.sync_pending()  # what was written unsynced (MinIO's small blobs) is durable
        # before the manifest that references it
        backend.write_bytes(f"{self.part}/{MANIFEST}", data)
        if backend.read_bytes(f"{self.part}/{MANIFEST}") != data:  # a writer raced us
            why = self._changed_since_begin() or "another run wrote the manifest at once"
            raise self._refuse(why)
        self.committed = True
        for step, action in (
                ("removing the tombstone", lambda: backend.delete(f"{self.part}/{TOMBSTONE}")),
                ("removing the in-progress marker", lambda: backend.delete(self.marker_key)),
                (f"removing the replaced backup {self.base_backup_id}", self._drop_replaced)):
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - committed; stale files are collected
                log.warning(f"{self.store} {self.partition_key}: backup {self.backup_id} is "
                            f"committed, but {step} failed: {exc}; retention collects it")
        return manifest

    def _drop_replaced(self) -> None:
        if self.base_backup_id and self.base_backup_id != self.backup_id:
            self.repo.backend.delete_prefix(f"{self.part}/{self.base_backup_id}")

    def abort(self) -> None:
        """Remove this backup's own files and marker, nothing else."""
        self.repo.backend.delete_prefix(self.prefix)
        self.repo.backend.delete(self.marker_key)


class BackupRepository:
    """Every backup of every store, on one backend."""

    def __init__(self, backend: Backend, crypto: Any = None) -> None:
        # ``storage``: the files exactly as stored (ciphertext when encrypted), for copies
        # between repositories; ``backend``: what every reader and writer uses (it encrypts
        # and decrypts when ``crypto`` is set).
        self.storage = backend
        self.crypto = crypto or Crypto()
        self.sealed = SealedBackend(backend, self.crypto)
        self.backend: Backend = self.sealed  # type: ignore[assignment]
        self.blobs = BlobStore(self.backend)  # content-addressed blobs, shared by every backup
        self.wal = WalStore(self.backend)  # PostgreSQL's archived write-ahead log

    def lease(self, store: str, holder: str, purpose: str,
              ttl: timedelta | None = None) -> contextlib.AbstractContextManager[lease.Lease]:
        """Hold ``store``'s writer lease for a block (``StoreBusy`` naming the holder if
        another writer has it): backups, retention and in-place restores take it."""
        return lease.held(self.backend, store, holder, purpose, ttl)

    @property
    def s3_bucket(self) -> str | None:
        """The S3 bucket holding this repository (``None`` on a filesystem): no store's backup
        may read it as a source nor restore into it."""
        return self.storage.bucket if isinstance(self.storage, S3Backend) else None

    @property
    def root_location(self) -> str:
        """Where the repository is, for messages (a path or an ``s3://`` URL)."""
        return self.backend.location("")

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def begin(self, store: str, partition_key: str, run_id: str, *,
              window: PartitionWindow | None = None) -> Iterator[PendingBackup]:
        """Start a backup; if the block raises, its artifacts are removed and nothing commits.
        ``window`` is the partition's time window as Dagster knows it; the manifest records it
        (without one, readers fall back to reading the key: ``Manifest.window``).

        The block must call ``commit`` on the pending backup; leaving it without committing is
        treated as an abort. An in-progress marker (run id, start, the backup it replaces) lies
        beside the backup's directory until it commits or aborts.
        """
        part = safe_key(f"{store}/{partition_key}")
        backup_id = f"{utcnow():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        raw = self.backend.read_bytes(f"{part}/{MANIFEST}")
        base_id = None
        if raw is not None:
            try:
                base_id = Manifest.from_json(raw, self.backend.location(f"{part}/{MANIFEST}")
                                             ).backup_id
            except DamagedBackup:
                base_id = None  # replacing a damaged manifest: its files are left to retention
        pending = PendingBackup(self, store, partition_key, run_id, backup_id,
                                base_digest=_digest(raw), base_backup_id=base_id, window=window)
        self.backend.write_bytes(pending.marker_key, PendingMarker(
            backup_id, run_id, pending.started_at, socket.gethostname(), os.getpid(),
            base_id).to_json())
        try:
            yield pending
        except BaseException as exc:
            if not pending.committed:
                cleanup_after(exc, f"removing the unfinished backup {pending.prefix}",
                              pending.abort)
            raise
        if not pending.committed:
            pending.abort()

    def take(self, store: str, partition_key: str, run_id: str, holder: str,
             backup: Callable[[PendingBackup], BackupOutcome], *,
             window: PartitionWindow | None = None) -> tuple[BackupOutcome, BackupRecord]:
        """A whole backup of one partition, as every writer (Dagster, the command line) takes
        it: under the store's lease, ``backup`` (an engine's) into a pending backup, committed,
        then read back. ``ConcurrentBackup`` if another writer replaced or deleted it at once."""
        with self.lease(store, holder, f"the backup of partition {partition_key}"), \
                self.begin(store, partition_key, run_id, window=window) as pending:
            outcome = backup(pending)
            manifest = pending.commit(outcome)
        record = self.get(store, partition_key)
        if record is None or record.backup_id != manifest.backup_id:
            raise ConcurrentBackup(
                f"{store} partition {partition_key}: backup {manifest.backup_id} was committed "
                f"but the repository now holds {record.backup_id if record else 'nothing'} for "
                "it: another writer replaced or deleted it at once; check for a second instance "
                "or scheduler writing this store")
        return outcome, record

    def in_progress(self, store: str, partition_key: str) -> list[PendingMarker]:
        """The in-progress markers of a partition (runs writing it now, or that died)."""
        part = f"{store}/{safe_key(partition_key)}"
        markers = []
        for child in self.backend.list_children(part):
            if child.endswith(PENDING_SUFFIX):
                raw = self.backend.read_bytes(f"{part}/{child}")
                if raw is not None:
                    markers.append(PendingMarker.from_json(
                        raw, self.backend.location(f"{part}/{child}")))
        return markers

    def record_verification(self, store: str, partition_key: str, result: Verification) -> None:
        self.backend.write_bytes(f"{store}/{partition_key}/{VERIFICATION}", result.to_json())

    def delete(self, store: str, partition_key: str, reason: str) -> Tombstone | None:
        """Delete a backup: the manifest first (so it stops existing at once), then its files
        (never a directory another run is writing now)."""
        record = self.get(store, partition_key)
        if record is None:
            return None
        return self._remove(store, partition_key, record.backup_id, reason)

    def delete_damaged(self, store: str, partition_key: str, reason: str, *,
                       confirm: str) -> Tombstone:
        """Remove a DAMAGED partition's files; ``confirm`` must be ``<store>/<partition>``."""
        if confirm != f"{store}/{partition_key}":
            from rag_backup.errors import ConfirmationRequired

            raise ConfirmationRequired(f"removing the damaged {store} backup of partition "
                                       f"{partition_key} needs confirm='{store}/{partition_key}'")
        found = self._read(store, partition_key)
        if not isinstance(found, DamagedRecord) and not (
                isinstance(found, BackupRecord) and found.damage is not None):
            raise InvalidRequest(f"{store} partition {partition_key} is not damaged; use "
                                 "retention or delete() for healthy backups")
        backup_id = (found.backup_id if isinstance(found, BackupRecord)
                     else "unknown (manifest damaged)")
        return self._remove(store, partition_key, backup_id, reason)

    def _remove(self, store: str, partition_key: str, backup_id: str, reason: str) -> Tombstone:
        part = f"{store}/{partition_key}"
        self.backend.delete(f"{part}/{MANIFEST}")
        tomb = Tombstone(partition_key, backup_id, utcnow(), reason)
        self.backend.write_bytes(f"{part}/{TOMBSTONE}", tomb.to_json())
        self.backend.delete(f"{part}/{VERIFICATION}")
        live = {m.backup_id for m in self._markers(part) if m is not None}
        for child in self.backend.list_children(part):
            if child in RECORD_FILES or child.endswith(PENDING_SUFFIX) or child in live:
                continue
            self.backend.delete_prefix(f"{part}/{child}")
        return tomb

    def _markers(self, part: str) -> list[PendingMarker | None]:
        out: list[PendingMarker | None] = []
        for child in self.backend.list_children(part):
            if child.endswith(PENDING_SUFFIX):
                raw = self.backend.read_bytes(f"{part}/{child}")
                try:
                    out.append(PendingMarker.from_json(
                        raw or b"", self.backend.location(f"{part}/{child}")))
                except DamagedBackup:
                    out.append(None)
        return out

    def apply_retention(self, store: str, *, now: datetime, window: timedelta,
                        keep_newest_verified: int = 1, dry_run: bool = False,
                        damaged_start: Callable[[str], datetime | None] | None = None,
                        delete_damaged_past_window: bool = False) -> list[RetentionDecision]:
        """Plan retention over every healthy backup of ``store`` and, unless ``dry_run``,
        delete. A backup's age counts from the start of its partition's window, as its manifest
        records it. DAMAGED partitions get a decision too (``damaged=True``): kept and reported
        for an operator, or, with ``delete_damaged_past_window``, removed once past the window;
        their manifest cannot say when they start, so ``damaged_start`` (the caller's partitions
        definition) does: a partition it gives no start (or without it) is kept."""
        listing = self.scan(store)
        decisions = plan_retention(
            [RetentionCandidate(r.partition_key, r.backup_id, r.manifest.window.start,
                                r.verified) for r in listing.backups],
            now=now, window=window, keep_newest_verified=keep_newest_verified)
        for d in decisions:
            if d.delete and not dry_run:
                self.delete(store, d.partition_key, f"retention: {d.reason}")
        for damage in listing.damaged:
            start = damaged_start(damage.partition_key) if damaged_start is not None else None
            decision = damaged_decision(damage, now=now, window=window, start=start,
                                        delete_past_window=delete_damaged_past_window)
            if decision.delete and not dry_run:
                self._remove(store, damage.partition_key, decision.backup_id,
                             f"retention: {decision.reason}")
            decisions.append(decision)
        return decisions

    def collect_stale_writes(self, prefix: str, *, now: datetime | None = None,
                             older_than: timedelta = DEFAULT_STALE_AGE, dry_run: bool = False,
                             all_temporary: bool = False) -> list[StaleWrite]:
        """Remove what unfinished writes under ``prefix`` left behind, once older than
        ``older_than`` (longer than the longest backup): incomplete S3 multipart uploads
        (aborted) and temporary files (``*.tmp-*``; with ``all_temporary``, every file under
        ``prefix``, e.g. the MinIO engine's ``objectstore/tmp``). Returns what was (or, with
        ``dry_run``, would be) removed."""
        cutoff = (now or utcnow()) - older_than
        found: list[StaleWrite] = []
        for upload in self.backend.list_incomplete_uploads(prefix):
            # the later of the server's Initiated and the backup id's start: some servers
            # (moto) report a fixed Initiated date
            since = max(upload.initiated, backup_id_time(upload.key) or upload.initiated)
            if since < cutoff:
                found.append(StaleWrite("multipart upload", self.backend.location(upload.key),
                                        since))
                if not dry_run:
                    self.backend.abort_incomplete_upload(upload)
        doomed = []
        for info in self.backend.list_files(prefix, include_temporary=True):
            temporary = all_temporary or TMP_MARKER in info.key.rsplit("/", 1)[-1]
            if temporary and info.mtime < cutoff:
                found.append(StaleWrite("temporary file", self.backend.location(info.key),
                                        info.mtime, info.size))
                doomed.append(info.key)
        if doomed and not dry_run:
            self.backend.delete_many(doomed)
        return found

    def collect_abandoned_backups(self, store: str, *, now: datetime | None = None,
                                  older_than: timedelta = DEFAULT_STALE_AGE,
                                  dry_run: bool = False) -> list[StaleWrite]:
        """Remove backup directories of runs that died before committing: not the partition's
        committed backup, no in-progress marker younger than ``older_than``, and no file
        younger than it either. Partitions with a damaged manifest are left alone (their files
        are the damaged backup's)."""
        cutoff = (now or utcnow()) - older_than
        found: list[StaleWrite] = []
        for pk in self.backend.list_children(store):
            part = f"{store}/{pk}"
            found_pk = self._read(store, pk)
            if isinstance(found_pk, DamagedRecord):
                continue
            keep = {found_pk.backup_id} if found_pk is not None else set()
            markers = {m.backup_id: m for m in self._markers(part) if m is not None}
            children = self.backend.list_children(part)
            for child in children:
                if child in RECORD_FILES or child in keep:
                    continue
                if child.endswith(PENDING_SUFFIX):
                    owner = child[:-len(PENDING_SUFFIX)]
                    marker = markers.get(owner)
                    if owner not in children and (marker is None or marker.started_at < cutoff):
                        found.append(StaleWrite("abandoned in-progress marker",
                                                self.backend.location(f"{part}/{child}"),
                                                marker.started_at if marker else cutoff))
                        if not dry_run:
                            self.backend.delete(f"{part}/{child}")
                    continue
                marker = markers.get(child)
                if marker is not None and marker.started_at >= cutoff:
                    continue  # a run is writing it
                files = list(self.backend.list_files(f"{part}/{child}", include_temporary=True))
                newest = max((f.mtime for f in files), default=None)
                if newest is not None and newest >= cutoff:
                    continue
                found.append(StaleWrite("abandoned backup", self.backend.location(
                    f"{part}/{child}"), newest or cutoff, sum(f.size for f in files)))
                if not dry_run:
                    self.backend.delete_prefix(f"{part}/{child}")
                    self.backend.delete(f"{part}/{child}{PENDING_SUFFIX}")
        return found

    # -- reading -------------------------------------------------------------------------
    def partitions(self, store: str) -> list[str]:
        """Partition keys that have a committed backup (damaged ones included)."""
        return [pk for pk in self.backend.list_children(store)
                if self.backend.exists(f"{store}/{pk}/{MANIFEST}")]

    def _read(self, store: str, partition_key: str) -> BackupRecord | DamagedRecord | None:
        """A partition's backup, or what is damaged about it, or ``None`` if it has none."""
        part = f"{store}/{safe_key(partition_key)}"
        where = self.backend.location(f"{part}/{MANIFEST}")
        raw = self.backend.read_bytes(f"{part}/{MANIFEST}")
        if raw is None:
            return None
        try:
            manifest = Manifest.from_json(raw, where)
            if (manifest.store, manifest.partition_key) != (store, partition_key):
                raise DamagedBackup(
                    f"manifest {where} is invalid: it describes {manifest.store} partition "
                    f"{manifest.partition_key}", file=where,
                    error=f"it describes {manifest.store} partition {manifest.partition_key}")
            manifest = self._unseal(manifest, where)
        except DamagedBackup as exc:
            return DamagedRecord(store, partition_key, "manifest", where, exc.error)
        location = self.backend.location(f"{part}/{manifest.backup_id}")
        v_where = self.backend.location(f"{part}/{VERIFICATION}")
        raw_v = self.backend.read_bytes(f"{part}/{VERIFICATION}")
        verification = None
        if raw_v is not None:
            try:
                candidate = Verification.from_json(raw_v, v_where)
            except DamagedBackup as exc:
                damage = DamagedRecord(store, partition_key, "verification record", v_where,
                                       exc.error, manifest.backup_id)
                return BackupRecord(manifest, None, location, damage)
            if candidate.backup_id == manifest.backup_id:
                verification = candidate
        return BackupRecord(manifest, verification, location)

    def _unseal(self, manifest: Manifest, where: str) -> Manifest:
        """The manifest with its fingerprint (kept sealed when no identity opens it: listing
        works, reading the fingerprint says so); ``DamagedBackup`` when tampered, or when it
        is in clear although written after the repository turned encryption on."""
        if manifest.sealed is None:
            record = self.sealed.key_record()
            if record is not None and manifest.started_at > record.since_time:
                error = (f"it is not sealed, yet the repository encrypts every backup since "
                         f"{record.since} (keys/encryption.json): replaced (tampered)")
                raise DamagedBackup(f"manifest {where}: {error}", file=where, error=error)
            return manifest
        try:
            return unseal_manifest(manifest, self.crypto.identities, where)
        except IdentityError as exc:  # listed; reading its fingerprint raises this
            return replace(manifest, encryption={**(manifest.encryption or {}),
                                                 "unopened": str(exc)})

    def get(self, store: str, partition_key: str) -> BackupRecord | None:
        """The partition's committed backup (``None`` if it has none). A damaged manifest
        raises ``DamagedBackup`` naming the file and the parse error; a damaged verification
        record gives a record with ``damage`` set that does not count as verified."""
        found = self._read(store, partition_key)
        if isinstance(found, DamagedRecord):
            raise found.error_()
        return found

    def scan(self, store: str) -> RepositoryListing:
        """Every partition of ``store``: healthy backups and DAMAGED ones, in key order."""
        backups, damaged = [], []
        for pk in self.backend.list_children(store):
            found = self._read(store, pk)
            if isinstance(found, DamagedRecord):
                damaged.append(found)
            elif found is not None and found.damage is not None:
                damaged.append(found.damage)
            elif found is not None:
                backups.append(found)
        return RepositoryListing(store, sorted(backups, key=lambda r: r.partition_key),
                                 sorted(damaged, key=lambda d: d.partition_key))

    def damaged(self, store: str) -> list[DamagedRecord]:
        """The DAMAGED partitions of ``store``, each with the file and the parse error."""
        return self.scan(store).damaged

    def list_backups(self, store: str) -> list[BackupRecord]:
        """Every backup whose manifest is readable, in partition order; those whose
        verification record is damaged are included (with ``damage`` set, not verified).
        Partitions with a damaged manifest are left out: see ``scan`` / ``damaged``."""
        records = (self._read(store, pk) for pk in self.backend.list_children(store))
        return sorted((r for r in records if isinstance(r, BackupRecord)),
                      key=lambda r: r.partition_key)

    def tombstone(self, store: str, partition_key: str) -> Tombstone | None:
        key = f"{store}/{safe_key(partition_key)}/{TOMBSTONE}"
        raw = self.backend.read_bytes(key)
        return Tombstone.from_json(raw, self.backend.location(key)) if raw is not None else None

    def latest_verified(self, store: str, at_or_before: datetime | None = None
                        ) -> BackupRecord | None:
        """The verified backup with the newest recovery point (its start), optionally the newest
        one taken at or before ``at_or_before``. DAMAGED partitions are skipped."""
        verified = [r for r in self.scan(store).backups if r.verified and (
            at_or_before is None or r.manifest.started_at <= at_or_before)]
        return max(verified, key=lambda r: r.manifest.started_at, default=None)

    def resolve(self, store: str, partition_key: str, *, require_verified: bool = True
                ) -> BackupRecord:
        """The backup to restore for ``partition_key`` (or ``latest``), or an error saying
        why not. A DAMAGED partition asked for by key raises ``DamagedBackup`` naming the file
        and the parse error; ``latest`` skips damaged partitions."""
        if partition_key == LATEST:
            listing = self.scan(store)
            verified = [r for r in listing.backups if r.verified]
            record = max(verified, key=lambda r: r.manifest.started_at, default=None)
            if record is None:
                skipped = (f"; {len(listing.damaged)} DAMAGED partition(s) skipped: "
                           + ", ".join(f"{d.partition_key} ({d.file}: {d.error})"
                                       for d in listing.damaged[:3])
                           if listing.damaged else "")
                raise BackupNotFound(f"{store}: no verified backup exists in the repository; "
                                     f"run the backup and its verification first{skipped}")
            return record
        found = self._read(store, partition_key)
        if isinstance(found, DamagedRecord):
            raise found.error_()
        record = found
        if record is None:
            tomb = self.tombstone(store, partition_key)
            if tomb is not None:
                raise BackupExpired(
                    f"{store} backup for partition {partition_key} (backup {tomb.backup_id}) was "
                    f"deleted on {tomb.deleted_at:%Y-%m-%d %H:%M} UTC: {tomb.reason}; "
                    f"choose a newer partition or 'latest'")
            available = self.partitions(store)
            hint = f"available: {', '.join(available[-5:])}" if available else "none exist yet"
            raise BackupNotFound(f"{store}: no backup for partition {partition_key!r} ({hint})")
        if require_verified and record.damage is not None:
            raise record.damage.error_()
        if require_verified and not record.verified:
            state = ("failed verification: " + (record.verification.error or "")
                     if record.verification else "has not been verified yet")
            raise BackupUnverified(
                f"{store} backup for partition {partition_key} ({record.backup_id}) {state}; "
                f"materialize {store}_backup_verified for it first")
        return record

    # -- content-addressed blobs ----------------------------------------------------------
    def open_blob(self, sha256: str) -> BinaryIO:
        """``blobs.open``: a stream of the blob named ``sha256`` (unchecked)."""
        return self.blobs.open(sha256)

    def blob_location(self, sha256: str) -> str:
        """``blobs.location``: where the blob ``sha256`` is, for messages."""
        return self.blobs.location(sha256)

    # -- artifacts -----------------------------------------------------------------------
    def open_artifact(self, record: BackupRecord, artifact: Artifact) -> BinaryIO:
        return self.backend.open_read(_artifact_key(record, artifact))

    def local_artifact_path(self, record: BackupRecord, artifact: Artifact) -> Path | None:
        """The artifact's file when the backend is a local filesystem (as stored: unchecked),
        else None (read it with ``stream_artifact``)."""
        local = getattr(self.backend, "local_path", None)
        return None if local is None else local(_artifact_key(record, artifact))

    def open_checked(self, record: BackupRecord, artifact: Artifact) -> CheckedReader:
        """A reader of the artifact that hashes what it reads; its ``finish`` checks the whole
        artifact against the manifest."""
        try:
            stream = self.open_artifact(record, artifact)
        except FileNotFoundError as exc:
            raise IntegrityError(f"{record.manifest.store} backup {record.partition_key}: "
                                 f"artifact {record.location}/{artifact.path} is missing") from exc
        return CheckedReader(stream, record, artifact)

    def stream_artifact(self, record: BackupRecord, artifact: Artifact,
                        sink: Callable[[bytes], None] | None = None) -> None:
        """Read an artifact in chunks into ``sink``; raise ``IntegrityError`` on any mismatch.

        The check happens after the last chunk: a consumer that must not act on corrupt data
        (a restore) writes to scratch space first and acts only once this returns.
        """
        with self.open_checked(record, artifact) as reader:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                if sink is not None:
                    sink(chunk)
            reader.finish()


def _artifact_key(record: BackupRecord, artifact: Artifact) -> str:
    m = record.manifest
    return f"{m.store}/{m.partition_key}/{m.backup_id}/{artifact.path}"


class CheckedReader:
    """Reads an artifact while hashing it; ``finish`` reads the rest and compares size and
    sha256 with the manifest, raising ``IntegrityError`` that names the artifact."""

    def __init__(self, stream: BinaryIO, record: BackupRecord, artifact: Artifact) -> None:
        self.stream, self.record, self.artifact = stream, record, artifact
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def finish(self) -> None:
        for _ in iter(lambda: self.read(CHUNK), b""):
            pass
        m, a = self.record.manifest, self.artifact
        where = f"{m.store} backup {m.partition_key}: artifact {self.record.location}/{a.path}"
        if self.size != a.size:
            raise IntegrityError(f"{where} has {self.size} bytes, the manifest says {a.size} "
                                 "(truncated or overwritten)")
        if self.digest.hexdigest() != a.sha256:
            raise IntegrityError(f"{where} sha256 {self.digest.hexdigest()} does not match the "
                                 f"manifest's {a.sha256} (corrupt)")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> CheckedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
