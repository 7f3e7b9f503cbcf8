"""The fingerprint of a Milvus backup, typed: ``MilvusFingerprint`` with a
``CollectionFingerprint`` per collection; ``to_dict``/``from_dict`` keep the dict the
manifest has always recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rag_backup import repository
from rag_backup.engines.milvus.common import STORE
from rag_backup.repository import BackupRecord


@dataclass(frozen=True)
class CollectionFingerprint:
    """One collection of a backup: the rows written (per partition, ``ALL_PARTITIONS`` for a
    partition-key collection, and per Parquet artifact), ``count(*)`` before and after the
    backup and whether the three agree, auto_id, and its description artifact."""

    rows: int
    rows_before: int
    rows_after: int
    consistent: bool
    auto_id: bool
    partitions: dict[str, int]
    files: dict[str, int]
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "rows_before": self.rows_before, "rows_after": self.rows_after,
                "consistent": self.consistent, "auto_id": self.auto_id,
                "partitions": self.partitions, "files": self.files,
                "description": self.description}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> CollectionFingerprint:
        rows = int(doc["rows"])
        return cls(rows, int(doc.get("rows_before", rows)), int(doc.get("rows_after", rows)),
                   bool(doc.get("consistent", True)), bool(doc.get("auto_id", False)),
                   {str(k): int(v) for k, v in doc["partitions"].items()},
                   {str(k): int(v) for k, v in doc["files"].items()}, str(doc["description"]))


@dataclass(frozen=True)
class MilvusFingerprint:
    """What a Milvus backup holds: the database and each collection's fingerprint; the totals
    are sums over the collections. ``to_dict`` is what the manifest stores (``{"database",
    "collections": {name: CollectionFingerprint.to_dict()}, "rows", "rows_before",
    "rows_after", "consistent"}``), the same dict as every release wrote."""

    database: str
    collections: dict[str, CollectionFingerprint]

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.collections.values())

    @property
    def rows_before(self) -> int:
        return sum(c.rows_before for c in self.collections.values())

    @property
    def rows_after(self) -> int:
        return sum(c.rows_after for c in self.collections.values())

    @property
    def consistent(self) -> bool:
        return all(c.consistent for c in self.collections.values())

    @property
    def parquet_files(self) -> int:
        return sum(len(c.files) for c in self.collections.values())

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database,
                "collections": {name: c.to_dict() for name, c in self.collections.items()},
                "rows": self.rows, "rows_before": self.rows_before,
                "rows_after": self.rows_after, "consistent": self.consistent}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> MilvusFingerprint:
        """The dict form back (totals optional); ``ValueError`` if a total disagrees."""
        found = cls(str(doc.get("database", "")),
                    {str(name): CollectionFingerprint.from_dict(c)
                     for name, c in doc["collections"].items()})
        repository.check_totals(doc, found, ("rows", "rows_before", "rows_after", "consistent"),
                                "collections")
        return found


def fingerprint_of(source: BackupRecord | repository.Manifest | repository.BackupOutcome
                   ) -> MilvusFingerprint:
    """The typed fingerprint of a backup (its record or manifest) or of a backup's outcome;
    an invalid one raises ``DamagedBackup`` naming the backup."""
    return repository.typed_fingerprint(source, STORE, MilvusFingerprint.from_dict)


