"""Partition definitions shared by every store (one place, module constants)."""

import dagster as dg

# A daily backup at 02:00 on day D is partition D: ``end_offset=1`` makes today's key exist.
DAILY_PARTITIONS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
HOURLY_PARTITIONS = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", end_offset=1)
