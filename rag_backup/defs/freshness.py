"""Freshness windows of the verified assets, so the catalog shows a stale store natively.

A store's ``<store>_backup_verified`` asset is fresh while its newest verified backup is
younger than the store's RPO (``StorePolicy.rpo``). Base backups for point-in-time recovery
have no RPO of their own (the WAL carries it): they are fresh while the newest is younger than
the longest gap between two ticks of their schedule (``RAG_PG_BASE_BACKUP_CRON``).
"""

from datetime import datetime, timedelta

import dagster as dg

# Ticks sampled to find a schedule's longest gap: a year of a daily cron, 33 days of one that
# fires every 5 minutes during one hour (whose gap is the rest of the day).
CRON_SAMPLE_TICKS = 400
CRON_SAMPLE_SPAN = timedelta(days=366)
CRON_SAMPLE_START = datetime(2025, 1, 1)


# Warn at the RPO, fail past it plus the grace the RPO sensor allows: a daily backup that
# finishes a few minutes later than yesterday's is not a failure.
RPO_GRACE = timedelta(minutes=30)


def rpo_freshness(rpo: timedelta) -> dg.FreshnessPolicy:
    """The freshness policy of a store whose RPO is ``rpo``."""
    return dg.FreshnessPolicy.time_window(warn_window=rpo, fail_window=rpo + RPO_GRACE)


def cron_period(cron: str, timezone: str = "UTC") -> timedelta:
    """The longest time between two ticks of ``cron`` (weekly: 7 days; weekdays: 3 days): how
    old the newest result of a job on that schedule may be when nothing failed. Read from
    Dagster's own cron arithmetic (a partitions definition on that cron), DST included."""
    ticks = dg.TimeWindowPartitionsDefinition(cron_schedule=cron, start=CRON_SAMPLE_START,
                                              fmt="%Y-%m-%d-%H:%M", timezone=timezone)
    window = ticks.get_first_partition_window()
    longest, end = timedelta(0), None
    for _ in range(CRON_SAMPLE_TICKS):
        if window is None:
            break
        end = end or window.start + CRON_SAMPLE_SPAN
        longest = max(longest, window.end - window.start)
        if window.end >= end:
            break
        window = ticks.get_next_partition_window(window.end, respect_bounds=False)
    if longest <= timedelta(0):
        raise ValueError(f"cron {cron!r} has no two ticks to measure a period between")
    return longest

