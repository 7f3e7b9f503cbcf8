"""The command line's connections, from the ``RAG_*`` environment only: the repository (the
same ``settings.repository_from_env`` the WAL receiver uses) and the stores (the Dagster
resources of ``default_resources``, resolved from ``os.environ`` without a Dagster instance,
so a command reaches a store exactly as a job does)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from rag_backup.errors import InvalidRequest
from rag_backup.repository import BackupRepository
from rag_backup.repository.lease import holder_name


def repository() -> BackupRepository:
    """``RAG_BACKUP_REPOSITORY`` (with ``RAG_S3_*`` for an ``s3://`` location)."""
    from rag_backup.settings import repository_from_env

    return repository_from_env()


def offsite_repository() -> BackupRepository | None:
    """``RAG_BACKUP_OFFSITE`` (with ``RAG_OFFSITE_S3_*``), or ``None`` when unset."""
    from rag_backup.settings import offsite_from_env

    return offsite_from_env()


class Repositories:
    """Both repositories, opened when asked (what ``defs.offsite_settings.pick_repository``
    chooses from)."""

    def open(self) -> BackupRepository:
        return repository()

    def open_offsite(self) -> BackupRepository | None:
        return offsite_repository()


def _problems(configured: Any) -> list[str]:
    """What is wrong with the environment variables a resource reads: unset ones, and ones
    that are not numbers where a number is needed (checked here: Dagster's own message would
    not say which variable is wrong)."""
    unset, bad = [], []
    for value in configured.__dict__.values():
        name = getattr(value, "env_var_name", None)
        text = os.environ.get(name, "").strip() if name else None
        if name is None:
            continue
        if not text:
            unset.append(name)
        elif isinstance(value, int) and not text.isdigit():
            bad.append(f"{name} is {text!r}, not a number")
    if unset:
        bad.insert(0, f"the environment variable{'s' if len(unset) > 1 else ''} "
                      f"{', '.join(unset)} {'are' if len(unset) > 1 else 'is'} not set")
    return bad


def resource(name: str) -> Any:
    """The Dagster resource ``name`` (``postgres``, ``redis``, ``minio``, ``milvus``)
    configured from the environment, ready to use; ``InvalidRequest`` naming a variable that
    is missing."""
    from rag_backup.defs.resources import default_resources

    configured = default_resources()[name]
    problems = _problems(configured)
    if problems:
        raise InvalidRequest(f"cannot reach {name}: {'; '.join(problems)} (see README, "
                             "'Configuration')")
    try:
        return configured.process_config_and_initialize()
    except Exception as exc:  # noqa: BLE001 - Dagster's config errors, named in one line
        raise InvalidRequest(f"cannot configure {name} from the environment "
                             f"({type(exc).__name__}); check its RAG_* variables") from exc


def run_id() -> str:
    """The ``run_id`` a manifest or verification record written by the command line
    carries: ``cli-`` and a random part (no Dagster run wrote it)."""
    return f"cli-{uuid.uuid4().hex[:12]}"


def holder(what: str) -> str:
    """This process as a lease holder: ``rag-backup CLI <what> on <host> (pid <pid>)``."""
    return holder_name(f"rag-backup CLI {what}")
