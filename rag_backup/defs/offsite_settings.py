"""The offsite repository's settings, part of the ``repository`` resource
(``BackupRepositoryResource`` inherits them), so every asset, check and restore op that reads
the repository can reach the offsite copy too, and a resource set without them (tests, a
deployment without an offsite) means "no offsite copy configured".

Another site: its own location, endpoint and credentials (``RAG_BACKUP_OFFSITE``,
``RAG_OFFSITE_S3_*``), nothing falls back to the primary's. Secrets arrive through
``dg.EnvVar`` and never reach metadata or logs.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.repository import BackupRepository


def _optional_env(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


class OffsiteSettings(dg.ConfigurableResource):
    """Where the offsite copy is (unset: none)."""

    offsite_location: str | None = Field(default=None, description="Offsite repository: a "
                                         "directory or s3://bucket/prefix (RAG_BACKUP_OFFSITE); "
                                         "unset: no offsite copy")
    offsite_s3_endpoint: str | None = Field(default=None, description="S3 endpoint of the "
                                            "offsite bucket (RAG_OFFSITE_S3_ENDPOINT)")
    offsite_s3_access_key: str | None = Field(default=None, description="Offsite access key "
                                              "(env: RAG_OFFSITE_S3_ACCESS_KEY)")
    offsite_s3_secret_key: str | None = Field(default=None, description="Offsite secret key "
                                              "(env: RAG_OFFSITE_S3_SECRET_KEY)")
    offsite_s3_region: str = Field(default="us-east-1", description="RAG_OFFSITE_S3_REGION")
    offsite_retention_days: float = Field(default=0, description="How long the offsite keeps "
                                          "a backup (RAG_OFFSITE_RETENTION_DAYS); 0: twice the "
                                          "store's primary window")
    offsite_lock_mode: str = Field(default="COMPLIANCE", description="Object Lock mode of "
                                   "offsite writes on a lock-enabled bucket "
                                   "(RAG_OFFSITE_LOCK_MODE: COMPLIANCE or GOVERNANCE)")

    @property
    def offsite_configured(self) -> bool:
        return bool(self.offsite_location)

    def crypto(self) -> Any:
        """The repositories' keys (``BackupRepositoryResource.crypto``)."""
        return None

    def open_offsite(self) -> BackupRepository | None:
        """The offsite repository, or ``None`` when RAG_BACKUP_OFFSITE is unset."""
        if not self.offsite_location:
            return None
        from rag_backup.repository.offsite import open_offsite

        return open_offsite(self.offsite_location, s3_endpoint=self.offsite_s3_endpoint,
                            s3_access_key=self.offsite_s3_access_key,
                            s3_secret_key=self.offsite_s3_secret_key,
                            s3_region=self.offsite_s3_region, lock_mode=self.offsite_lock_mode,
                            retention_days=self.offsite_retention_days or None,
                            crypto=self.crypto())


def offsite_settings_from_env() -> dict[str, Any]:
    """The ``repository`` resource's offsite fields, from the environment."""
    return {
        "offsite_location": _optional_env("RAG_BACKUP_OFFSITE"),
        "offsite_s3_endpoint": _optional_env("RAG_OFFSITE_S3_ENDPOINT"),
        "offsite_s3_access_key": _optional_env("RAG_OFFSITE_S3_ACCESS_KEY"),
        "offsite_s3_secret_key": _optional_env("RAG_OFFSITE_S3_SECRET_KEY"),
        "offsite_s3_region": os.environ.get("RAG_OFFSITE_S3_REGION") or "us-east-1",
        "offsite_retention_days": float(os.environ.get("RAG_OFFSITE_RETENTION_DAYS") or 0),
        "offsite_lock_mode": os.environ.get("RAG_OFFSITE_LOCK_MODE") or "COMPLIANCE",
    }


# -- which repository a restore reads ---------------------------------------------------------

REPOSITORY_HELP = ("Which repository to restore from: 'primary', 'offsite' (RAG_BACKUP_OFFSITE: "
                   "the copy at the other site), or 'auto': the primary, falling back to the "
                   "offsite copy when the primary is unreachable or lacks the backup (the choice "
                   "and its reason are logged and recorded in the run's metadata).")


def repository_field() -> Any:
    return Field(default="auto", description=REPOSITORY_HELP)


def pick_repository(settings: Any, which: str, has_backup, log) -> Any:
    """``choose_repository`` for ``settings`` (the ``repository`` resource, or anything with
    ``open`` and ``open_offsite``), logged with its reason; a ``RepositoryChoice``."""
    from rag_backup.repository.offsite import choose_repository

    choice = choose_repository(which, settings.open, settings.open_offsite, has_backup)
    log(f"restoring from the {choice.name} repository {choice.repo.root_location}: "
        f"{choice.reason}")
    return choice


def choice_metadata(choice: Any) -> dict[str, Any]:
    return {"repository": dg.MetadataValue.text(choice.name),
            "repository_reason": dg.MetadataValue.text(choice.reason),
            "repository_location": dg.MetadataValue.text(choice.repo.root_location)}


def restore_repository(settings: Any, config: Any, store: str, log) -> Any:
    """The repository a one-store restore (``config``: its restore config, with
    ``repository``, ``partition_key`` and perhaps ``allow_unverified``) reads."""
    verified = not getattr(config, "allow_unverified", False)
    return pick_repository(settings, getattr(config, "repository", "primary"),
                           lambda repo: repo.resolve(store, config.partition_key,
                                                     require_verified=verified), log)
