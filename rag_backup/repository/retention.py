"""Pure retention planning: which backups to keep and which to delete, each with a reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rag_backup.errors import InvalidRequest


@dataclass(frozen=True)
class RetentionCandidate:
    partition_key: str
    backup_id: str
    taken_at: datetime  # the start of its partition's window (what its age is counted from)
    verified: bool


@dataclass(frozen=True)
class RetentionDecision:
    partition_key: str
    backup_id: str
    delete: bool
    reason: str
    damaged: bool = False  # a DAMAGED partition: reported, kept for an operator


def _age(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def plan_retention(
    backups: Sequence[RetentionCandidate],
    *,
    now: datetime,
    window: timedelta,
    keep_newest_verified: int = 1,
) -> list[RetentionDecision]:
    """Decide for every backup: keep it if it is inside ``window`` or among the newest
    ``keep_newest_verified`` verified backups; delete it otherwise. One decision per backup,
    in the input's order."""
    if keep_newest_verified < 1:
        raise InvalidRequest("retention must keep at least the newest verified backup")
    verified = sorted((b for b in backups if b.verified), key=lambda b: b.taken_at, reverse=True)
    protected = {(b.partition_key, b.backup_id) for b in verified[:keep_newest_verified]}
    decisions = []
    for b in backups:
        age = now - b.taken_at
        if age <= window:
            reason, delete = f"inside the {_age(window)} window (age {_age(age)})", False
        elif (b.partition_key, b.backup_id) in protected:
            reason, delete = (f"older than the {_age(window)} window (age {_age(age)}) but among "
                              f"the newest {keep_newest_verified} verified backup(s)"), False
        else:
            state = "verified" if b.verified else "unverified"
            reason, delete = (f"{state}, older than the {_age(window)} window "
                              f"(age {_age(age)})"), True
        decisions.append(RetentionDecision(b.partition_key, b.backup_id, delete, reason))
    return decisions


def damaged_decision(damage: Any, *, now: datetime, window: timedelta,
                     start: datetime | None, delete_past_window: bool = False
                     ) -> RetentionDecision:
    """Retention's decision for a DAMAGED partition (a ``DamagedRecord``): never deleted
    silently. Kept and reported for an operator; removed, saying so, only once older than
    ``window`` and only when ``delete_past_window`` is set. ``start`` is when the partition
    starts (its manifest cannot say: the caller asks its partitions definition); ``None``
    (unknown) keeps it."""
    backup_id = getattr(damage, "backup_id", None) or "unknown (manifest damaged)"
    what = f"DAMAGED: its {damage.kind} {damage.file} cannot be read ({damage.error})"
    age: timedelta | None = now - start if start is not None else None
    if age is not None and age > window:
        if delete_past_window:
            return RetentionDecision(damage.partition_key, backup_id, True,
                                     f"{what}; older than the {_age(window)} window (age "
                                     f"{_age(age)}): removed (delete_damaged_past_window is "
                                     "set)", damaged=True)
        return RetentionDecision(damage.partition_key, backup_id, False,
                                 f"{what}; older than the {_age(window)} window (age "
                                 f"{_age(age)}) but left for an operator: inspect the file, "
                                 "then run retention with delete_damaged_past_window to remove "
                                 "it", damaged=True)
    return RetentionDecision(damage.partition_key, backup_id, False,
                             f"{what}; left for an operator: re-run the backup (or, for a "
                             "verification record, the verification) of this partition to "
                             "repair it", damaged=True)


def ensure_within_window(store: str, partition_key: str, *, start: datetime, now: datetime,
                         window: timedelta) -> None:
    """Refuse to back up a partition (starting at ``start``) that retention would delete at
    once."""
    from rag_backup.errors import BackupExpired

    age = now - start
    if age > window:
        raise BackupExpired(
            f"{store}: partition {partition_key} is {_age(age)} old, outside the {_age(window)} "
            f"retention window; a backup for it would be deleted by the next retention run. "
            f"Back up a partition inside the window instead.")
