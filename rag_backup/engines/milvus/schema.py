"""The collection description (``<collection>/schema.json``): read from the server,
the Arrow schema it implies, and the pymilvus ``CollectionSchema`` and ``IndexParams``
re-built from it offline, after the checks the server would make first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import pyarrow as pa
from pymilvus import DataType, MilvusClient

from rag_backup.engines.milvus.client import MilvusServer, calls
from rag_backup.errors import IntegrityError, InvalidRequest

DESCRIPTION_FORMAT = 1
META_COLUMN = "$meta"  # the dynamic fields of a row, as JSON text
INDEX_META_KEYS = {"field_name", "index_name", "index_type", "metric_type", "total_rows",
                   "indexed_rows", "pending_index_rows", "state", "index_state_fail_reason"}
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
