"""Properties of the pure retention planner."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_backup.errors import BackupExpired, InvalidRequest
from rag_backup.repository import DamagedRecord
from rag_backup.repository.manifest import format1_window
from rag_backup.repository.retention import (
    RetentionCandidate,
    damaged_decision,
    ensure_within_window,
    plan_retention,
)

NOW = datetime(2026, 11, 24, 12, tzinfo=timezone.utc)

candidates = st.lists(
    st.builds(
        RetentionCandidate,
        partition_key=st.integers(0, 400).map(
            lambda d: (NOW - timedelta(days=d)).strftime("%Y-%m-%d")),
        backup_id=st.uuids().map(lambda u: u.hex[:8]),
        taken_at=st.integers(0, 400 * 24).map(lambda h: NOW - timedelta(hours=h)),
        verified=st.booleans(),
    ),
    max_size=60,
    unique_by=lambda c: c.partition_key,
)
windows = st.integers(1, 60).map(lambda d: timedelta(days=d))


@settings(max_examples=300, deadline=None)
@given(candidates, windows, st.integers(1, 3))
def test_every_backup_gets_exactly_one_decision_with_a_reason(backups, window, keep):
    decisions = plan_retention(backups, now=NOW, window=window, keep_newest_verified=keep)
    assert [(d.partition_key, d.backup_id) for d in decisions] == [
        (b.partition_key, b.backup_id) for b in backups]
    assert all(d.reason for d in decisions)


@settings(max_examples=300, deadline=None)
@given(candidates, windows)
def test_nothing_inside_the_window_is_deleted(backups, window):
    decisions = plan_retention(backups, now=NOW, window=window)
    for b, d in zip(backups, decisions):
        if NOW - b.taken_at <= window:
            assert not d.delete, d


@settings(max_examples=300, deadline=None)
@given(candidates, windows, st.integers(1, 3))
def test_the_newest_verified_backups_are_never_deleted(backups, window, keep):
    decisions = plan_retention(backups, now=NOW, window=window, keep_newest_verified=keep)
    newest = sorted((b for b in backups if b.verified), key=lambda b: b.taken_at,
                    reverse=True)[:keep]
    kept = {(d.partition_key, d.backup_id) for d in decisions if not d.delete}
    assert {(b.partition_key, b.backup_id) for b in newest} <= kept
    if any(b.verified for b in backups):
        assert any(b.verified and (b.partition_key, b.backup_id) in kept for b in backups)


@settings(max_examples=300, deadline=None)
@given(candidates, windows)
def test_only_expired_unprotected_backups_are_deleted(backups, window):
    decisions = plan_retention(backups, now=NOW, window=window)
    newest_verified = max((b for b in backups if b.verified), key=lambda b: b.taken_at,
                          default=None)
    for b, d in zip(backups, decisions):
        expected = NOW - b.taken_at > window and b is not newest_verified
        assert d.delete == expected, (b, d)


def test_keeping_zero_verified_backups_is_refused():
    with pytest.raises(InvalidRequest):
        plan_retention([], now=NOW, window=timedelta(days=1), keep_newest_verified=0)


def test_format_1_partition_keys_parse_daily_and_hourly():
    assert format1_window("2026-11-24").start == datetime(2026, 11, 24, tzinfo=timezone.utc)
    assert format1_window("2026-11-24-13:00").start == datetime(2026, 11, 24, 13,
                                                                tzinfo=timezone.utc)
    with pytest.raises(InvalidRequest, match="not a daily"):
        format1_window("yesterday")


def test_a_partition_outside_the_window_is_refused_with_the_reason():
    ensure_within_window("postgres", "2026-11-01", start=datetime(2026, 11, 1, tzinfo=timezone.utc),
                         now=NOW, window=timedelta(days=30))
    with pytest.raises(BackupExpired, match="2026-10-01 is 54.5 days old, outside the 30.0 days "
                                            "retention window"):
        ensure_within_window("postgres", "2026-10-01",
                             start=datetime(2026, 10, 1, tzinfo=timezone.utc), now=NOW,
                             window=timedelta(days=30))


def test_the_window_check_counts_from_the_start_it_is_given_not_the_key():
    # a partition of a timezone 14 hours ahead of UTC started 14 hours before its key says
    ahead = datetime(2026, 10, 25, 10, tzinfo=timezone.utc)  # 2026-10-26 00:00 at UTC+14
    with pytest.raises(BackupExpired, match="30.1 days old"):
        ensure_within_window("postgres", "2026-10-26", start=ahead, now=NOW,
                             window=timedelta(days=30))


def damage(partition_key: str, kind: str = "manifest") -> DamagedRecord:
    return DamagedRecord("postgres", partition_key, kind, f"/repo/postgres/{partition_key}/"
                         "manifest.json", "JSONDecodeError: Expecting value: line 1 column 1")


@pytest.mark.parametrize("flag", [False, True])
def test_a_damaged_backup_inside_the_window_is_kept_and_reported(flag):
    d = damaged_decision(damage("2026-11-20"), now=NOW, window=timedelta(days=30),
                         start=datetime(2026, 11, 20, tzinfo=timezone.utc),
                         delete_past_window=flag)
    assert (d.delete, d.damaged, d.backup_id) == (False, True, "unknown (manifest damaged)")
    assert d.reason.startswith("DAMAGED: its manifest /repo/postgres/2026-11-20/manifest.json "
                               "cannot be read (JSONDecodeError: Expecting value")
    assert "left for an operator" in d.reason


def test_a_damaged_backup_past_the_window_is_removed_only_when_asked_saying_so():
    old, start = damage("2026-09-01"), datetime(2026, 9, 1, tzinfo=timezone.utc)
    kept = damaged_decision(old, now=NOW, window=timedelta(days=30), start=start)
    assert not kept.delete and "older than the 30.0 days window" in kept.reason
    assert "delete_damaged_past_window" in kept.reason
    removed = damaged_decision(old, now=NOW, window=timedelta(days=30), start=start,
                               delete_past_window=True)
    assert removed.delete and removed.damaged
    assert "removed (delete_damaged_past_window is set)" in removed.reason


def test_a_damaged_backup_whose_start_is_unknown_is_never_removed():
    d = damaged_decision(damage("not-a-date"), now=NOW, window=timedelta(days=30), start=None,
                         delete_past_window=True)
    assert (d.delete, d.damaged) == (False, True) and "left for an operator" in d.reason
