"""The records kept in the repository: manifests (commit records), verifications, tombstones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from rag_backup.errors import DamagedBackup, InvalidRequest

# Format 2 adds ``partition_window`` (the partition's start and end, from Dagster). Every format
# an earlier release wrote stays readable: a release must read them all.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# How partition keys are written (hourly, daily); read only by the format-1 fallback below.
PARTITION_KEY_FORMATS = (("%Y-%m-%d-%H:%M", timedelta(hours=1)), ("%Y-%m-%d", timedelta(days=1)))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat()


def _aware(value: Any, name: str) -> datetime:
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    if parsed is None:
        raise ValueError(f"{name} is {value!r}, not an ISO timestamp")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def record_json(record: Any, time_field: str) -> bytes:
    """A dataclass record as the repository's JSON, its ``time_field`` as an ISO timestamp."""
    doc = asdict(record)
    doc[time_field] = _ts(getattr(record, time_field))
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode()


def record_fields(data: bytes, what: str, where: str, time_field: str) -> dict[str, Any]:
    """A record's fields from its JSON, ``time_field`` parsed; ``DamagedBackup`` naming
    ``where`` when it cannot be read."""
    doc = load_record(data, what, where)
    try:
        doc[time_field] = _aware(doc[time_field], time_field)
    except (ValueError, KeyError, TypeError) as exc:
        raise damaged(what, where, exc) from exc
    return doc


def load_record(data: bytes, what: str, where: str) -> dict[str, Any]:
    """Parse one JSON record of the repository; an unreadable one raises ``DamagedBackup``
    naming the file and the parse error."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(what, where, exc) from exc
    if not isinstance(doc, dict):
        raise damaged(what, where, ValueError(f"a JSON {type(doc).__name__}, not an object"))
    return doc


def damaged(what: str, where: str, exc: BaseException | str) -> DamagedBackup:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return DamagedBackup(f"{what} {where} is unreadable: {text}", file=where, error=text)


@dataclass(frozen=True)
class PartitionWindow:
    """The time a partition covers, ``[start, end)``, as Dagster's partitions definition gives it
    (``context.partition_time_window``): timezone-aware, in the partitions' timezone."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise InvalidRequest(f"partition window {self.start} - {self.end} has no timezone")
        if not self.start < self.end:
            raise InvalidRequest(f"partition window starts at {self.start.isoformat()}, not "
                                 f"before its end {self.end.isoformat()}")

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    @classmethod
    def from_dict(cls, doc: Any) -> PartitionWindow:
        if not isinstance(doc, dict):
            raise ValueError(f"partition_window is {doc!r}, not an object with start and end")
        try:
            return cls(_aware(doc["start"], "partition_window.start"),
                       _aware(doc["end"], "partition_window.end"))
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from exc


