"""The records kept in the repository: manifests (commit records), verifications, tombstones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from rag_backup.errors import IntegrityError

FORMAT_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat()


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
        try:
            doc = json.loads(data)
            if doc.get("format_version") != FORMAT_VERSION:
                raise IntegrityError(f"manifest {where} has format_version "
                                     f"{doc.get('format_version')!r}; this version reads "
                                     f"{FORMAT_VERSION}")
            return cls(
                store=doc["store"], partition_key=doc["partition_key"],
                backup_id=doc["backup_id"], run_id=doc["run_id"],
                started_at=datetime.fromisoformat(doc["started_at"]),
                ended_at=datetime.fromisoformat(doc["ended_at"]),
                tool_versions=dict(doc["tool_versions"]), server_version=doc["server_version"],
                fingerprint=doc["fingerprint"],
                artifacts=tuple(Artifact(**a) for a in doc["artifacts"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"manifest {where} is unreadable: {exc}") from exc


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
    def from_json(cls, data: bytes) -> Verification:
        doc = json.loads(data)
        doc["verified_at"] = datetime.fromisoformat(doc["verified_at"])
        return cls(**doc)


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
    def from_json(cls, data: bytes) -> Tombstone:
        doc = json.loads(data)
        doc["deleted_at"] = datetime.fromisoformat(doc["deleted_at"])
        return cls(**doc)
