"""Milvus verification needs no server: sha256 of every artifact; every Parquet file opens,
has exactly the Arrow schema the description implies and the row count the manifest records
(read in batches); the description builds a pymilvus ``CollectionSchema`` and ``IndexParams``
offline and passes the checks the server would make first (one primary key of a supported type,
a ``dim`` on every vector field, a ``max_length`` on every VARCHAR, indexes on existing fields).
"""

from __future__ import annotations

from typing import Any

from rag_backup import progress
from rag_backup.engines.milvus.artifacts import _where, local_artifact, read_description
from rag_backup.engines.milvus.common import ROWS
from rag_backup.engines.milvus.fingerprint import fingerprint_of
from rag_backup.engines.milvus.parquet import iter_parquet
from rag_backup.engines.milvus.schema import arrow_schema, build_index_params, build_schema
from rag_backup.errors import IntegrityError
from rag_backup.repository import BackupRecord, BackupRepository


def verify(repo: BackupRepository, record: BackupRecord, *, batch_rows: int = 4096
           ) -> dict[str, Any]:
    """sha256 of every artifact; each description re-creatable (offline); every Parquet file
    readable in batches with the described schema and the recorded row count."""
    manifest = record.manifest
    collections = fingerprint_of(record).collections
    listed = {a.path for a in manifest.artifacts}
    expected = set()
    checks: dict[str, Any] = {"artifacts": len(manifest.artifacts), "collections": 0,
                              "parquet_files": 0, "rows": 0}
    with progress.tracking(f"verifying milvus backup {record.partition_key}",
                           sum(c.rows for c in collections.values()), ROWS):
        for name, entry in collections.items():
            desc = read_description(repo, record, name)
            build_schema(desc)
            build_index_params(desc)
            schema = arrow_schema(desc)
            expected.add(entry.description)
            rows_in_collection = 0
            for path, rows in entry.files.items():
                expected.add(path)
                where = _where(record, path)
                counted = 0
                with local_artifact(repo, record, path) as local:
                    for batch in iter_parquet(local, schema, batch_rows, where):
                        counted += batch.num_rows
                        progress.advance(batch.num_rows, unit=ROWS)
                if counted != rows:
                    raise IntegrityError(f"{where} has {counted} rows, the manifest says {rows}")
                rows_in_collection += counted
                checks["parquet_files"] += 1
            if rows_in_collection != entry.rows:
                raise IntegrityError(f"milvus backup {record.partition_key}: collection {name!r} "
                                     f"has {rows_in_collection} rows in its files, the manifest "
                                     f"says {entry.rows}")
            checks["collections"] += 1
            checks["rows"] += rows_in_collection
    if listed != expected:
        raise IntegrityError(f"milvus backup {record.partition_key}: artifacts "
                             f"{sorted(listed ^ expected)[:10]} are in the manifest or the "
                             "fingerprint but not both")
    return checks
