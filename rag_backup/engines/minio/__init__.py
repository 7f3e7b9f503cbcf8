"""MinIO (any S3 server): incremental, content-addressed snapshots of buckets, their
verification, garbage collection of unreferenced content, and point-in-time restores.

A backup is one snapshot per bucket (``snapshot``), the engine's artifacts: written through
``PendingBackup.artifact``, read through the repository's artifact API. The objects' contents
are blobs in the repository's content-addressed blob store (``repo.blobs``, whose layout is
described in ``rag_backup/repository/blobs.py``), named by their sha256 and shared by every
backup. The engine never builds a path or a key of the repository, and never reaches its
storage except through the repository.

One concern per module:

- ``client``: the S3 endpoint, its two clients (MinIO's SDK, boto3), error translation;
- ``objects``: per-object reads (listing, HEAD, tags, GETs pinned to a version);
- ``snapshot``: the format (``ObjectEntry``, the JSON-lines snapshot, its versions) and the
  backup's fingerprint (``MinioFingerprint``);
- ``backup``: the incremental backup (listing walk, copier, tag reading);
- ``verify``: verification of a backup;
- ``gc``: which blobs the snapshots reference (the rest of garbage collection is the blob
  store's);
- ``preflight``, ``restore``, ``compare``: a restore's pre-flight, the restore, and the
  comparison of a bucket with a snapshot;
- ``scratch``: removing a scratch bucket.
"""

from rag_backup.engines.minio.backup import (
    BackupOutcome,
    BucketStats,
    backup,
    choose_reuse_source,
    probe_bucket,
)
from rag_backup.engines.minio.client import (
    S3Endpoint,
    check_bucket_name,
    refuse_repository_bucket,
    repository_bucket,
    s3_errors,
    translate,
)
from rag_backup.engines.minio.common import (
    CHUNK,
    DEFAULT_GC_GRACE,
    DEFAULT_WORKERS,
    STORE,
    Log,
)
from rag_backup.engines.minio.compare import compare_bucket
from rag_backup.engines.minio.gc import GcReport, collect_garbage, referenced_blobs
from rag_backup.engines.minio.objects import TAG_COUNT_HEADER, _tag_header
from rag_backup.engines.minio.preflight import Preflight
from rag_backup.engines.minio.restore import (
    BucketRestore,
    RestoreAborted,
    RestoreDiffers,
    RestoreReport,
    restore,
)
from rag_backup.engines.minio.scratch import remove_bucket
from rag_backup.engines.minio.snapshot import (
    READABLE_VERSIONS,
    SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
    BucketCounts,
    MinioFingerprint,
    ObjectEntry,
    Transfer,
    check_snapshot,
    fingerprint_of,
    read_snapshot,
    snapshot_buckets,
    snapshot_name,
)
from rag_backup.engines.minio.verify import (
    DEFAULT_FULL_VERIFY_BYTES,
    DEFAULT_ROTATION_DAYS,
    _in_slot,
    _rotation_slot,
    verify,
)
from rag_backup.repository.blobs import BLOB_PREFIX, TMP_PREFIX, blob_key, blob_sha

__all__ = [
    "BLOB_PREFIX", "CHUNK", "DEFAULT_FULL_VERIFY_BYTES", "DEFAULT_GC_GRACE",
    "DEFAULT_ROTATION_DAYS", "DEFAULT_WORKERS", "READABLE_VERSIONS", "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION", "STORE", "TAG_COUNT_HEADER", "TMP_PREFIX", "BackupOutcome",
    "BucketCounts", "BucketRestore", "BucketStats", "GcReport", "Log", "MinioFingerprint",
    "ObjectEntry", "Preflight", "RestoreAborted", "RestoreDiffers", "RestoreReport",
    "S3Endpoint", "Transfer", "_in_slot", "_rotation_slot", "_tag_header", "backup",
    "blob_key", "blob_sha", "check_bucket_name", "check_snapshot", "choose_reuse_source",
    "collect_garbage", "compare_bucket", "fingerprint_of", "probe_bucket", "read_snapshot",
    "referenced_blobs", "refuse_repository_bucket", "remove_bucket", "repository_bucket",
    "restore", "s3_errors", "snapshot_buckets", "snapshot_name", "translate", "verify",
]
