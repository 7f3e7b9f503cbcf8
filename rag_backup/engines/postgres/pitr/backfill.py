"""Honest backfills: a daily logical dump taken after its day ended holds that day's data, not
today's. When the archive can reach the end of the partition's window, the dump is taken from
a point-in-time recovery to that moment (a private instance, ``pg_dump``, removed afterwards);
otherwise from the live server, and the manifest says which (``recovery_point``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rag_backup.engines.postgres import backup as logical_backup
from rag_backup.engines.postgres.backup import BackupOutcome
from rag_backup.engines.postgres.common import Log, _quiet
from rag_backup.engines.postgres.pitr.restore import (
    PitrPlan,
    PitrTarget,
    plan,
    private_server,
    recover,
)
from rag_backup.engines.postgres.server import PostgresServer
from rag_backup.errors import RagBackupError
from rag_backup.repository import BackupRepository, PendingBackup

# A partition is a backfill once its window ended this long ago (a scheduled run a little
# late is still "now").
BACKFILL_AFTER = timedelta(minutes=30)


def choose_source(repo: BackupRepository, window_end: datetime, now: datetime
                  ) -> tuple[PitrPlan | None, dict[str, Any]]:
    """A recovery plan to ``window_end`` if this is a backfill the archive can serve, else
    ``None``; and the ``recovery_point`` record that says which, and why."""
    if now < window_end + BACKFILL_AFTER:
        return None, {"source": "live", "at": now.isoformat(),
                      "why": "the partition's window has not ended: the live server is its "
                             "state"}
    try:
        chosen = plan(repo, PitrTarget(time=window_end))
    except RagBackupError as exc:
        return None, {"source": "live", "at": now.isoformat(),
                      "why": f"a backfill after the partition's end ({window_end.isoformat()}),"
                             f" but point-in-time recovery cannot reach it: {exc}"}
    return chosen, {"source": "pitr", "target_time": window_end.isoformat(),
                    "base_backup": chosen.base.backup_id,
                    "wal_segments": len(chosen.segments)}


def backup_at(repo: BackupRepository, chosen: PitrPlan, credentials: PostgresServer,
              pending: PendingBackup, record: dict[str, Any], *,
              databases: Sequence[str] | None, timeout_s: float, zstd_level: int = 3,
              work_root: Path | None = None, log: Log = _quiet) -> BackupOutcome:
    """The logical backup of a private instance recovered to ``chosen``'s target; the outcome
    carries ``record`` completed with the time the copy reached."""
    work = Path(tempfile.mkdtemp(prefix="rag-pitr-dump-", dir=work_root))
    instance = None
    try:
        instance, timings = recover(repo, chosen, work / "data", work / "wal", credentials,
                                    timeout_s=timeout_s, log=log)
        summary = instance.recovery_summary()
        reached = summary.last_transaction_at
        log(f"recovered to {chosen.target.describe()} in {timings['replay_s']:.1f} s (newest "
            f"transaction {reached}); dumping it")
        outcome = logical_backup(private_server(instance, credentials), pending,
                                 databases=databases, timeout_s=timeout_s,
                                 zstd_level=zstd_level, log=log)
        point = dict(record, reached_at=reached.isoformat() if reached else None,
                     stop=summary.stop)
        return dataclasses.replace(outcome, recovery_point=point)
    finally:
        if instance is not None:
            instance.stop()
        shutil.rmtree(work, ignore_errors=True)