def format1_window(partition_key: str) -> PartitionWindow:
    """FORMAT-1 FALLBACK, the only place a partition key is parsed back into time.

    Format-1 manifests (and format-2 ones committed outside Dagster, by a script or a test that
    gave ``begin`` no window) do not record their partition's window: it is read from the key,
    as releases before format 2 did, a daily (``2026-11-24``) or hourly (``2026-11-24-13:00``)
    key taken as UTC. Raises ``InvalidRequest`` for a key of neither form."""
    for fmt, length in PARTITION_KEY_FORMATS:
        try:
            start = datetime.strptime(partition_key, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        return PartitionWindow(start, start + length)
    raise InvalidRequest(f"{partition_key!r} is not a daily (YYYY-MM-DD) or hourly "
                         "(YYYY-MM-DD-HH:MM) partition key: its time window cannot be read "
                         "from it")


@dataclass(frozen=True)
class Artifact:
    """One file of a backup, relative to the backup's directory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The commit record of one backup. A backup exists only once this is written."""

    store: str
    partition_key: str
    backup_id: str
    run_id: str
    started_at: datetime
    ended_at: datetime
    tool_versions: dict[str, str]
    server_version: str
    fingerprint: dict[str, Any]  # the engine's typed fingerprint, in its dict form
    artifacts: tuple[Artifact, ...]
    partition_window: PartitionWindow | None = None  # as recorded (None: format 1, or no Dagster)
    format_version: int = FORMAT_VERSION
    # Where the data came from when it is not the live source at backup time (PostgreSQL: a
    # point-in-time recovery to the partition's end); absent in older manifests.
    recovery_point: dict[str, Any] | None = None
    # In an encrypted repository (``sealed.py``): the fingerprint, encrypted with a digest of
    # every other field (``fingerprint`` is then ``{}`` as stored), and which keys it is for.
    sealed: str | None = None
    encryption: dict[str, Any] | None = None

    @property
    def window(self) -> PartitionWindow:
        """The partition's window: as recorded from Dagster, else (format 1) read from the key
        by ``format1_window``."""
        return self.partition_window or format1_window(self.partition_key)

    @property
    def size_bytes(self) -> int:
        return sum(a.size for a in self.artifacts)

    @property
    def duration_s(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["started_at"], doc["ended_at"] = _ts(self.started_at), _ts(self.ended_at)
        doc["artifacts"] = [asdict(a) for a in self.artifacts]
        doc["partition_window"] = (self.partition_window.to_dict()
                                   if self.partition_window is not None else None)
        for name in ("sealed", "encryption"):  # absent from an unencrypted manifest
            if doc[name] is None:
                del doc[name]
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; an unreadable or invalid one raises ``DamagedBackup`` (an
        ``IntegrityError``) naming ``where`` and the parse error."""
        doc = load_record(data, "manifest", where)
        version = doc.get("format_version")
        if type(version) is not int or version not in READABLE_FORMATS:
            raise damaged("manifest", where, f"format_version {version!r}; this version reads "
                          f"{', '.join(map(str, READABLE_FORMATS))}")
        try:
            window = None
            if version >= 2 and doc["partition_window"] is not None:
                window = PartitionWindow.from_dict(doc["partition_window"])
            artifacts = tuple(Artifact(**a) for a in doc["artifacts"])
            for a in artifacts:
                if not (isinstance(a.path, str) and isinstance(a.size, int)
                        and isinstance(a.sha256, str) and len(a.sha256) == 64):
                    raise ValueError(f"artifact {a.path!r} has no valid path, size and sha256")
            for name in ("store", "partition_key", "backup_id", "run_id", "server_version"):
                if not isinstance(doc[name], str) or (name != "server_version" and not doc[name]):
                    raise ValueError(f"{name} is {doc[name]!r}")
            if "/" in doc["backup_id"] or doc["backup_id"] in (".", ".."):
                raise ValueError(f"backup_id {doc['backup_id']!r} is not a directory name")
            return cls(
                store=doc["store"], partition_key=doc["partition_key"],
                backup_id=doc["backup_id"], run_id=doc["run_id"],
                started_at=_aware(doc["started_at"], "started_at"),
                ended_at=_aware(doc["ended_at"], "ended_at"),
                tool_versions=dict(doc["tool_versions"]), server_version=doc["server_version"],
                fingerprint=dict(doc["fingerprint"]), artifacts=artifacts,
                partition_window=window, format_version=version,
                recovery_point=dict(doc["recovery_point"]) if doc.get("recovery_point")
                else None,
                sealed=_optional_str(doc.get("sealed"), "sealed"),
                encryption=dict(doc["encryption"]) if doc.get("encryption") else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise damaged("manifest", where, exc) from exc


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} is {type(value).__name__}, not a string")
    return value


@dataclass(frozen=True)
class BackupOutcome:
    """What an engine's backup tells the manifest about the source: its fingerprint (counts),
    the tools' and the server's versions. Engines subclass it with their own accessors."""

    fingerprint: dict[str, Any]
    tool_versions: dict[str, str]
    server_version: str
    # See ``Manifest.recovery_point``; keyword-only, so engines' outcomes may add fields.
    recovery_point: dict[str, Any] | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Verification:
    """The outcome of verifying one backup, stored beside its manifest."""

    backup_id: str
    ok: bool
    verified_at: datetime
    run_id: str
    checks: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> bytes:
        return record_json(self, "verified_at")

    @classmethod
    def from_json(cls, data: bytes, where: str = "verification record") -> Verification:
        """Parse a verification record; raises ``DamagedBackup`` naming ``where``."""
        doc = record_fields(data, "verification record", where, "verified_at")
        try:
            record = cls(**doc)
            if not isinstance(record.backup_id, str) or not isinstance(record.ok, bool):
                raise ValueError(f"backup_id {record.backup_id!r} / ok {record.ok!r} invalid")
            if not isinstance(record.checks, dict):
                raise ValueError(f"checks is {type(record.checks).__name__}, not an object")
            return record
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged("verification record", where, exc) from exc


@dataclass(frozen=True)
class Tombstone:
    """Left where retention deleted a backup, so a later request gets a precise answer."""

    partition_key: str
    backup_id: str
    deleted_at: datetime
    reason: str

    def to_json(self) -> bytes:
        return record_json(self, "deleted_at")

    @classmethod
    def from_json(cls, data: bytes, where: str = "tombstone") -> Tombstone:
        """Parse a tombstone; raises ``DamagedBackup`` naming ``where``."""
        doc = record_fields(data, "tombstone", where, "deleted_at")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise damaged("tombstone", where, exc) from exc


@dataclass(frozen=True)
class PendingMarker:
    """Beside a backup being written (``<backup_id>.pending.json``): which run writes it, since
    when, and which committed backup it will replace. Removed on commit or abort."""

    backup_id: str
    run_id: str
    started_at: datetime
    host: str
    pid: int
    replaces: str | None = None

    def to_json(self) -> bytes:
        return record_json(self, "started_at")

    @classmethod
    def from_json(cls, data: bytes, where: str = "in-progress marker") -> PendingMarker:
        doc = record_fields(data, "in-progress marker", where, "started_at")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise damaged("in-progress marker", where, exc) from exc
