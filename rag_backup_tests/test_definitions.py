"""The whole Definitions load, and carry the catalogue the UI shows."""

import dagster as dg

from rag_backup.definitions import defs


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_postgres_assets_are_catalogued_partitioned_and_pooled():
    graph = defs.resolve_asset_graph()
    for name in ("postgres_backup", "postgres_backup_verified", "postgres_retention"):
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "postgres"
        assert "postgres" in node.kinds
        assert node.partitions_def is not None
        assert defs.resolve_assets_def(name).node_def.pool == "postgres"
        assert node.description
    assert graph.get(dg.AssetKey("postgres_backup_verified")).parent_keys == {
        dg.AssetKey("postgres_backup")}
    assert graph.get(dg.AssetKey("postgres_retention")).parent_keys == {
        dg.AssetKey("postgres_backup_verified")}


def test_restore_config_documents_every_field_for_the_launchpad():
    job = defs.resolve_job_def("restore_postgres_job")
    fields = job.graph.node_named("restore_postgres").definition.config_schema.config_type.fields
    assert {"partition_key", "target_database", "confirm"} <= set(fields)
    assert all(field.description for field in fields.values())


def test_the_daily_schedule_names_its_partition():
    schedule = defs.resolve_schedule_def("postgres_backup_job_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    context = dg.build_schedule_context(
        scheduled_execution_time=dg.DailyPartitionsDefinition(start_date="2026-11-01")
        .time_window_for_partition_key("2026-11-20").start.replace(hour=2))
    [request] = list(schedule.evaluate_tick(context).run_requests)
    assert request.partition_key == "2026-11-20"
