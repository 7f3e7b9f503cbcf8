"""Milvus: collections streamed to Parquet with an iterator, verified offline, restored by name.

Backup, per collection of the configured database: a description (``<collection>/schema.json``:
every field with its params, primary key, auto_id, dynamic field, partition key, description,
consistency level, shards, properties, aliases, partitions and index definitions, plus a few
"probe" vectors with their top-k results on the source) and the rows, read partition by
partition with the server's iterator mode, paginated by a primary-key cursor as pymilvus's
``query_iterator`` does (never the 16,384-row query window; see ``_iterate`` for why it is driven
here), converted batch by batch to Arrow and written with ``pyarrow.parquet.ParquetWriter``
straight into the repository's artifact stream (``<collection>/<partition>/part-NNNNN.parquet``,
a new file every ``rows_per_file`` rows, a row group per batch, zstd, page checksums). Memory is
bounded by one batch whatever the collection's size. ``count(*)`` is read before and after: a
difference means writes during the backup (both are reported; the rows written are what a
restore restores). A collection that is not loaded is loaded for the backup and released again.

Verification needs no server: sha256 of every artifact; every Parquet file opens, has exactly
the Arrow schema the description implies and the row count the manifest records (read in
batches); the description builds a pymilvus ``CollectionSchema`` and ``IndexParams`` offline and
passes the checks the server would make first (one primary key of a supported type, a ``dim``
on every vector field, a ``max_length`` on every VARCHAR, indexes on existing fields).

Restore: the rows go into a staging collection created with the same schema, partitions and
indexes (same params); it is flushed, indexed, loaded, and compared with the manifest (row
counts per partition and in total, and the probe searches) before it is renamed into place. An
existing target is dropped (its aliases moved over first) only when ``confirm`` names it and
only after the staging copy matched. Primary keys are kept. auto_id collections: Milvus 2.3
refuses explicit primary keys on insert into an auto_id collection ("the number of fields is
less than needed") and in row-based/numpy bulk imports ("the primary key is auto-generated, no
need to provide"); only its backup-mode bulk import (what milvus-backup uses) keeps them, and it
reads Milvus's own binlogs from the server's storage. So ``auto_id_mode="import"`` inserts the
rows into a hidden loader collection (same schema, auto_id off), flushes it, and bulk-imports
the loader's binlogs (``<storage root>/insert_log/<collection id>/<partition id>/``) into the
auto_id target, partition by partition: ids kept, auto_id kept, new inserts still get generated
ids. This needs the storage root as the server sees it (``localStorage.path`` for local storage,
e.g. the embedded standalone's data directory; ``minio.rootPath``, default ``files``, for
MinIO/S3). A wrong root imports 0 rows: caught by the row count. Alternatives:
``explicit_ids`` (ids kept, the restored primary key is not auto_id) and ``new_ids`` (schema
kept, the server assigns new ids: references from other stores break).
"""

from __future__ import annotations

import json
import math
import posixpath
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pymilvus
from pymilvus import DataType, MilvusClient
from pymilvus.client.constants import (
    COLLECTION_ID,
    GUARANTEE_TIMESTAMP,
    ITERATOR_FIELD,
    ITERATOR_SESSION_TS_FIELD,
    REDUCE_STOP_FOR_BEST,
)
from pymilvus.client.prepare import Prepare
from pymilvus.client.utils import mkts_from_datetime
from pymilvus.exceptions import MilvusException

from rag_backup import repository
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    IntegrityError,
    InvalidRequest,
    RagBackupError,
    StoreUnreachable,
    ToolError,
)
from rag_backup.repository import Artifact, BackupRecord, BackupRepository, PendingBackup

STORE = "milvus"
DESCRIPTION_FILE = "schema.json"
DESCRIPTION_FORMAT = 1
ALL_PARTITIONS = "_all"  # directory of a partition-key collection's rows (not per partition)
META_COLUMN = "$meta"  # the dynamic fields of a row, as JSON text
MAX_BATCH = 16384  # pymilvus refuses larger iterator batches; the server's query window
MIN_BATCH = 64
BATCH_TARGET_BYTES = 16 * 1024 * 1024  # raw bytes per batch when batch_rows is 0 (auto)
INSERT_CAP_BYTES = 32 * 1024 * 1024  # an insert request stays well below gRPC's 64 MB limit
DEFAULT_ROWS_PER_FILE = 500_000
PROBES = 5
PROBE_LIMIT = 10
TIE_TOLERANCE = 1e-5
AUTO_ID_MODES = ("import", "explicit_ids", "new_ids")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 255
STAGING_TAG = "__rst_"
LOADER_TAG = "__ld_"
INDEX_META_KEYS = {"field_name", "index_name", "index_type", "metric_type", "total_rows",
                   "indexed_rows", "pending_index_rows", "state", "index_state_fail_reason"}
Log = Callable[[str], None]

SCALAR_ARROW: dict[DataType, pa.DataType] = {
    DataType.BOOL: pa.bool_(), DataType.INT8: pa.int8(), DataType.INT16: pa.int16(),
    DataType.INT32: pa.int32(), DataType.INT64: pa.int64(), DataType.FLOAT: pa.float32(),
    DataType.DOUBLE: pa.float64(), DataType.VARCHAR: pa.string(), DataType.JSON: pa.string(),
}
ARRAY_ELEMENTS = {t for t in SCALAR_ARROW if t != DataType.JSON}
VECTOR_TYPES = {DataType.FLOAT_VECTOR, DataType.BINARY_VECTOR}
SUPPORTED_TYPES = set(SCALAR_ARROW) | VECTOR_TYPES | {DataType.ARRAY}
FIELD_PARAMS = ("dim", "max_length", "max_capacity")
FIELD_OPTIONS = ("nullable", "default_value")  # recorded when the server reports them (2.4+)


def _quiet(_: str) -> None:
    pass


