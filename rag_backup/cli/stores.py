"""What the command line needs of each store to back it up and verify it: its partitions,
its retention window, its resource, and the engine calls its ``<store>_backup`` and
``<store>_backup_verified`` assets make, with the same arguments from the same resources.

The assets' bodies live in ``defs/<store>.py``; keep the calls here in step with them (the
asset decorators and their Dagster context cannot run outside a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rag_backup.errors import InvalidRequest
from rag_backup.repository import BackupRecord, BackupRepository, PendingBackup
from rag_backup.repository.manifest import PartitionWindow, utcnow

if TYPE_CHECKING:
    from rag_backup.defs.resources import (
        MilvusResource,
        MinioResource,
        PostgresResource,
        RedisResource,
    )

Log = Callable[[str], None]
# Stores with partitions in the repository, in the order they are listed.
STORES = ("postgres", "redis", "minio", "milvus", "postgres_base")
HOURLY = frozenset({"redis"})


@dataclass(frozen=True)
class StoreOps:
    """One store's backup and verification, as its assets do them."""

    store: str
    resource: str  # the key of its resource in ``default_resources``
    retention: timedelta  # partitions older than this are refused (retention deletes them)
    take: Callable[[Any, BackupRepository, PendingBackup, PartitionWindow, Log], Any]
    verify: Callable[[Any, BackupRepository, BackupRecord, Log], dict[str, Any]]


def partitions_of(store: str) -> Any:
    """The store's Dagster partitions definition (daily, hourly for Redis)."""
    from rag_backup.defs.partitions import DAILY_PARTITIONS, HOURLY_PARTITIONS

    return HOURLY_PARTITIONS if store in HOURLY else DAILY_PARTITIONS


def current_partition(store: str) -> str:
    """The partition of now: today's for daily stores, this hour's for Redis (in
    ``RAG_BACKUP_TIMEZONE``, as the schedules count)."""
    return partitions_of(store).get_partition_key_for_timestamp(utcnow().timestamp())


def window(store: str, partition_key: str) -> PartitionWindow:
    """The partition's window; ``InvalidRequest`` for a key that is not one of the store's
    partitions, or one that has not started."""
    from rag_backup.defs.partitions import window_of

    found = window_of(partitions_of(store), partition_key)
    form = "YYYY-MM-DD-HH:00" if store in HOURLY else "YYYY-MM-DD"
    if found is None:
        raise InvalidRequest(f"{partition_key!r} is not a {store} partition ({form})")
    if found.start > utcnow():
        raise InvalidRequest(f"{store} partition {partition_key} has not started yet; the "
                             f"current one is {current_partition(store)}")
    return found


# -- the engines' calls, as the assets make them --------------------------------------------

def _postgres_take(postgres: PostgresResource, repo: BackupRepository, pending: PendingBackup,
                   part: PartitionWindow, log: Log) -> Any:
    from rag_backup.engines import postgres as engine
    from rag_backup.engines.postgres.pitr import backfill

    chosen, point = backfill.choose_source(repo, part.end, utcnow())
    log(f"dump source: {point['source']}" + (f" ({point['why']})" if "why" in point else
                                             f", recovered to {point.get('target_time')}"))
    if chosen is not None:
        return backfill.backup_at(repo, chosen, postgres.server(), pending, point,
                                  databases=postgres.database_list(),
                                  timeout_s=postgres.timeout_s,
                                  zstd_level=postgres.zstd_level, log=log)
    outcome = engine.backup(postgres.server(), pending, databases=postgres.database_list(),
                            timeout_s=postgres.timeout_s, zstd_level=postgres.zstd_level,
                            log=log)
    return dataclasses.replace(outcome, recovery_point=point)


def _postgres_verify(postgres: PostgresResource, repo: BackupRepository, record: BackupRecord,
                     log: Log) -> dict[str, Any]:
    from rag_backup.engines import postgres as engine

    return engine.verify(repo, record, timeout_s=postgres.timeout_s, server=postgres.server())


