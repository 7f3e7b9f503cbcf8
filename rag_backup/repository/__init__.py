"""Where backups live: backends, manifests, atomic commit, listing, deletion, retention."""

from rag_backup.repository.backends import (
    Backend,
    FilesystemBackend,
    S3Backend,
    backend_from_url,
)
from rag_backup.repository.manifest import (
    Artifact,
    BackupOutcome,
    Manifest,
    Tombstone,
    Verification,
)
from rag_backup.repository.repository import LATEST, BackupRecord, BackupRepository, PendingBackup
from rag_backup.repository.retention import RetentionDecision, plan_retention

__all__ = [
    "LATEST", "Artifact", "Backend", "BackupOutcome", "BackupRecord", "BackupRepository",
    "FilesystemBackend",
    "Manifest", "PendingBackup", "RetentionDecision", "S3Backend", "Tombstone", "Verification",
    "backend_from_url", "plan_retention",
]
