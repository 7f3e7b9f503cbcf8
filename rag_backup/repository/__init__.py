"""Where backups live: backends, manifests, atomic commit, listing, deletion, retention, and the
content-addressed blob store."""

from rag_backup.repository.backends import (
    Backend,
    FilesystemBackend,
    IncompleteUpload,
    S3Backend,
    backend_from_url,
)
from rag_backup.repository.blobs import (
    BLOB_PREFIX,
    TMP_PREFIX,
    BlobCollection,
    BlobInfo,
    BlobStore,
    BlobWriter,
    blob_key,
    blob_sha,
)
from rag_backup.repository.manifest import (
    Artifact,
    BackupOutcome,
    Manifest,
    PendingMarker,
    Tombstone,
    Verification,
)
from rag_backup.repository.repository import (
    DEFAULT_STALE_AGE,
    LATEST,
    BackupRecord,
    BackupRepository,
    DamagedRecord,
    PendingBackup,
    RepositoryListing,
    StaleWrite,
    check_totals,
    typed_fingerprint,
)
from rag_backup.repository.retention import RetentionDecision, plan_retention
from rag_backup.repository.wal import WAL_ROOT, WalSegment, WalStore

__all__ = [
    "BLOB_PREFIX", "TMP_PREFIX", "BlobCollection", "BlobInfo", "BlobStore", "BlobWriter",
    "blob_key", "blob_sha", "DEFAULT_STALE_AGE", "LATEST", "Artifact", "Backend",
    "BackupOutcome", "BackupRecord",
    "BackupRepository", "DamagedRecord", "FilesystemBackend", "IncompleteUpload", "Manifest",
    "PendingBackup", "PendingMarker", "RepositoryListing", "RetentionDecision", "S3Backend",
    "StaleWrite", "Tombstone", "Verification", "backend_from_url", "plan_retention",
    "check_totals", "typed_fingerprint", "WAL_ROOT", "WalSegment", "WalStore",
]