# -- the server ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MilvusServer:
    """How to reach a Milvus server. The token travels in gRPC metadata only, never in a message.

    ``storage_root`` is where the server keeps its binlogs, as the server sees it (see the
    module's docstring); only restores of auto_id collections in ``import`` mode need it.
    """

    uri: str
    token: str = field(repr=False, default="")
    db_name: str = "default"
    timeout_s: float = 120.0
    long_timeout_s: float = 3600.0
    storage_root: str = ""

    def describe(self) -> str:
        parts = urlsplit(self.uri)
        netloc = parts.hostname or parts.netloc.rpartition("@")[2]
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        shown = urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else netloc
        return f"Milvus {shown} (database {self.db_name!r})"

    @contextmanager
    def session(self) -> Iterator[MilvusClient]:
        """A client of its own (not shared with other callers), closed afterwards."""
        with calls(self, "connecting"):
            client = MilvusClient(uri=self.uri, token=self.token, db_name=self.db_name,
                                  timeout=self.timeout_s, dedicated=True)
        try:
            yield client
        finally:
            with suppress(Exception):
                client.close()


UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def translate(server: MilvusServer, what: str, exc: BaseException) -> RagBackupError:
    """A pymilvus/gRPC failure as one of our errors, naming the server and what we did."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    message = getattr(exc, "message", None) or (exc.details() if isinstance(exc, grpc.RpcError)
                                                else str(exc)) or type(exc).__name__
    text = f"{server.describe()}: {what}: {message}"
    lowered = message.lower()
    if code in UNREACHABLE_CODES or code == 2 and "fail connecting" in lowered or \
            "unavailable" in lowered or "retry timeout" in lowered:
        return StoreUnreachable(f"{text} (is the server up and RAG_MILVUS_URI right?)")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, 1800) or \
            "auth" in lowered and ("fail" in lowered or "denied" in lowered):
        return CredentialsRejected(f"{text}; check RAG_MILVUS_TOKEN")
    if code == 800 or "database not found" in lowered:
        return InvalidRequest(f"{server.describe()} has no database {server.db_name!r} "
                              f"({message}); check RAG_MILVUS_DB_NAME")
    if code == 100 or "collection not found" in lowered:
        return InvalidRequest(text)
    return ToolError(text)


@contextmanager
def calls(server: MilvusServer, what: str) -> Iterator[None]:
    """Translate failures of the Milvus calls in the block; our own errors pass through."""
    try:
        yield
    except RagBackupError:
        raise
    except (MilvusException, grpc.RpcError) as exc:
        raise translate(server, what, exc) from exc


def server_version(client: MilvusClient, server: MilvusServer) -> str:
    with calls(server, "reading the server version"):
        return str(client.get_server_version(timeout=server.timeout_s))


def list_collections(client: MilvusClient, server: MilvusServer) -> list[str]:
    with calls(server, "listing collections"):
        return sorted(client.list_collections(timeout=server.timeout_s))


def count_rows(client: MilvusClient, server: MilvusServer, name: str,
               partition: str | None = None) -> int:
    """Exact ``count(*)`` (Strong consistency) of a loaded collection or one of its partitions."""
    where = f"counting rows of {name!r}" + (f" partition {partition!r}" if partition else "")
    with calls(server, where):
        result = client.query(name, filter="", output_fields=["count(*)"],
                              partition_names=[partition] if partition else None,
                              consistency_level="Strong", timeout=server.long_timeout_s)
    return int(result[0]["count(*)"])


def _state(client: MilvusClient, server: MilvusServer, name: str) -> str:
    with calls(server, f"reading the load state of {name!r}"):
        state = client.get_load_state(name, timeout=server.timeout_s).get("state")
    return str(getattr(state, "name", state))


# -- the collection description ------------------------------------------------------------

def _field_record(f: Mapping[str, Any], collection: str) -> dict[str, Any]:
    dtype = DataType(f["type"])
    if dtype not in SUPPORTED_TYPES:
        raise InvalidRequest(f"collection {collection!r}: field {f['name']!r} has type "
                             f"{dtype.name}, which this version cannot back up (supported: "
                             f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    params = {k: int(v) for k, v in (f.get("params") or {}).items() if k in FIELD_PARAMS}
    element = f.get("element_type")
    record: dict[str, Any] = {
        "name": f["name"], "type": dtype.name, "description": f.get("description", ""),
        "is_primary": bool(f.get("is_primary", False)), "auto_id": bool(f.get("auto_id", False)),
        "is_partition_key": bool(f.get("is_partition_key", False)), "params": params,
        "element_type": DataType(element).name if element is not None else None,
    }
    if dtype == DataType.ARRAY and (element is None or DataType(element) not in ARRAY_ELEMENTS):
        raise InvalidRequest(f"collection {collection!r}: ARRAY field {f['name']!r} has "
                             f"element type {record['element_type']}, not supported")
    for option in FIELD_OPTIONS:
        if f.get(option) is not None and f.get(option) is not False:
            record[option] = f[option]
    return record


def _index_record(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"field_name": info["field_name"], "index_name": info["index_name"],
            "index_type": info.get("index_type", ""), "metric_type": info.get("metric_type"),
            "params": {k: v for k, v in info.items() if k not in INDEX_META_KEYS}}


def describe(client: MilvusClient, server: MilvusServer, name: str) -> dict[str, Any]:
    """Everything needed to re-create collection ``name`` (without its rows)."""
    with calls(server, f"describing collection {name!r}"):
        info = client.describe_collection(name, timeout=server.timeout_s)
        partitions = client.list_partitions(name, timeout=server.timeout_s)
        indexes = [client.describe_index(name, index, timeout=server.timeout_s)
                   for index in client.list_indexes(name, timeout=server.timeout_s)]
    if info.get("functions"):
        raise InvalidRequest(f"collection {name!r} has functions "
                             f"({[f.get('name') for f in info['functions']]}), which this "
                             "version cannot back up")
    fields = [_field_record(f, name) for f in info["fields"]]
    partition_key = next((f["name"] for f in fields if f["is_partition_key"]), None)
    return {
        "format": DESCRIPTION_FORMAT, "database": server.db_name, "name": name,
        "description": info.get("description", ""), "auto_id": bool(info.get("auto_id")),
        "enable_dynamic_field": bool(info.get("enable_dynamic_field")),
        "consistency_level": info.get("consistency_level_name") or "Bounded",
        "num_shards": int(info.get("num_shards") or 1),
        "num_partitions": int(info["num_partitions"]) if partition_key else None,
        "partition_key": partition_key,
        "properties": dict(info.get("properties") or {}),
        "aliases": sorted(info.get("aliases") or []),
        "fields": fields, "partitions": list(partitions),
        "indexes": [_index_record(i) for i in indexes],
    }


def primary_field(desc: Mapping[str, Any]) -> dict[str, Any]:
    return next(f for f in desc["fields"] if f["is_primary"])


def vector_fields(desc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [f for f in desc["fields"] if DataType[f["type"]] in VECTOR_TYPES]


def field_arrow_type(f: Mapping[str, Any]) -> pa.DataType:
    dtype = DataType[f["type"]]
    if dtype == DataType.FLOAT_VECTOR:
        return pa.list_(pa.float32(), int(f["params"]["dim"]))
    if dtype == DataType.BINARY_VECTOR:
        return pa.binary(int(f["params"]["dim"]) // 8)
    if dtype == DataType.ARRAY:
        return pa.list_(SCALAR_ARROW[DataType[f["element_type"]]])
    return SCALAR_ARROW[dtype]


def arrow_schema(desc: Mapping[str, Any]) -> pa.Schema:
    """The Parquet files' schema: one column per field (JSON as text), ``$meta`` if dynamic."""
    columns = [pa.field(f["name"], field_arrow_type(f)) for f in desc["fields"]]
    if desc["enable_dynamic_field"]:
        columns.append(pa.field(META_COLUMN, pa.string()))
    return pa.schema(columns)


