"""Milvus restore: the rows go into a staging collection created with the same schema,
partitions and indexes (same params); it is flushed, indexed, loaded, and compared with the
manifest (row counts per partition and in total, and the probe searches) before it is renamed
into place. An existing target is dropped (its aliases moved over first) only when ``confirm``
names it and only after the staging copy matched. Primary keys are kept. auto_id collections:
``auto_id_mode="import"`` keeps their ids and auto_id (see ``auto_id``). Alternatives:
``explicit_ids`` (ids kept, the restored primary key is not auto_id) and ``new_ids`` (schema
kept, the server assigns new ids: references from other stores break).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pymilvus import MilvusClient

from rag_backup import progress
from rag_backup.engines.milvus.artifacts import _artifact, read_description
from rag_backup.engines.milvus.auto_id import _import_auto_id
from rag_backup.engines.milvus.client import MilvusServer, calls, count_rows
from rag_backup.engines.milvus.common import (
    ALL_PARTITIONS,
    MAX_BATCH,
    MIN_BATCH,
    ROWS,
    Log,
    _quiet,
)
from rag_backup.engines.milvus.fingerprint import fingerprint_of
from rag_backup.engines.milvus.parquet import auto_batch_rows
from rag_backup.engines.milvus.probes import _compare_probes
from rag_backup.engines.milvus.staging import (
    STAGING_TAG,
    _check_name,
    _create,
    _drop,
    _exists,
    _insert_files,
    _swap_in,
    _wait_indexes,
)
from rag_backup.errors import ConfirmationRequired, IntegrityError, InvalidRequest, RagBackupError
from rag_backup.repository import BackupRecord, BackupRepository

INSERT_CAP_BYTES = 32 * 1024 * 1024  # an insert request stays well below gRPC's 64 MB limit
AUTO_ID_MODES = ("import", "explicit_ids", "new_ids")


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


def restore_collection(client: MilvusClient, server: MilvusServer, repo: BackupRepository,
                       record: BackupRecord, source: str, target: str, *, replace: bool,
                       auto_id_mode: str, batch_rows: int, log: Log) -> CollectionRestore:
    started = time.monotonic()
    entry = fingerprint_of(record).collections[source]
    desc = read_description(repo, record, source)
    batch = auto_batch_rows(desc, batch_rows, cap_bytes=INSERT_CAP_BYTES)
    auto_id = bool(desc["auto_id"])
    staging = f"{target}{STAGING_TAG}{uuid.uuid4().hex[:8]}"
    staging_desc = dict(desc)
    if auto_id and auto_id_mode == "explicit_ids":
        staging_desc["auto_id"] = False
    log(f"restoring {source!r} ({entry.rows} rows) into staging collection {staging!r}")
    _create(client, server, staging, staging_desc)
    try:
        with progress.tracking(f"milvus restore of {source} into {target}", entry.rows, ROWS):
            if auto_id and auto_id_mode == "import":
                _import_auto_id(client, server, repo, record, entry, desc, staging, batch, log)
            else:
                _insert_files(client, server, repo, record, entry, desc, staging, batch,
                              drop_primary=auto_id and auto_id_mode == "new_ids", log=log)
        with calls(server, f"flushing {staging!r}"):
            client.flush(staging, timeout=server.long_timeout_s)
        log(f"{staging}: flushed; building the indexes")
        _wait_indexes(client, server, staging)
        with calls(server, f"loading {staging!r}"):
            client.load_collection(staging, timeout=server.long_timeout_s)
        rows = count_rows(client, server, staging)
        partitions = {label: (expected, count_rows(client, server, staging, label)
                              if label != ALL_PARTITIONS else rows)
                      for label, expected in entry.partitions.items()}
        if rows != entry.rows or any(a != b for a, b in partitions.values()):
            raise IntegrityError(
                f"restored copy of {source!r} (staging {staging!r}) has {rows} rows, backup "
                f"{record.partition_key} has {entry.rows}; per partition (manifest, "
                f"restored): {partitions}; target {target!r} was not touched")
        probes, identical, top1 = _compare_probes(client, server, staging, desc)
        if top1 < probes and entry.consistent and \
                not (auto_id and auto_id_mode == "new_ids"):
            raise IntegrityError(
                f"restored copy of {source!r}: {probes - top1} of {probes} probe searches "
                f"return another nearest id than on the source at backup time, and the "
                f"source's nearest row is not in the copy at its distance; target "
                f"{target!r} was not touched")
        log(f"{staging}: {rows} rows match the manifest; probe searches: {identical}/{probes} "
            f"identical top-{desc.get('probes', {}).get('limit', 0)}, {top1}/{probes} same "
            "nearest row (or the source's nearest in the copy at its distance)")
    except BaseException:
        _drop(client, server, staging)
        raise
    try:  # from here on staging holds the only checked copy: it is never dropped
        _swap_in(client, server, staging, target, replace,
                 desc["aliases"] if target == source else [], log)
    except RagBackupError as exc:
        raise type(exc)(f"{exc}; the checked restored copy of {source!r} is kept as "
                        f"{staging!r}: rename it to {target!r} once the cause is fixed") from exc
    return CollectionRestore(source, target, rows, entry.rows, partitions, replace,
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
    available = fingerprint_of(record).collections
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
    checked = [_artifact(record, path) for source in targets
               for path in [available[source].description, *available[source].files]]
    with progress.tracking(f"checking the artifacts of milvus backup {record.partition_key}",
                           sum(a.size for a in checked)):
        for artifact in checked:
            repo.stream_artifact(record, artifact, lambda chunk: progress.advance(len(chunk)))
    for source in targets:
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
