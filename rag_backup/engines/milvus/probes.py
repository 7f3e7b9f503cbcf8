"""Probe searches: a few vectors sampled at backup time with their top-k results on the
source, recorded in the description and re-run on a restored copy.

A restored copy's index is built anew, and an approximate index (HNSW) may rank another row
first where the source's did not, even with the data intact (seen on 2,000,000 random 384-d
vectors: 1 probe of 5). So a probe whose restored top-1 is another row at another distance is
settled by the data instead: the source's nearest row, read by its primary key from the copy,
must be there with a vector at the distance the source reported (computed here). A missing row
or a changed vector still fails the probe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
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


def _distances(metric: str, a: np.ndarray, b: np.ndarray) -> list[float]:
    """What the server may report as the distance of ``a`` and ``b`` under ``metric`` (L2:
    squared or not)."""
    if metric == "COSINE":
        return [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))]
    if metric == "IP":
        return [float(a @ b)]
    if metric == "L2":
        squared = float(((a - b) ** 2).sum())
        return [squared, math.sqrt(squared)]
    return []


def nearest_still_there(client: MilvusClient, server: MilvusServer, name: str,
                        probes: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    """The source's nearest row for ``query``, read by id from collection ``name``, at the
    distance the source reported (float vectors; a binary probe is never settled this way)."""
    if DataType[probes["field_type"]] != DataType.FLOAT_VECTOR or not query["ids"]:
        return False
    with calls(server, f"reading row {query['ids'][0]!r} of {name!r}"):
        rows = client.get(name, ids=[query["ids"][0]], output_fields=[probes["field"]],
                          timeout=server.long_timeout_s)
    if not rows:
        return False
    reported = query["distances"][0]
    metric = str(probes["search_params"].get("metric_type") or "").upper()
    return any(math.isclose(d, reported, rel_tol=1e-4, abs_tol=1e-4) for d in _distances(
        metric, np.asarray(query["vector"], dtype=np.float64),
        np.asarray(rows[0][probes["field"]], dtype=np.float64)))


def _compare_probes(client: MilvusClient, server: MilvusServer, name: str,
                    desc: Mapping[str, Any]) -> tuple[int, int, int]:
    """Re-run the backup's probe searches; ``(probes, identical top-k, same top-1)``, where a
    top-1 is the same if it is the same row, a row at the same distance (a tie), or the
    source's nearest row is in the copy at its distance (``nearest_still_there``)."""
    probes = desc.get("probes")
    if not probes:
        return 0, 0, 0
    identical = top1 = 0
    for query in probes["queries"]:
        ids, distances = probe_search(client, server, name, probes, query["vector"])
        identical += ids == query["ids"]
        if ids and query["ids"] and (ids[0] == query["ids"][0] or math.isclose(
                distances[0], query["distances"][0], abs_tol=TIE_TOLERANCE)
                or nearest_still_there(client, server, name, probes, query)):
            top1 += 1
    return len(probes["queries"]), identical, top1