def _typed(value: Any) -> Any:
    """Index params come back from the server as strings ('16'); re-create them typed."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        if value.strip().startswith(("{", "[")):
            with suppress(ValueError):
                return json.loads(value)
    return value


def build_schema(desc: Mapping[str, Any], *, auto_id: bool | None = None):
    """The pymilvus ``CollectionSchema`` of a description, built offline; ``auto_id`` overrides
    the primary key's flag (the loader of an auto_id restore has it off)."""
    check_description(desc)
    auto = desc["auto_id"] if auto_id is None else auto_id
    schema = MilvusClient.create_schema(auto_id=auto,
                                        enable_dynamic_field=desc["enable_dynamic_field"],
                                        description=desc["description"])
    for f in desc["fields"]:
        kwargs: dict[str, Any] = dict(f["params"])
        if f["element_type"]:
            kwargs["element_type"] = DataType[f["element_type"]]
        if f["is_primary"]:
            kwargs.update(is_primary=True, auto_id=auto)
        if f["is_partition_key"]:
            kwargs["is_partition_key"] = True
        for option in FIELD_OPTIONS:
            if option in f:
                kwargs[option] = f[option]
        schema.add_field(f["name"], DataType[f["type"]], description=f["description"], **kwargs)
    return schema


def build_index_params(desc: Mapping[str, Any]):
    params = MilvusClient.prepare_index_params()
    for index in desc["indexes"]:
        extra = {k: _typed(v) for k, v in index["params"].items()}
        if index["metric_type"]:
            extra["metric_type"] = index["metric_type"]
        params.add_index(field_name=index["field_name"], index_type=index["index_type"],
                         index_name=index["index_name"], **extra)
    return params


def check_description(desc: Mapping[str, Any]) -> None:
    """The checks the server makes first, without a server; ``IntegrityError`` names the fault."""
    where = f"collection description of {desc.get('name')!r}"
    try:
        if desc["format"] != DESCRIPTION_FORMAT:
            raise IntegrityError(f"{where} has format {desc['format']!r}; this version reads "
                                 f"{DESCRIPTION_FORMAT}")
        names = [f["name"] for f in desc["fields"]]
        primaries = [f for f in desc["fields"] if f["is_primary"]]
        problems = []
        if len(primaries) != 1:
            problems.append(f"{len(primaries)} primary keys")
        elif primaries[0]["type"] not in ("INT64", "VARCHAR"):
            problems.append(f"primary key of type {primaries[0]['type']}")
        if len(set(names)) != len(names):
            problems.append("duplicate field names")
        if not vector_fields(desc):
            problems.append("no vector field")
        for f in desc["fields"]:
            dtype = DataType[f["type"]]
            if dtype not in SUPPORTED_TYPES:
                problems.append(f"field {f['name']!r} of unsupported type {f['type']}")
            if dtype in VECTOR_TYPES and int(f["params"].get("dim", 0)) <= 0:
                problems.append(f"vector field {f['name']!r} without a dim")
            if dtype == DataType.BINARY_VECTOR and int(f["params"].get("dim", 0)) % 8:
                problems.append(f"binary vector field {f['name']!r} with a dim not divisible "
                                "by 8")
            if dtype == DataType.VARCHAR and int(f["params"].get("max_length", 0)) <= 0:
                problems.append(f"VARCHAR field {f['name']!r} without a max_length")
            if dtype == DataType.ARRAY and (not f["element_type"] or
                                            int(f["params"].get("max_capacity", 0)) <= 0):
                problems.append(f"ARRAY field {f['name']!r} without element type or capacity")
        for index in desc["indexes"]:
            if index["field_name"] not in names:
                problems.append(f"index {index['index_name']!r} on unknown field "
                                f"{index['field_name']!r}")
        if desc["partition_key"] is None and "_default" not in desc["partitions"]:
            problems.append("no _default partition")
        if problems:
            raise IntegrityError(f"{where} cannot be re-created: {'; '.join(problems)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{where} is malformed: {exc!r}") from exc


