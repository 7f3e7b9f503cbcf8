"""The staging collection of a restore: created like the description (schema,
shards, consistency, partitions, indexes, properties), filled from the Parquet
artifacts, indexed, and put in the target's place (aliases moved over) once checked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from contextlib import closing, suppress
from typing import Any

from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from rag_backup import progress
from rag_backup.engines.milvus.artifacts import _where, local_artifact
from rag_backup.engines.milvus.client import MilvusServer, calls
from rag_backup.engines.milvus.common import ALL_PARTITIONS, ROWS, Log
from rag_backup.engines.milvus.fingerprint import CollectionFingerprint
from rag_backup.engines.milvus.insert import Inserter
from rag_backup.engines.milvus.parquet import iter_parquet
from rag_backup.engines.milvus.schema import arrow_schema, build_index_params, build_schema
from rag_backup.engines.prefetch import read_ahead
from rag_backup.errors import InvalidRequest, RagBackupError, ToolError
from rag_backup.repository import BackupRecord, BackupRepository

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 255
STAGING_TAG = "__rst_"


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
                  record: BackupRecord, entry: CollectionFingerprint, desc: Mapping[str, Any],
                  target: str, batch_rows: int, *, drop_primary: bool, log: Log) -> None:
    schema = arrow_schema(desc)
    with calls(server, f"describing {target!r}"):
        inserter = Inserter(client, desc, target, drop_primary=drop_primary,
                            timeout=server.timeout_s)
    log(f"{target}: inserting by {inserter.mode}")
    for path in entry.files:
        partition = path.split("/")[-2]
        partition_name = None if partition == ALL_PARTITIONS else partition
        where = _where(record, path)
        inserted = 0
        with local_artifact(repo, record, path) as local:
            # the next batch is read and packed while the server inserts this one
            batches = read_ahead((inserter.prepare(batch, partition_name)
                                  for batch in iter_parquet(local, schema, batch_rows, where)),
                                 name=f"milvus-insert-{target}")
            with closing(batches):
                for prepared in batches:
                    with calls(server, f"inserting into {target!r} from {path}"):
                        rows = inserter.send(prepared, server.long_timeout_s)
                    inserted += rows
                    progress.advance(rows, unit=ROWS)
        log(f"{target}: inserted {inserted} rows from {path}")


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
            progress.checkpoint()  # an index build may take hours
            time.sleep(0.5)


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
