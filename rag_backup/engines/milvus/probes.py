"""Probe searches: a few vectors sampled at backup time with their top-k results on the
source, recorded in the description and re-run on a restored copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pymilvus import DataType, MilvusClient

from rag_backup.engines.milvus.client import MilvusServer, calls
from rag_backup.engines.milvus.schema import _typed

PROBES = 5
PROBE_LIMIT = 10
TIE_TOLERANCE = 1e-5


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