# -- rows <-> Arrow ------------------------------------------------------------------------

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


# -- backup --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    @property
    def rows(self) -> int:
        return self.fingerprint["rows"]

    @property
    def collections(self) -> dict[str, dict[str, Any]]:
        return self.fingerprint["collections"]


def tool_versions() -> dict[str, str]:
    return {"pymilvus": pymilvus.__version__, "pyarrow": pa.__version__}


def _varint_end(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def take_float_vectors(batch: Any) -> dict[str, np.ndarray]:
    """The float vector columns of a query result as ``(rows, dim)`` float32 arrays, decoded in
    one copy from the protobuf message, and taken out of the rows' lazy materialization.

    pymilvus (3.0) materializes a float vector cell by cell (``strict_float32`` goes through a
    sequence of Python floats), which costs about 20 times the raw bytes transiently. A proto3
    ``repeated float`` serializes packed: one tag byte, a varint length, then the little-endian
    float32 values, which numpy reads as they are. Without the (private) lazy field list, the
    rows are used as they come."""
    lazy = getattr(batch, "_lazy_field_data", None)
    if not isinstance(lazy, list):
        return {}
    columns: dict[str, np.ndarray] = {}
    kept = []
    for field_data in lazy:
        if field_data.type != DataType.FLOAT_VECTOR or len(field_data.valid_data):
            kept.append(field_data)
            continue
        raw = field_data.vectors.float_vector.SerializeToString()
        dim = int(field_data.vectors.dim)
        flat = np.frombuffer(raw, dtype="<f4", offset=_varint_end(raw, 1)) if raw else \
            np.zeros(0, dtype=np.float32)
        if dim <= 0 or flat.size != dim * len(batch):
            kept.append(field_data)
            continue
        columns[field_data.field_name] = flat.reshape(len(batch), dim)
    batch._lazy_field_data = kept
    return columns


def _pk_literal(value: Any) -> str:
    """A primary key as an expression literal (JSON quoting escapes quotes and backslashes)."""
    return str(int(value)) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)


