"""``python -m rag_backup wal-status``: the archive's lag now, as JSON, for scripts and
monitoring without Dagster (exit 1 past the threshold or when it cannot be measured)."""

from __future__ import annotations

import json

from rag_backup.engines.postgres.pitr.archive import current_lag


def print_status(max_lag_s: float) -> int:
    from rag_backup.settings import postgres_from_env, repository_from_env

    lag = current_lag(repository_from_env(), postgres_from_env())
    print(json.dumps(lag.to_dict(), indent=2, default=str))
    return 0 if lag.seconds is not None and lag.seconds <= max_lag_s else 1
