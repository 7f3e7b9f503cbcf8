"""Milvus: collections streamed to Parquet with an iterator, verified offline, restored by name.

A backup holds, per collection of the configured database, its description (``schema.json``)
and its rows in Parquet files; verification needs no server; a restore fills a staging
collection, checks it against the manifest and only then puts it in the target's place. The
engine reads and writes a backup only through the repository (``PendingBackup.artifact``,
``stream_artifact``, ``local_artifact_path``): it never builds a path of the repository and
never touches its backend.

One concern per module:

- ``common``: the store's name, batch limits, the log callback;
- ``client``: the server (``MilvusServer``, its sessions), pymilvus/gRPC failures as our errors
  (``translate``, ``calls``), version, listing, row counts, load state;
- ``schema``: the collection description (``schema.json``): read from the server, the Arrow
  schema it implies, a pymilvus schema and index params re-built from it offline;
- ``probes``: the probe searches recorded at backup time and re-run on a restored copy;
- ``parquet``: rows <-> Arrow <-> Parquet, batch sizes;
- ``fingerprint``: the backup's fingerprint, typed (``MilvusFingerprint``, ``fingerprint_of``);
- ``artifacts``: reading a backup's artifacts (checked, as a local file; the descriptions);
- ``backup``, ``verify``: the backup and its verification;
- ``staging``, ``auto_id``, ``restore``: the staging collection (create, fill, index, swap in),
  the backup-mode bulk import that keeps auto_id primary keys, and the restore;
- ``scratch``: verbs for recovery and the restore drill (dropping scratch collections, reading
  every primary key).
"""

from rag_backup.engines.milvus.backup import DEFAULT_ROWS_PER_FILE, BackupOutcome, backup
from rag_backup.engines.milvus.client import MilvusServer, calls, check_connection, translate
from rag_backup.engines.milvus.common import ALL_PARTITIONS, MAX_BATCH, MIN_BATCH, STORE, Log
from rag_backup.engines.milvus.fingerprint import (
    CollectionFingerprint,
    MilvusFingerprint,
    fingerprint_of,
)
from rag_backup.engines.milvus.parquet import auto_batch_rows
from rag_backup.engines.milvus.probes import PROBES
from rag_backup.engines.milvus.restore import (
    AUTO_ID_MODES,
    CollectionRestore,
    RestoreReport,
    restore,
)
from rag_backup.engines.milvus.schema import (
    arrow_schema,
    build_index_params,
    build_schema,
    check_description,
    describe,
)
from rag_backup.engines.milvus.scratch import drop_collections, iter_primary_keys
from rag_backup.engines.milvus.staging import _wait_indexes
from rag_backup.engines.milvus.verify import verify

__all__ = [
    "ALL_PARTITIONS", "AUTO_ID_MODES", "DEFAULT_ROWS_PER_FILE", "MAX_BATCH", "MIN_BATCH",
    "PROBES", "STORE", "BackupOutcome", "CollectionFingerprint", "CollectionRestore", "Log",
    "MilvusFingerprint", "MilvusServer", "RestoreReport", "_wait_indexes", "arrow_schema",
    "auto_batch_rows", "backup", "build_index_params", "build_schema", "calls",
    "check_connection", "check_description", "describe", "drop_collections", "fingerprint_of",
    "iter_primary_keys", "restore", "translate", "verify",
]