def _iterate(client: MilvusClient, server: MilvusServer, name: str, partition: str | None,
             batch_rows: int, primary: str
             ) -> Iterator[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
    """Batches of rows (dynamic fields flattened in) with their float vector columns apart.

    The pagination of pymilvus's ``query_iterator`` (the server's iterator mode: results in
    primary key order, a pk cursor in the expression, one session timestamp for every batch),
    driven here so that a batch is never materialized row by row by pymilvus: its
    ``QueryIterator`` slices each result, which decodes every vector into Python objects and
    peaks at about 30 times the batch's raw size. Here a batch costs a few times its size."""
    where = f"reading collection {name!r}" + (f" partition {partition!r}" if partition else "")
    with calls(server, where):
        handler = client._get_connection()
        collection_id = client.describe_collection(name, timeout=server.timeout_s)[
            "collection_id"]
        options: dict[str, Any] = {ITERATOR_FIELD: "True", REDUCE_STOP_FOR_BEST: "True",
                                   COLLECTION_ID: collection_id}
        first = handler.query(name, expr="", output_fields=[], partition_names=[],
                              timeout=server.long_timeout_s, limit=1, **options)
        session_ts = int((getattr(first, "extra", None) or {}).get(ITERATOR_SESSION_TS_FIELD, 0))
        # Milvus 2.3 returns no session timestamp; pymilvus then uses the client's clock + 1 s
        options[GUARANTEE_TIMESTAMP] = session_ts or mkts_from_datetime(
            datetime.now(), milliseconds=1000.0)
    last: Any = None
    while True:
        expr = "" if last is None else f"{primary} > {_pk_literal(last)}"
        with calls(server, where):
            batch = handler.query(name, expr=expr, output_fields=["*"],
                                  partition_names=[partition] if partition else [],
                                  timeout=server.long_timeout_s, strict_float32=True,
                                  limit=batch_rows, **options)
        if not batch:
            return
        vectors = take_float_vectors(batch)
        rows = list(batch)  # the remaining lazy fields (strings, JSON, arrays) per row
        last = rows[-1][primary]
        yield rows, vectors


def iter_primary_keys(server: MilvusServer, name: str, *, batch_rows: int = 8192
                      ) -> Iterator[list[Any]]:
    """The primary keys of every entity of a loaded collection, in batches of at most
    ``batch_rows`` (the server's iterator: only the key field is read, memory is one batch)."""
    batch_rows = max(MIN_BATCH, min(batch_rows, MAX_BATCH))
    with server.session() as client:
        where = f"reading the primary keys of {name!r}"
        with calls(server, where):
            info = client.describe_collection(name, timeout=server.timeout_s)
            primary = next(f["name"] for f in info["fields"] if f.get("is_primary"))
            iterator = client.query_iterator(name, batch_size=batch_rows,
                                             output_fields=[primary],
                                             timeout=server.long_timeout_s)
        try:
            while True:
                with calls(server, where):
                    batch = iterator.next()
                if not batch:
                    return
                yield [row[primary] for row in batch]
        finally:
            with suppress(Exception):
                iterator.close()


def search_params(desc: Mapping[str, Any], index: Mapping[str, Any]) -> dict[str, Any]:
    """Search params that make the probe searches (close to) exact for the index type."""
    kind = (index.get("index_type") or "").upper()
    params = {k: _typed(v) for k, v in index["params"].items()}
    if kind == "HNSW":
        extra = {"ef": 512}
    elif kind.startswith("IVF") or kind in ("SCANN", "BIN_IVF_FLAT"):
        extra = {"nprobe": int(params.get("nlist", 1024))}
    elif kind == "DISKANN":
        extra = {"search_list": 512}
    else:
        extra = {}
    return {"metric_type": index.get("metric_type"), "params": extra}


def _probe_vector(f: Mapping[str, Any], value: Any) -> Any:
    if DataType[f["type"]] == DataType.BINARY_VECTOR:
        return (value[0] if isinstance(value, list) else bytes(value)).hex()
    return [float(x) for x in value]


def _query_vector(f: Mapping[str, Any], stored: Any) -> Any:
    if DataType[f["type"]] == DataType.BINARY_VECTOR:
        return bytes.fromhex(stored)
    return stored


def probe_search(client: MilvusClient, server: MilvusServer, name: str,
                 probes: Mapping[str, Any], vector: Any) -> tuple[list[Any], list[float]]:
    f = {"type": probes["field_type"]}
    with calls(server, f"searching collection {name!r}"):
        hits = client.search(name, data=[_query_vector(f, vector)],
                             anns_field=probes["field"], limit=probes["limit"],
                             search_params=probes["search_params"],
                             output_fields=[probes["primary"]], consistency_level="Strong",
                             timeout=server.long_timeout_s)[0]
    return [h["id"] for h in hits], [float(h["distance"]) for h in hits]


def backup_collection(client: MilvusClient, server: MilvusServer, name: str,
                      pending: PendingBackup, *, batch_rows: int = 0,
                      rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                      log: Log = _quiet) -> dict[str, Any]:
    """One collection into ``pending``; returns its fingerprint entry."""
    started = time.monotonic()
    desc = describe(client, server, name)
    state = _state(client, server, name)
    was_loaded = state != "NotLoad"  # "Loading": someone else's load, waited for, kept
    if state != "Loaded":
        log(f"{name}: {state}; loading it for the backup" +
            (" (released afterwards)" if not was_loaded else ""))
        with calls(server, f"loading collection {name!r} (it needs an index on every vector "
                           "field to load)"):
            client.load_collection(name, timeout=server.long_timeout_s)
    try:
        desc["loaded"] = state
        batch = auto_batch_rows(desc, batch_rows)
        schema = arrow_schema(desc)
        rows_before = count_rows(client, server, name)
        sampler = random.Random(f"{name}:{rows_before}")
        sample: list[dict[str, Any]] = []
        seen = 0
        index_by_field = {i["field_name"]: i for i in desc["indexes"]}
        probe_field = next((f for f in vector_fields(desc) if f["name"] in index_by_field), None)
        pk = primary_field(desc)["name"]

        def batches(partition: str | None) -> Iterator[pa.RecordBatch]:
            nonlocal seen
            for rows, vectors in _iterate(client, server, name, partition, batch, pk):
                if probe_field is not None:
                    column = vectors.get(probe_field["name"])
                    for i, row in enumerate(rows):  # reservoir sample of the probe rows
                        seen += 1
                        slot = len(sample) if len(sample) < PROBES else sampler.randrange(seen)
                        if slot < PROBES:
                            value = column[i] if column is not None else row[probe_field["name"]]
                            sample[slot:slot + 1] = [{"id": row[pk], "vector": _probe_vector(
                                probe_field, value)}]
                yield to_record_batch(rows, desc, schema, vectors)

        targets = [None] if desc["partition_key"] else desc["partitions"]
        files: dict[str, int] = {}
        per_partition: dict[str, int] = {}
        for partition in targets:
            label = partition or ALL_PARTITIONS
            written = write_parquet(pending, f"{name}/{label}", batches(partition), schema,
                                    rows_per_file)
            files.update(written)
            per_partition[label] = sum(written.values())
            log(f"{name}/{label}: {per_partition[label]} rows in {len(written)} Parquet files")
        rows_after = count_rows(client, server, name)
        rows = sum(per_partition.values())
        if probe_field is not None and sample:
            index = index_by_field[probe_field["name"]]
            probes: dict[str, Any] = {
                "field": probe_field["name"], "field_type": probe_field["type"], "primary": pk,
                "limit": min(PROBE_LIMIT, max(rows, 1)),
                "search_params": search_params(desc, index), "queries": []}
            for entry in sample:
                ids, distances = probe_search(client, server, name, probes, entry["vector"])
                probes["queries"].append({**entry, "ids": ids, "distances": distances})
            desc["probes"] = probes
        with pending.artifact(f"{name}/{DESCRIPTION_FILE}") as out:
            out.write(json.dumps(desc, indent=2, ensure_ascii=False, sort_keys=True).encode())
    finally:
        if not was_loaded:
            with suppress(RagBackupError), calls(server, f"releasing collection {name!r}"):
                client.release_collection(name, timeout=server.long_timeout_s)
    consistent = rows_before == rows_after == rows
    if not consistent:
        log(f"WARNING {name}: count(*) was {rows_before} before and {rows_after} after the "
            f"backup, {rows} rows were written: the collection changed during the backup")
    log(f"{name}: {rows} rows, {len(files)} files in {time.monotonic() - started:.1f} s")
    return {"rows": rows, "rows_before": rows_before, "rows_after": rows_after,
            "consistent": consistent, "auto_id": desc["auto_id"],
            "partitions": per_partition, "files": files,
            "description": f"{name}/{DESCRIPTION_FILE}"}


def backup(server: MilvusServer, pending: PendingBackup, *,
           collections: Sequence[str] | None = None, batch_rows: int = 0,
           rows_per_file: int = DEFAULT_ROWS_PER_FILE, log: Log = _quiet) -> BackupOutcome:
    """Every configured collection (default: all of the database) into ``pending``."""
    if batch_rows and not MIN_BATCH <= batch_rows <= MAX_BATCH:
        raise InvalidRequest(f"batch_rows must be between {MIN_BATCH} and {MAX_BATCH} (0: "
                             f"automatic), not {batch_rows}")
    if rows_per_file < 1:
        raise InvalidRequest(f"rows_per_file must be positive, not {rows_per_file}")
    with server.session() as client:
        version = server_version(client, server)
        available = list_collections(client, server)
        chosen = list(dict.fromkeys(collections)) if collections else available
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise InvalidRequest(f"{server.describe()} has no collection(s) "
                                 f"{', '.join(missing)}; it has: "
                                 f"{', '.join(available) or '(none)'}")
        per_collection = {name: backup_collection(client, server, name, pending,
                                                  batch_rows=batch_rows,
                                                  rows_per_file=rows_per_file, log=log)
                          for name in chosen}
    fingerprint = {
        "database": server.db_name,
        "collections": per_collection,
        "rows": sum(c["rows"] for c in per_collection.values()),
        "rows_before": sum(c["rows_before"] for c in per_collection.values()),
        "rows_after": sum(c["rows_after"] for c in per_collection.values()),
        "consistent": all(c["consistent"] for c in per_collection.values()),
    }
    return BackupOutcome(fingerprint, tool_versions(), version)


# -- reading a backup ------------------------------------------------------------------------

def _artifact(record: BackupRecord, path: str) -> Artifact:
    found = next((a for a in record.manifest.artifacts if a.path == path), None)
    if found is None:
        raise IntegrityError(f"milvus backup {record.partition_key}: the manifest lists no "
                             f"artifact {path}")
    return found


@contextmanager
def local_artifact(repo: BackupRepository, record: BackupRecord, path: str) -> Iterator[Path]:
    """A local file with the artifact's checked content (size and sha256 match the manifest):
    the file itself on a filesystem repository, else a temporary copy."""
    artifact = _artifact(record, path)
    local = getattr(repo.backend, "local_path", None)
    if local is not None:
        repo.stream_artifact(record, artifact)
        m = record.manifest
        yield local(f"{m.store}/{m.partition_key}/{m.backup_id}/{artifact.path}")
        return
    with tempfile.NamedTemporaryFile(prefix="rag-backup-milvus-", suffix=".part") as tmp:
        repo.stream_artifact(record, artifact, tmp.write)
        tmp.flush()
        yield Path(tmp.name)


def read_description(repo: BackupRepository, record: BackupRecord, name: str) -> dict[str, Any]:
    path = record.manifest.fingerprint["collections"][name]["description"]
    chunks: list[bytes] = []
    repo.stream_artifact(record, _artifact(record, path), chunks.append)
    try:
        desc = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise IntegrityError(f"milvus backup {record.partition_key}: {path} is not valid JSON: "
                             f"{exc}") from exc
    check_description(desc)
    return desc


def iter_parquet(path: Path, schema: pa.Schema, batch_rows: int, where: str
                 ) -> Iterator[pa.RecordBatch]:
    """Batches of a Parquet file that must have exactly ``schema``; ``IntegrityError`` (naming
    ``where``) for an unreadable file or another schema."""
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        if not parquet.schema_arrow.equals(schema):
            raise IntegrityError(f"{where} has the schema {parquet.schema_arrow}, the collection "
                                 f"description implies {schema}")
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield batch
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IntegrityError(f"{where} is not a readable Parquet file: {exc}") from exc


def _where(record: BackupRecord, path: str) -> str:
    return f"milvus backup {record.partition_key}: {record.location}/{path}"


# -- verify ----------------------------------------------------------------------------------

def verify(repo: BackupRepository, record: BackupRecord, *, batch_rows: int = 4096
           ) -> dict[str, Any]:
    """sha256 of every artifact; each description re-creatable (offline); every Parquet file
    readable in batches with the described schema and the recorded row count."""
    manifest = record.manifest
    collections = manifest.fingerprint["collections"]
    listed = {a.path for a in manifest.artifacts}
    expected = set()
    checks: dict[str, Any] = {"artifacts": len(manifest.artifacts), "collections": 0,
                              "parquet_files": 0, "rows": 0}
    for name, entry in collections.items():
        desc = read_description(repo, record, name)
        build_schema(desc)
        build_index_params(desc)
        schema = arrow_schema(desc)
        expected.add(entry["description"])
        rows_in_collection = 0
        for path, rows in entry["files"].items():
            expected.add(path)
            where = _where(record, path)
            counted = 0
            with local_artifact(repo, record, path) as local:
                for batch in iter_parquet(local, schema, batch_rows, where):
                    counted += batch.num_rows
            if counted != rows:
                raise IntegrityError(f"{where} has {counted} rows, the manifest says {rows}")
            rows_in_collection += counted
            checks["parquet_files"] += 1
        if rows_in_collection != entry["rows"]:
            raise IntegrityError(f"milvus backup {record.partition_key}: collection {name!r} "
                                 f"has {rows_in_collection} rows in its files, the manifest "
                                 f"says {entry['rows']}")
        checks["collections"] += 1
        checks["rows"] += rows_in_collection
    if listed != expected:
        raise IntegrityError(f"milvus backup {record.partition_key}: artifacts "
                             f"{sorted(listed ^ expected)[:10]} are in the manifest or the "
                             "fingerprint but not both")
    return checks


# -- restore ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectionRestore:
    source: str
    target: str
    rows: int
    rows_expected: int
    partitions: dict[str, tuple[int, int]]  # partition: (manifest, restored)
    replaced_existing: bool
    auto_id: bool
    auto_id_mode: str | None
    probes: int
    probes_identical: int
    probes_top1: int
    duration_s: float

    @property
    def matches_manifest(self) -> bool:
        return self.rows == self.rows_expected and all(a == b for a, b in
                                                       self.partitions.values())


@dataclass(frozen=True)
class RestoreReport:
    collections: list[CollectionRestore]
    duration_s: float

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.collections)

    @property
    def matches_manifest(self) -> bool:
        return all(c.matches_manifest for c in self.collections)


