"""``python -m rag_backup wal-status``: the archive's lag now, as JSON, for scripts and
monitoring without Dagster (exit 1 past the threshold, when it cannot be measured, or when
something threatens it: no slot, an inactive slot, a slot losing WAL, a timeline not followed)."""

from __future__ import annotations

import json
import os

from rag_backup.engines.postgres.pitr.archive import current_lag


def print_status(max_lag_s: float) -> int:
    from rag_backup.settings import postgres_from_env, repository_from_env

    slot = os.environ.get("RAG_PG_WAL_SLOT", "").strip() or "rag_backup"
    lag = current_lag(repository_from_env(), postgres_from_env(), slot=slot)
    print(json.dumps(lag.to_dict(), indent=2, default=str))
    healthy = lag.seconds is not None and lag.seconds <= max_lag_s and not lag.problems
    return 0 if healthy else 1
