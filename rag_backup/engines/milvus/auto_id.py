"""Restoring auto_id collections with their ids. Milvus 2.3 refuses explicit primary keys on
insert into an auto_id collection ("the number of fields is less than needed") and in
row-based/numpy bulk imports ("the primary key is auto-generated, no need to provide"); only its
backup-mode bulk import (what milvus-backup uses) keeps them, and it reads Milvus's own binlogs
from the server's storage. So ``auto_id_mode="import"`` inserts the rows into a hidden loader
collection (same schema, auto_id off), flushes it, and bulk-imports the loader's binlogs
(``<storage root>/insert_log/<collection id>/<partition id>/``) into the auto_id target,
partition by partition: ids kept, auto_id kept, new inserts still get generated ids. This needs
the storage root as the server sees it (``localStorage.path`` for local storage, e.g. the
embedded standalone's data directory; ``minio.rootPath``, default ``files``, for MinIO/S3). A
wrong root imports 0 rows: caught by the row count.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Mapping
from typing import Any

from pymilvus import MilvusClient
from pymilvus.client.prepare import Prepare

from rag_backup import progress
from rag_backup.engines.milvus.client import MilvusServer, calls
from rag_backup.engines.milvus.common import Log
from rag_backup.engines.milvus.fingerprint import CollectionFingerprint
from rag_backup.engines.milvus.staging import STAGING_TAG, _create, _drop, _insert_files
from rag_backup.errors import IntegrityError, InvalidRequest, ToolError
from rag_backup.repository import BackupRecord, BackupRepository

LOADER_TAG = "__ld_"


def _partition_ids(client: MilvusClient, server: MilvusServer, name: str) -> dict[str, int]:
    """Partition name -> id. MilvusClient lists names only; ShowPartitions has the ids."""
    with calls(server, f"listing the partitions of {name!r}"):
        handler = client._get_connection()
        response = handler._stub.ShowPartitions(Prepare.show_partitions_request(name),
                                                timeout=server.timeout_s)
    if response.status.code != 0 or response.status.error_code != 0:
        raise ToolError(f"{server.describe()}: listing the partitions of {name!r}: "
                        f"{response.status.reason}")
    return dict(zip(response.partition_names, response.partitionIDs, strict=True))


def _wait_import(client: MilvusClient, server: MilvusServer, task: int, what: str) -> int:
    handler = client._get_connection()
    deadline = time.monotonic() + server.long_timeout_s
    while True:
        with calls(server, what):
            state = handler.get_bulk_insert_state(task, timeout=server.timeout_s)
        if state.state_name == "Completed":
            return int(state.row_count)
        if state.state_name.startswith("Failed"):
            raise ToolError(f"{server.describe()}: {what} failed: "
                            f"{state.infos.get('failed_reason') or state.state_name}")
        if time.monotonic() > deadline:
            raise ToolError(f"{server.describe()}: {what} did not complete within "
                            f"{server.long_timeout_s:.0f} s (state {state.state_name})")
        progress.checkpoint()
        time.sleep(0.5)


def _import_auto_id(client: MilvusClient, server: MilvusServer, repo: BackupRepository,
                    record: BackupRecord, entry: CollectionFingerprint,
                    desc: Mapping[str, Any], staging: str, batch_rows: int, log: Log) -> None:
    """Rows with their original ids into the auto_id collection ``staging``: through a loader
    collection (auto_id off) whose flushed binlogs the server bulk-imports in backup mode."""
    if not server.storage_root:
        raise InvalidRequest(
            f"collection {desc['name']!r} has an auto_id primary key: keeping its ids needs "
            "Milvus's backup-mode bulk import, which reads the server's own storage. Set the "
            "storage root as the server sees it (RAG_MILVUS_STORAGE_ROOT / storage_root: "
            "localStorage.path for local storage, minio.rootPath such as 'files' for MinIO), or "
            "choose auto_id_mode 'explicit_ids' (ids kept, primary key no longer auto_id) or "
            "'new_ids' (new ids)")
    loader = staging.replace(STAGING_TAG, LOADER_TAG)
    _create(client, server, loader, desc, auto_id=False, indexes=False)
    try:
        _insert_files(client, server, repo, record, entry, desc, loader, batch_rows,
                      drop_primary=False, log=log)
        with calls(server, f"flushing {loader!r}"):
            client.flush(loader, timeout=server.long_timeout_s)
            collection_id = client.describe_collection(loader, timeout=server.timeout_s)[
                "collection_id"]
            segments = client.list_persistent_segments(loader, timeout=server.timeout_s)
        rows_by_partition: dict[int, int] = {}
        for segment in segments:
            rows_by_partition[segment.partition_id] = rows_by_partition.get(
                segment.partition_id, 0) + int(segment.num_rows)
        handler = client._get_connection()
        for partition, partition_id in _partition_ids(client, server, loader).items():
            expected = rows_by_partition.get(partition_id, 0)
            if not expected:
                continue
            base = posixpath.join(server.storage_root, "{}", str(collection_id),
                                  str(partition_id)) + "/"
            files = [base.format("insert_log"), base.format("delta_log")]
            what = f"bulk import of partition {partition!r} into {staging!r} from {files[0]}"
            with calls(server, what):
                task = handler.do_bulk_insert(staging, partition, files,
                                              timeout=server.timeout_s, backup="true")
            imported = _wait_import(client, server, task, what)
            if imported != expected:
                hint = (" (the storage root is probably wrong: it must be the server's "
                        "localStorage.path, or minio.rootPath for MinIO)") if imported == 0 \
                    else " (the loader's segments were compacted meanwhile; retry the restore)"
                raise IntegrityError(f"{what}: imported {imported} rows, the loader holds "
                                     f"{expected}{hint}")
            log(f"{staging}: bulk-imported {imported} rows of partition {partition!r} with "
                "their ids")
    finally:
        _drop(client, server, loader)