def _check_name(name: str, what: str) -> None:
    limit = MAX_NAME - len(STAGING_TAG) - 8
    if not NAME_RE.match(name) or len(name) > limit:
        raise InvalidRequest(f"{what} {name!r} is not a valid Milvus collection name (letters, "
                             f"digits and underscores, not starting with a digit, at most "
                             f"{limit} characters)")


def _exists(client: MilvusClient, server: MilvusServer, name: str) -> bool:
    with calls(server, f"checking for collection {name!r}"):
        return bool(client.has_collection(name, timeout=server.timeout_s))


def _create(client: MilvusClient, server: MilvusServer, name: str, desc: Mapping[str, Any], *,
            auto_id: bool | None = None, indexes: bool = True) -> None:
    """Create ``name`` like the description: schema, shards, consistency, partitions, indexes,
    properties."""
    kwargs: dict[str, Any] = {"num_shards": desc["num_shards"]}
    if desc["partition_key"]:
        kwargs["num_partitions"] = desc["num_partitions"]
    with calls(server, f"creating collection {name!r}"):
        client.create_collection(name, schema=build_schema(desc, auto_id=auto_id),
                                 consistency_level=desc["consistency_level"],
                                 timeout=server.timeout_s, **kwargs)
        if not desc["partition_key"]:
            for partition in desc["partitions"]:
                if partition != "_default":
                    client.create_partition(name, partition, timeout=server.timeout_s)
        if indexes and desc["indexes"]:
            client.create_index(name, build_index_params(desc), timeout=server.long_timeout_s)
        if desc["properties"]:
            client.alter_collection_properties(name, properties=desc["properties"],
                                               timeout=server.timeout_s)