def _redis_take(redis: RedisResource, repo: BackupRepository, pending: PendingBackup,
                part: PartitionWindow, log: Log) -> Any:
    from rag_backup.engines import redis as engine

    return engine.backup(redis.server(), pending, timeout_s=redis.timeout_s,
                         zstd_level=redis.zstd_level, log=log)


def _redis_verify(redis: RedisResource, repo: BackupRepository, record: BackupRecord,
                  log: Log) -> dict[str, Any]:
    from rag_backup.engines import redis as engine

    return engine.verify(repo, record, timeout_s=redis.timeout_s)


def _minio_take(minio: MinioResource, repo: BackupRepository, pending: PendingBackup,
                part: PartitionWindow, log: Log) -> Any:
    from rag_backup.defs.minio import RETENTION
    from rag_backup.engines import minio as engine

    return engine.backup(minio.s3(), pending, minio.bucket_list(), window=RETENTION,
                         gc_grace=minio.gc_grace, workers=minio.workers, log=log)


def _minio_verify(minio: MinioResource, repo: BackupRepository, record: BackupRecord,
                  log: Log) -> dict[str, Any]:
    from rag_backup.defs.minio import MinioVerifyConfig
    from rag_backup.engines import minio as engine

    config = MinioVerifyConfig()  # the asset's defaults
    return engine.verify(repo, record, full_max_bytes=config.full_verify_max_bytes,
                         rotation_days=config.rotation_days, workers=minio.workers, log=log)


def _milvus_take(milvus: MilvusResource, repo: BackupRepository, pending: PendingBackup,
                 part: PartitionWindow, log: Log) -> Any:
    from rag_backup.engines import milvus as engine

    return engine.backup(milvus.server(), pending, collections=milvus.collection_list(),
                         batch_rows=milvus.batch_rows, rows_per_file=milvus.rows_per_file,
                         log=log)


def _milvus_verify(milvus: MilvusResource, repo: BackupRepository, record: BackupRecord,
                   log: Log) -> dict[str, Any]:
    from rag_backup.engines import milvus as engine

    return engine.verify(repo, record)


def _base_take(postgres: PostgresResource, repo: BackupRepository, pending: PendingBackup,
               part: PartitionWindow, log: Log) -> Any:
    from rag_backup.engines.postgres import pitr

    return pitr.take_base_backup(postgres.server(), pending, timeout_s=postgres.timeout_s,
                                 zstd_level=postgres.zstd_level, log=log)


def _base_verify(postgres: PostgresResource, repo: BackupRepository, record: BackupRecord,
                 log: Log) -> dict[str, Any]:
    from rag_backup.defs.pitr import WAL_WAIT_S
    from rag_backup.engines.postgres import pitr

    return pitr.verify_with_wal(repo, record, timeout_s=postgres.timeout_s,
                                wal_wait_s=WAL_WAIT_S, log=log)


def store_ops(store: str) -> StoreOps:
    """The backup and verification of ``store`` (one of ``STORES``)."""
    from rag_backup.defs import milvus, minio, postgres, redis

    table = {
        "postgres": StoreOps("postgres", "postgres", postgres.RETENTION, _postgres_take,
                             _postgres_verify),
        "redis": StoreOps("redis", "redis", redis.RETENTION, _redis_take, _redis_verify),
        "minio": StoreOps("minio", "minio", minio.RETENTION, _minio_take, _minio_verify),
        "milvus": StoreOps("milvus", "milvus", milvus.RETENTION, _milvus_take, _milvus_verify),
        # Only the current day: a base backup is always of now (the asset's window).
        "postgres_base": StoreOps("postgres_base", "postgres", timedelta(days=1), _base_take,
                                  _base_verify),
    }
    if store not in table:
        raise InvalidRequest(f"unknown store {store!r}; known: {', '.join(STORES)}")
    return table[store]
