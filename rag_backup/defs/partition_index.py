"""Taking deleted backups' partitions out of Dagster's partition index: the one place that uses
Dagster's private storage schema.

Dagster OSS cannot wipe single partitions of an asset: ``wipe_asset_partitions`` raises
NotImplementedError on its SQL storages (dagster-io/dagster#14749; Dagster+ implements it). So
that the UI stops presenting a backup deleted by retention as present, its materializations are
taken out of the partition index (``event_logs.partition`` set to NULL for those rows; the events
stay in the run logs) and the asset's cached partition status is reset. This uses
``dagster._core.storage.event_log.schema``, verified against dagster 1.13.27;
``rag_backup_tests/test_partition_index.py`` fails loudly if an upgrade changes it. Everything
else in the project uses Dagster's public API only.
"""

from __future__ import annotations

import dagster as dg

from rag_backup.repository import RetentionDecision

# What the workaround relies on: table -> columns.
PRIVATE_SCHEMA = {
    "event_logs": ("asset_key", "partition"),
    "asset_keys": ("asset_key", "cached_status_data"),
}


def private_schema_problems() -> list[str]:
    """What is missing from Dagster's private schema that the workaround needs (empty: fine)."""
    try:
        from dagster._core.storage.event_log.schema import (
            AssetKeyTable,
            SqlEventLogStorageTable,
        )
        from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage  # noqa: F401
    except ImportError as exc:
        return [f"dagster._core.storage.event_log is not importable: {exc}"]
    tables = {"event_logs": SqlEventLogStorageTable, "asset_keys": AssetKeyTable}
    problems = []
    for name, columns in PRIVATE_SCHEMA.items():
        table = tables[name]
        if table.name != name:
            problems.append(f"table {name} is now called {table.name}")
        problems += [f"{name}.{column} is gone" for column in columns
                     if column not in table.c]
    return problems


def mark_partitions_deleted(instance: dg.DagsterInstance, asset_keys: tuple[dg.AssetKey, ...],
                            deleted: list[RetentionDecision],
                            cause: str = "deleted by retention") -> None:
    """Make the UI stop presenting deleted backups as present.

    Storages that can wipe single partitions (Dagster+) do so; Dagster OSS's SQL storages get the
    partition-index workaround. Either way each deleted partition gets an observation
    ``present: false`` with the reason, on its timeline.
    """
    partitions = [d.partition_key for d in deleted]
    for key in asset_keys:
        try:
            instance.wipe_asset_partitions(key, partitions)
        except NotImplementedError:
            _unindex_partitions(instance, key, partitions)
        for d in deleted:
            instance.report_runless_asset_event(dg.AssetObservation(
                asset_key=key, partition=d.partition_key,
                description=f"backup {d.backup_id} {cause}: {d.reason}",
                metadata={"present": dg.MetadataValue.bool(False),
                          "backup_id": dg.MetadataValue.text(d.backup_id),
                          "deleted_because": dg.MetadataValue.text(d.reason)}))


def _unindex_partitions(instance: dg.DagsterInstance, key: dg.AssetKey,
                        partitions: list[str]) -> None:
    from dagster._core.storage.event_log.schema import AssetKeyTable, SqlEventLogStorageTable
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage):
        return
    events = SqlEventLogStorageTable
    with storage.index_connection() as conn:
        conn.execute(events.update().where(
            events.c.asset_key == key.to_string(),
            events.c.partition.in_(partitions),
        ).values(partition=None))
        conn.execute(AssetKeyTable.update().where(
            AssetKeyTable.c.asset_key == key.to_string()).values(cached_status_data=None))
