"""Exit codes and the one line an operator reads when a command fails.

0: success. 1: a check failed (a verification, a restore that differs from its backup, a drill
that found problems, an unhealthy WAL archive) or anything unexpected happened. 2: the request
was bad or refused before anything changed (an unknown store or partition, a missing
environment variable, a backup deleted by retention or not verified, a destructive restore
without its confirmation, a store whose lease another writer holds, refused credentials).
"""

from __future__ import annotations

from rag_backup.errors import (
    BackupExpired,
    BackupNotFound,
    BackupUnverified,
    ConfirmationRequired,
    CredentialsRejected,
    InvalidRequest,
    StoreBusy,
)

OK, CHECK_FAILED, REFUSED = 0, 1, 2
REFUSALS = (InvalidRequest, BackupNotFound, BackupExpired, BackupUnverified,
            ConfirmationRequired, StoreBusy, CredentialsRejected)


def _is_validation_error(exc: BaseException) -> bool:
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic comes with Dagster
        return False
    return isinstance(exc, ValidationError)


def exit_code(exc: BaseException) -> int:
    """2 for a refusal or bad input, 1 for everything else."""
    return REFUSED if isinstance(exc, REFUSALS) or _is_validation_error(exc) else CHECK_FAILED


def message(exc: BaseException) -> str:
    """What went wrong, for the one line: the error's own text (it names the store, the
    partition and what to do); a config validation error as its fields' complaints."""
    if _is_validation_error(exc):
        return "invalid options: " + "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
            for e in exc.errors())  # type: ignore[attr-defined]
    text = str(exc)
    return text if text else type(exc).__name__
