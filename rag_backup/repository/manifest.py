"""The records kept in the repository: manifests (commit records), verifications, tombstones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from rag_backup.errors import DamagedBackup

FORMAT_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat()


def _aware(value: Any, name: str) -> datetime:
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    if parsed is None:
        raise ValueError(f"{name} is {value!r}, not an ISO timestamp")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


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
    fingerprint: dict[str, Any]
    artifacts: tuple[Artifact, ...]
    format_version: int = FORMAT_VERSION

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
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; an unreadable or invalid one raises ``DamagedBackup`` (an
        ``IntegrityError``) naming ``where`` and the parse error."""
        doc = load_record(data, "manifest", where)
        if doc.get("format_version") != FORMAT_VERSION:
            raise damaged("manifest", where, f"format_version {doc.get('format_version')!r}; "
                          f"this version reads {FORMAT_VERSION}")
        try:
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
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise damaged("manifest", where, exc) from exc


@dataclass(frozen=True)
class BackupOutcome:
    """What an engine's backup tells the manifest about the source: its fingerprint (counts),
    the tools' and the server's versions. Engines subclass it with their own accessors."""

    fingerprint: dict[str, Any]
    tool_versions: dict[str, str]
    server_version: str


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
        doc = asdict(self)
        doc["verified_at"] = _ts(self.verified_at)
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "verification record") -> Verification:
        """Parse a verification record; raises ``DamagedBackup`` naming ``where``."""
        doc = load_record(data, "verification record", where)
        try:
            doc["verified_at"] = _aware(doc["verified_at"], "verified_at")
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
        doc = asdict(self)
        doc["deleted_at"] = _ts(self.deleted_at)
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "tombstone") -> Tombstone:
        """Parse a tombstone; raises ``DamagedBackup`` naming ``where``."""
        doc = load_record(data, "tombstone", where)
        try:
            doc["deleted_at"] = _aware(doc["deleted_at"], "deleted_at")
            return cls(**doc)
        except (ValueError, KeyError, TypeError) as exc:
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
        doc = asdict(self)
        doc["started_at"] = _ts(self.started_at)
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "in-progress marker") -> PendingMarker:
        doc = load_record(data, "in-progress marker", where)
        try:
            doc["started_at"] = _aware(doc["started_at"], "started_at")
            return cls(**doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged("in-progress marker", where, exc) from exc
