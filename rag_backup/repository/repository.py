"""The backup repository: atomic commit, listing, verification state, deletion.

Layout (identical on every backend)::

    <store>/<partition_key>/manifest.json       the commit record, written last
    <store>/<partition_key>/verification.json   the latest verification of that backup
    <store>/<partition_key>/tombstone.json      left by retention when it deleted the backup
    <store>/<partition_key>/<backup_id>/...     the artifact files

A partition without a manifest has no backup, whatever else lies there.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO

from rag_backup.errors import (
    BackupExpired,
    BackupNotFound,
    BackupUnverified,
    IntegrityError,
    InvalidRequest,
)
from rag_backup.repository.backends import Backend, safe_key
from rag_backup.repository.manifest import (
    Artifact,
    BackupOutcome,
    Manifest,
    Tombstone,
    Verification,
    utcnow,
)
from rag_backup.repository.retention import (
    RetentionCandidate,
    RetentionDecision,
    partition_start,
    plan_retention,
)

MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
TOMBSTONE = "tombstone.json"
RECORD_FILES = frozenset({MANIFEST, VERIFICATION, TOMBSTONE})
CHUNK = 1024 * 1024
LATEST = "latest"


@dataclass(frozen=True)
class BackupRecord:
    """A committed backup and what is known about its verification."""

    manifest: Manifest
    verification: Verification | None
    location: str

    @property
    def partition_key(self) -> str:
        return self.manifest.partition_key

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.ok


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

    @property
    def prefix(self) -> str:
        return f"{self.store}/{self.partition_key}/{self.backup_id}"

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

    def commit(self, outcome: BackupOutcome) -> Manifest:
        """Write the manifest (the commit point), then remove every older backup directory."""
        manifest = Manifest(
            store=self.store, partition_key=self.partition_key, backup_id=self.backup_id,
            run_id=self.run_id, started_at=self.started_at, ended_at=utcnow(),
            tool_versions=outcome.tool_versions, server_version=outcome.server_version,
            fingerprint=outcome.fingerprint, artifacts=tuple(self.artifacts),
        )
        part = f"{self.store}/{self.partition_key}"
        backend = self.repo.backend
        backend.write_bytes(f"{part}/{MANIFEST}", manifest.to_json())
        backend.delete(f"{part}/{TOMBSTONE}")
        for child in backend.list_children(part):
            if child not in RECORD_FILES and child != self.backup_id:
                backend.delete_prefix(f"{part}/{child}")
        return manifest

    def abort(self) -> None:
        self.repo.backend.delete_prefix(self.prefix)


class BackupRepository:
    """Every backup of every store, on one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def begin(self, store: str, partition_key: str, run_id: str) -> Iterator[PendingBackup]:
        """Start a backup; if the block raises, its artifacts are removed and nothing commits.

        The block must call ``commit`` on the pending backup; leaving it without committing is
        treated as an abort.
        """
        safe_key(f"{store}/{partition_key}")
        backup_id = f"{utcnow():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        pending = PendingBackup(self, store, partition_key, run_id, backup_id)
        try:
            yield pending
        except BaseException:
            pending.abort()
            raise
        manifest = self.get(store, partition_key)
        if manifest is None or manifest.backup_id != backup_id:
            pending.abort()

    def record_verification(self, store: str, partition_key: str, result: Verification) -> None:
        self.backend.write_bytes(f"{store}/{partition_key}/{VERIFICATION}", result.to_json())

    def delete(self, store: str, partition_key: str, reason: str) -> Tombstone | None:
        """Delete a backup: the manifest first (so it stops existing at once), then its files."""
        part = f"{store}/{partition_key}"
        record = self.get(store, partition_key)
        if record is None:
            return None
        self.backend.delete(f"{part}/{MANIFEST}")
        tomb = Tombstone(partition_key, record.backup_id, utcnow(), reason)
        self.backend.write_bytes(f"{part}/{TOMBSTONE}", tomb.to_json())
        self.backend.delete(f"{part}/{VERIFICATION}")
        for child in self.backend.list_children(part):
            if child not in RECORD_FILES:
                self.backend.delete_prefix(f"{part}/{child}")
        return tomb

    def apply_retention(self, store: str, *, now: datetime, window: timedelta,
                        keep_newest_verified: int = 1, dry_run: bool = False,
                        tz: str = "UTC") -> list[RetentionDecision]:
        """Plan retention over every backup of ``store`` and, unless ``dry_run``, delete."""
        records = self.list_backups(store)
        decisions = plan_retention(
            [RetentionCandidate(r.partition_key, r.backup_id, partition_start(r.partition_key, tz),
                                r.verified) for r in records],
            now=now, window=window, keep_newest_verified=keep_newest_verified)
        if not dry_run:
            for d in decisions:
                if d.delete:
                    self.delete(store, d.partition_key, f"retention: {d.reason}")
        return decisions

    # -- reading -------------------------------------------------------------------------
    def partitions(self, store: str) -> list[str]:
        """Partition keys that have a committed backup."""
        return [pk for pk in self.backend.list_children(store)
                if self.backend.exists(f"{store}/{pk}/{MANIFEST}")]

    def get(self, store: str, partition_key: str) -> BackupRecord | None:
        part = f"{store}/{safe_key(partition_key)}"
        raw = self.backend.read_bytes(f"{part}/{MANIFEST}")
        if raw is None:
            return None
        manifest = Manifest.from_json(raw, self.backend.location(f"{part}/{MANIFEST}"))
        verification = None
        raw_v = self.backend.read_bytes(f"{part}/{VERIFICATION}")
        if raw_v is not None:
            candidate = Verification.from_json(raw_v)
            if candidate.backup_id == manifest.backup_id:
                verification = candidate
        return BackupRecord(manifest, verification,
                            self.backend.location(f"{part}/{manifest.backup_id}"))

    def list_backups(self, store: str) -> list[BackupRecord]:
        records = (self.get(store, pk) for pk in self.backend.list_children(store))
        return sorted((r for r in records if r is not None), key=lambda r: r.partition_key)

    def tombstone(self, store: str, partition_key: str) -> Tombstone | None:
        raw = self.backend.read_bytes(f"{store}/{safe_key(partition_key)}/{TOMBSTONE}")
        return Tombstone.from_json(raw) if raw is not None else None

    def latest_verified(self, store: str, at_or_before: datetime | None = None
                        ) -> BackupRecord | None:
        """The verified backup with the newest recovery point (its start), optionally the newest
        one taken at or before ``at_or_before``."""
        verified = [r for r in self.list_backups(store) if r.verified and (
            at_or_before is None or r.manifest.started_at <= at_or_before)]
        return max(verified, key=lambda r: r.manifest.started_at, default=None)

    def resolve(self, store: str, partition_key: str, *, require_verified: bool = True
                ) -> BackupRecord:
        """The backup to restore for ``partition_key`` (or ``latest``), or an error saying
        why not."""
        if partition_key == LATEST:
            record = self.latest_verified(store)
            if record is None:
                raise BackupNotFound(f"{store}: no verified backup exists in the repository; "
                                     "run the backup and its verification first")
            return record
        record = self.get(store, partition_key)
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
        if require_verified and not record.verified:
            state = ("failed verification: " + (record.verification.error or "")
                     if record.verification else "has not been verified yet")
            raise BackupUnverified(
                f"{store} backup for partition {partition_key} ({record.backup_id}) {state}; "
                f"materialize {store}_backup_verified for it first")
        return record

    # -- artifacts -----------------------------------------------------------------------
    def open_artifact(self, record: BackupRecord, artifact: Artifact) -> BinaryIO:
        m = record.manifest
        return self.backend.open_read(f"{m.store}/{m.partition_key}/{m.backup_id}/{artifact.path}")

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