def _drop(client: MilvusClient, server: MilvusServer, name: str) -> None:
    with suppress(RagBackupError), calls(server, f"dropping collection {name!r}"):
        if client.has_collection(name, timeout=server.timeout_s):
            client.drop_collection(name, timeout=server.timeout_s)


def _insert_files(client: MilvusClient, server: MilvusServer, repo: BackupRepository,
                  record: BackupRecord, entry: Mapping[str, Any], desc: Mapping[str, Any],
                  target: str, batch_rows: int, *, drop_primary: bool, log: Log) -> None:
    schema = arrow_schema(desc)
    for path in entry["files"]:
        partition = path.split("/")[-2]
        where = _where(record, path)
        inserted = 0
        with local_artifact(repo, record, path) as local:
            for batch in iter_parquet(local, schema, batch_rows, where):
                rows = rows_from_batch(batch, desc, drop_primary=drop_primary)
                with calls(server, f"inserting into {target!r} from {path}"):
                    client.insert(target, rows, timeout=server.long_timeout_s,
                                  partition_name=None if partition == ALL_PARTITIONS
                                  else partition)
                inserted += len(rows)
        log(f"{target}: inserted {inserted} rows from {path}")


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
        time.sleep(0.5)


def _import_auto_id(client: MilvusClient, server: MilvusServer, repo: BackupRepository,
                    record: BackupRecord, entry: Mapping[str, Any], desc: Mapping[str, Any],
                    staging: str, batch_rows: int, log: Log) -> None:
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


def _wait_indexes(client: MilvusClient, server: MilvusServer, name: str) -> None:
    deadline = time.monotonic() + server.long_timeout_s
    with calls(server, f"listing the indexes of {name!r}"):
        indexes = client.list_indexes(name, timeout=server.timeout_s)
    for index in indexes:
        while True:
            with calls(server, f"waiting for index {index!r} of {name!r}"):
                info = client.describe_index(name, index, timeout=server.timeout_s)
            state = str(info.get("state", ""))
            if state == "Failed":
                raise ToolError(f"{server.describe()}: building index {index!r} of {name!r} "
                                f"failed: {info.get('index_state_fail_reason', '')}")
            if state == "Finished" and not int(info.get("pending_index_rows", 0) or 0):
                break
            if time.monotonic() > deadline:
                raise ToolError(f"{server.describe()}: index {index!r} of {name!r} was not "
                                f"built within {server.long_timeout_s:.0f} s ({info})")
            time.sleep(0.5)


def _compare_probes(client: MilvusClient, server: MilvusServer, name: str,
                    desc: Mapping[str, Any]) -> tuple[int, int, int]:
    """Re-run the backup's probe searches; ``(probes, identical top-k, same top-1)``."""
    probes = desc.get("probes")
    if not probes:
        return 0, 0, 0
    identical = top1 = 0
    for query in probes["queries"]:
        ids, distances = probe_search(client, server, name, probes, query["vector"])
        identical += ids == query["ids"]
        if ids and query["ids"] and (ids[0] == query["ids"][0] or math.isclose(
                distances[0], query["distances"][0], abs_tol=TIE_TOLERANCE)):
            top1 += 1
    return len(probes["queries"]), identical, top1


def _swap_in(client: MilvusClient, server: MilvusServer, staging: str, target: str,
             replace: bool, aliases: Sequence[str], log: Log) -> None:
    """Put the checked staging collection in the target's place. An existing target's aliases
    move to it first, then the target is dropped, then staging is renamed."""
    with calls(server, f"putting {staging!r} in place of {target!r}"):
        if replace:
            moved = client.describe_collection(target, timeout=server.timeout_s).get(
                "aliases") or []
            for alias in moved:
                client.alter_alias(staging, alias, timeout=server.timeout_s)
            log(f"dropping the existing collection {target!r} (confirmed); aliases moved: "
                f"{', '.join(moved) or 'none'}")
            client.drop_collection(target, timeout=server.timeout_s)
        client.rename_collection(staging, target, timeout=server.timeout_s)
        for alias in aliases:
            try:
                client.create_alias(target, alias, timeout=server.timeout_s)
                log(f"alias {alias!r} re-created for {target!r}")
            except MilvusException as exc:
                log(f"alias {alias!r} not re-created: {exc.message}")


