"""Shared constants: partitions, timezone and the default state of automation.

Both come from the environment where the definitions load (the code server):
- ``RAG_BACKUP_TIMEZONE`` (default ``UTC``): the timezone of partitions and schedules, so that
  "daily at 02:00" means 02:00 where the operators are.
- ``RAG_BACKUP_AUTOMATION`` (default ``on``): schedules and sensors start running as soon as
  the code is deployed, which is what a production install wants; ``off`` loads them stopped
  (turn them on in the UI under Automation).
"""

import os

import dagster as dg

from rag_backup.repository.manifest import PartitionWindow

TIMEZONE = os.environ.get("RAG_BACKUP_TIMEZONE", "UTC")
AUTOMATION_ON = os.environ.get("RAG_BACKUP_AUTOMATION", "on").lower() not in ("off", "0", "no")
SCHEDULE_STATUS = dg.DefaultScheduleStatus.RUNNING if AUTOMATION_ON else \
    dg.DefaultScheduleStatus.STOPPED
SENSOR_STATUS = dg.DefaultSensorStatus.RUNNING if AUTOMATION_ON else \
    dg.DefaultSensorStatus.STOPPED

# A daily backup at 02:00 on day D is partition D: ``end_offset=1`` makes today's key exist.
DAILY_PARTITIONS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1,
                                                timezone=TIMEZONE)
HOURLY_PARTITIONS = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", end_offset=1,
                                                  timezone=TIMEZONE)


def window_of(partitions_def: dg.PartitionsDefinition, partition_key: str
              ) -> PartitionWindow | None:
    """The time window of ``partition_key`` as the partitions definition knows it (in its
    timezone), for a partition that has no manifest to say; ``None`` if it is not one of its
    keys' form."""
    if not isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        return None
    try:
        found = partitions_def.time_window_for_partition_key(partition_key)
    except ValueError:
        return None
    return PartitionWindow(found.start, found.end)


def context_window(context: dg.AssetExecutionContext) -> PartitionWindow:
    """The run's partition window, from Dagster (``context.partition_time_window``)."""
    found = context.partition_time_window
    return PartitionWindow(found.start, found.end)
