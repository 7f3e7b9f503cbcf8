"""Rows <-> Arrow <-> Parquet: query results as record batches, batches as insertable rows,
batch sizes, the rolling ``part-NNNNN.parquet`` writer into the repository's artifact
stream, and the checked batch reader.

The reader holds about one batch whatever the file's size. pyarrow's ``ParquetFile`` pre-buffers
by default: ``iter_batches`` then reads every row group's column chunks of the file into a cache
that lives as long as the iteration (measured: a 1,000,000-row file of 384-d vectors, 1.4 GB,
peaked at 1.39 GB of Arrow memory read in 4,096-row batches; 96 MB for its 50,000-row sibling).
So ``iter_parquet`` turns pre-buffering off and reads each column chunk through a
``READ_BUFFER_BYTES`` buffer, page by page: bounded by a batch, a page and a dictionary page per
column, not by the file nor by its row groups (after: 30 MB of Arrow memory for both files; a
file written as one 250,000-row row group, 35 MB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pymilvus import DataType

from rag_backup.engines.milvus.common import MAX_BATCH, MIN_BATCH
from rag_backup.engines.milvus.schema import META_COLUMN, field_arrow_type
from rag_backup.errors import IntegrityError
from rag_backup.repository import PendingBackup

BATCH_TARGET_BYTES = 16 * 1024 * 1024  # raw bytes per batch when batch_rows is 0 (auto)
READ_BUFFER_BYTES = 1024 * 1024  # a column chunk is read through a buffer this size (see above)


def to_record_batch(rows: Sequence[Mapping[str, Any]], desc: Mapping[str, Any],
                    schema: pa.Schema, vectors: Mapping[str, np.ndarray] | None = None
                    ) -> pa.RecordBatch:
    """Rows as returned by ``query_iterator`` (dynamic fields flattened in) as one batch;
    ``vectors`` holds float vector columns already decoded (see ``take_float_vectors``)."""
    known = {f["name"] for f in desc["fields"]}
    vectors = vectors or {}
    columns = []
    for f in desc["fields"]:
        name, dtype = f["name"], DataType[f["type"]]
        if name in vectors:
            dim = int(f["params"]["dim"])
            flat = np.ascontiguousarray(vectors[name], dtype=np.float32).reshape(-1)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
            continue
        values = [r[name] for r in rows]
        if dtype == DataType.FLOAT_VECTOR:
            dim = int(f["params"]["dim"])
            flat = np.asarray(values, dtype=np.float32).reshape(len(rows) * dim)  # exact
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
        elif dtype == DataType.BINARY_VECTOR:
            columns.append(pa.array([v[0] if isinstance(v, list) else bytes(v) for v in values],
                                    field_arrow_type(f)))
        elif dtype == DataType.JSON:
            columns.append(pa.array([json.dumps(v, ensure_ascii=False) for v in values],
                                    pa.string()))
        else:
            columns.append(pa.array(values, field_arrow_type(f)))
    if desc["enable_dynamic_field"]:
        columns.append(pa.array([json.dumps({k: v for k, v in r.items() if k not in known},
                                            ensure_ascii=False) for r in rows], pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def rows_from_batch(batch: pa.RecordBatch, desc: Mapping[str, Any], *,
                    drop_primary: bool = False) -> list[dict[str, Any]]:
    """Insertable rows: float vectors as float32 arrays, JSON as its text (pymilvus sends a
    ``str`` for a JSON field verbatim), dynamic fields flattened back into the row."""
    columns: dict[str, Any] = {}
    for f in desc["fields"]:
        if drop_primary and f["is_primary"]:
            continue
        column = batch.column(f["name"])
        if DataType[f["type"]] == DataType.FLOAT_VECTOR:
            dim = int(f["params"]["dim"])
            columns[f["name"]] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        else:
            columns[f["name"]] = column.to_pylist()
    names = list(columns)
    rows = [{name: columns[name][i] for name in names} for i in range(batch.num_rows)]
    if desc["enable_dynamic_field"]:
        for row, meta in zip(rows, batch.column(META_COLUMN).to_pylist(), strict=True):
            row.update(json.loads(meta) if meta else {})
    return rows


def row_bytes(desc: Mapping[str, Any]) -> int:
    """A rough size of one row (vectors exact, variable-length fields guessed)."""
    size = 256 if desc["enable_dynamic_field"] else 0
    for f in desc["fields"]:
        dtype = DataType[f["type"]]
        if dtype == DataType.FLOAT_VECTOR:
            size += 4 * int(f["params"]["dim"])
        elif dtype == DataType.BINARY_VECTOR:
            size += int(f["params"]["dim"]) // 8
        elif dtype in (DataType.VARCHAR, DataType.JSON, DataType.ARRAY):
            size += 256
        else:
            size += 8
    return max(size, 1)


def auto_batch_rows(desc: Mapping[str, Any], requested: int = 0, *,
                    cap_bytes: int | None = None) -> int:
    """Rows per batch: ``requested``, or about ``BATCH_TARGET_BYTES`` of raw data; never more
    than ``cap_bytes`` (an insert must fit in one gRPC message)."""
    rows = requested or BATCH_TARGET_BYTES // row_bytes(desc)
    if cap_bytes:
        rows = min(rows, cap_bytes // row_bytes(desc))
    return max(MIN_BATCH, min(MAX_BATCH, rows))


class _ParquetSink:
    """The repository's write-only artifact stream as the file object pyarrow wants (it asks
    for ``closed``, ``tell`` and ``writable``). Closing it leaves the artifact to its owner."""

    def __init__(self, out: Any) -> None:
        self.out, self.position, self.closed = out, 0, False

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.out.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def write_parquet(pending: PendingBackup, prefix: str, batches: Iterator[pa.RecordBatch],
                  schema: pa.Schema, rows_per_file: int) -> dict[str, int]:
    """Write ``batches`` as ``<prefix>/part-NNNNN.parquet`` artifacts, a new file every
    ``rows_per_file`` rows; returns ``{artifact: rows}``. No file for no rows."""
    files: dict[str, int] = {}
    # Dictionary encoding is for repeated values, never for vectors (wasted work and memory).
    dictionary = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)
                  and not pa.types.is_fixed_size_binary(f.type)]
    carry: pa.RecordBatch | None = next(batches, None)
    while carry is not None:
        name = f"{prefix}/part-{len(files):05d}.parquet"
        rows = 0
        with pending.artifact(name) as out:
            writer = pq.ParquetWriter(_ParquetSink(out), schema, compression="zstd",
                                      write_page_checksum=True, use_dictionary=dictionary)
            while carry is not None and rows < rows_per_file:
                room = rows_per_file - rows
                chunk, carry = (carry, None) if carry.num_rows <= room else \
                    (carry.slice(0, room), carry.slice(room))
                if chunk.num_rows:
                    writer.write_batch(chunk)
                    rows += chunk.num_rows
                if carry is None:
                    carry = next(batches, None)
            writer.close()
        files[name] = rows
    return files


def iter_parquet(path: Path, schema: pa.Schema, batch_rows: int, where: str
                 ) -> Iterator[pa.RecordBatch]:
    """Batches of a Parquet file that must have exactly ``schema``; ``IntegrityError`` (naming
    ``where``) for an unreadable file or another schema. Memory: about a batch (module doc)."""
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False,
                                 buffer_size=READ_BUFFER_BYTES)
        if not parquet.schema_arrow.equals(schema):
            raise IntegrityError(f"{where} has the schema {parquet.schema_arrow}, the collection "
                                 f"description implies {schema}")
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield batch
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IntegrityError(f"{where} is not a readable Parquet file: {exc}") from exc
