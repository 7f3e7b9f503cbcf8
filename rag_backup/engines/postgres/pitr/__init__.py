"""PostgreSQL point-in-time recovery: base backups plus the continuous WAL archive, restored to
any second the archive covers.

One concern per module:

- ``wal``: LSNs and segment names, timelines, the archive's index, commit times, its status;
- ``receiver``: the long-running WAL receiver (``python -m rag_backup wal-receiver``);
- ``basebackup``: ``pg_basebackup`` into the repository, extraction, ``pg_verifybackup``;
- ``archive``: a base backup verified with its WAL, an hour's continuity, the lag, retention;
- ``instance``: a private PostgreSQL instance on a data directory (recovery runs in it);
- ``restore``: the plan (refusals before anything changes) and the restore to a time.
"""

from rag_backup.engines.postgres.pitr.archive import (
    HourCheck,
    Lag,
    WalPruning,
    check_hour,
    current_lag,
    prune_wal,
    verify_with_wal,
    wait_for_wal,
)
from rag_backup.engines.postgres.pitr.basebackup import (
    BASE_ARTIFACT,
    BASE_STORE,
    BaseBackupFingerprint,
    BaseBackupOutcome,
    extract_base_backup,
    fingerprint_of,
    take_base_backup,
)
from rag_backup.engines.postgres.pitr.restore import (
    Into,
    PitrPlan,
    PitrReport,
    PitrTarget,
    Reachable,
    plan,
    reachable,
    restore,
    restore_to_time,
)
from rag_backup.engines.postgres.pitr.wal import ArchiveStatus, WalIndex, archive_status

__all__ = [
    "BASE_ARTIFACT", "BASE_STORE", "ArchiveStatus", "BaseBackupFingerprint", "BaseBackupOutcome",
    "HourCheck", "Into", "Lag", "PitrPlan", "PitrReport", "PitrTarget", "Reachable", "WalIndex",
    "WalPruning", "archive_status", "check_hour", "current_lag", "extract_base_backup",
    "fingerprint_of", "plan", "prune_wal", "reachable", "restore", "restore_to_time",
    "take_base_backup", "verify_with_wal", "wait_for_wal",
]