def restore_collection(client: MilvusClient, server: MilvusServer, repo: BackupRepository,
                       record: BackupRecord, source: str, target: str, *, replace: bool,
                       auto_id_mode: str, batch_rows: int, log: Log) -> CollectionRestore:
    started = time.monotonic()
    entry = record.manifest.fingerprint["collections"][source]
    desc = read_description(repo, record, source)
    batch = auto_batch_rows(desc, batch_rows, cap_bytes=INSERT_CAP_BYTES)
    auto_id = bool(desc["auto_id"])
    staging = f"{target}{STAGING_TAG}{uuid.uuid4().hex[:8]}"
    staging_desc = dict(desc)
    if auto_id and auto_id_mode == "explicit_ids":
        staging_desc["auto_id"] = False
    log(f"restoring {source!r} ({entry['rows']} rows) into staging collection {staging!r}")
    _create(client, server, staging, staging_desc)
    try:
        if auto_id and auto_id_mode == "import":
            _import_auto_id(client, server, repo, record, entry, desc, staging, batch, log)
        else:
            _insert_files(client, server, repo, record, entry, desc, staging, batch,
                          drop_primary=auto_id and auto_id_mode == "new_ids", log=log)
        with calls(server, f"flushing {staging!r}"):
            client.flush(staging, timeout=server.long_timeout_s)
        _wait_indexes(client, server, staging)
        with calls(server, f"loading {staging!r}"):
            client.load_collection(staging, timeout=server.long_timeout_s)
        rows = count_rows(client, server, staging)
        partitions = {label: (expected, count_rows(client, server, staging, label)
                              if label != ALL_PARTITIONS else rows)
                      for label, expected in entry["partitions"].items()}
        if rows != entry["rows"] or any(a != b for a, b in partitions.values()):
            raise IntegrityError(
                f"restored copy of {source!r} (staging {staging!r}) has {rows} rows, backup "
                f"{record.partition_key} has {entry['rows']}; per partition (manifest, "
                f"restored): {partitions}; target {target!r} was not touched")
        probes, identical, top1 = _compare_probes(client, server, staging, desc)
        if top1 < probes and entry.get("consistent", True) and \
                not (auto_id and auto_id_mode == "new_ids"):
            raise IntegrityError(
                f"restored copy of {source!r}: {probes - top1} of {probes} probe searches "
                f"return another nearest id than on the source at backup time; target "
                f"{target!r} was not touched")
        log(f"{staging}: {rows} rows match the manifest; probe searches: {identical}/{probes} "
            f"identical top-{desc.get('probes', {}).get('limit', 0)}, {top1}/{probes} same "
            "nearest id")
    except BaseException:
        _drop(client, server, staging)
        raise
    try:  # from here on staging holds the only checked copy: it is never dropped
        _swap_in(client, server, staging, target, replace,
                 desc["aliases"] if target == source else [], log)
    except RagBackupError as exc:
        raise type(exc)(f"{exc}; the checked restored copy of {source!r} is kept as "
                        f"{staging!r}: rename it to {target!r} once the cause is fixed") from exc
    return CollectionRestore(source, target, rows, entry["rows"], partitions, replace,
                             auto_id, auto_id_mode if auto_id else None, probes, identical,
                             top1, time.monotonic() - started)


def restore(repo: BackupRepository, record: BackupRecord, server: MilvusServer, *,
            targets: Mapping[str, str], confirm: Sequence[str] = (),
            auto_id_mode: str = "import", batch_rows: int = 0,
            log: Log = _quiet) -> RestoreReport:
    """Restore collections of a backup, ``targets`` mapping each source collection to the name
    it gets. Everything is checked before the server is touched: the collections exist in the
    backup, the names are valid and distinct, every existing target is named in ``confirm``,
    and every artifact of those collections matches the manifest."""
    started = time.monotonic()
    available = record.manifest.fingerprint["collections"]
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise InvalidRequest(f"milvus backup {record.partition_key} has no collection(s) "
                             f"{', '.join(unknown)}; it has: {', '.join(sorted(available))}")
    if not targets:
        raise InvalidRequest("no collection to restore")
    if auto_id_mode not in AUTO_ID_MODES:
        raise InvalidRequest(f"auto_id_mode must be one of {', '.join(AUTO_ID_MODES)}, not "
                             f"{auto_id_mode!r}")
    if batch_rows and not MIN_BATCH <= batch_rows <= MAX_BATCH:
        raise InvalidRequest(f"batch_rows must be between {MIN_BATCH} and {MAX_BATCH} (0: "
                             f"automatic), not {batch_rows}")
    if len(set(targets.values())) != len(targets):
        raise InvalidRequest(f"two collections would be restored under the same name: "
                             f"{dict(targets)}")
    for source, target in targets.items():
        _check_name(target, f"target name of {source!r}")
    # No corrupt byte is acted upon: every artifact is checked before anything is created.
    for source in targets:
        entry = available[source]
        for path in [entry["description"], *entry["files"]]:
            repo.stream_artifact(record, _artifact(record, path))
        read_description(repo, record, source)
    results = []
    with server.session() as client:
        existing = {t for t in targets.values() if _exists(client, server, t)}
        unconfirmed = sorted(existing - set(confirm))
        if unconfirmed:
            raise ConfirmationRequired(
                f"collection(s) {', '.join(unconfirmed)} exist in {server.describe()}; "
                f"restoring replaces them (they are dropped once the restored copy has been "
                f"checked): set confirm to {','.join(unconfirmed)!r} to proceed, or choose "
                "another target name or suffix")
        for source, target in targets.items():
            results.append(restore_collection(
                client, server, repo, record, source, target, replace=target in existing,
                auto_id_mode=auto_id_mode, batch_rows=batch_rows, log=log))
    return RestoreReport(results, time.monotonic() - started)


def check_connection(server: MilvusServer) -> str:
    """The server version of a reachable server that accepts our token, else a clear error."""
    with server.session() as client:
        list_collections(client, server)
        return server_version(client, server)


__all__ = [
    "ALL_PARTITIONS", "AUTO_ID_MODES", "STORE", "BackupOutcome", "CollectionRestore",
    "MilvusServer", "RestoreReport", "arrow_schema", "backup", "build_index_params",
    "build_schema", "check_connection", "check_description", "restore", "verify",
]
