"""The ``RAG_*`` environment, read without Dagster: the repository and the PostgreSQL server,
for the long-running services and command-line tools (the Dagster resources read the same
variables)."""

from __future__ import annotations

import os

from rag_backup.engines.postgres import PostgresServer
from rag_backup.errors import InvalidRequest
from rag_backup.repository import BackupRepository, backend_from_url
from rag_backup.repository.sealed import Crypto


def required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise InvalidRequest(f"the environment variable {name} is not set")
    return value


def repository_from_env() -> BackupRepository:
    """``RAG_BACKUP_REPOSITORY`` (a directory or ``s3://bucket/prefix``, with ``RAG_S3_*``),
    encrypted to ``RAG_BACKUP_ENCRYPT_TO`` and decrypted with ``RAG_BACKUP_IDENTITY``."""
    return BackupRepository(backend_from_url(
        required("RAG_BACKUP_REPOSITORY"), s3_endpoint=os.environ.get("RAG_S3_ENDPOINT"),
        s3_access_key=os.environ.get("RAG_S3_ACCESS_KEY"),
        s3_secret_key=os.environ.get("RAG_S3_SECRET_KEY"),
        s3_region=os.environ.get("RAG_S3_REGION") or "us-east-1"), Crypto.from_env())


def postgres_from_env() -> PostgresServer:
    """``RAG_PG_HOST``, ``RAG_PG_PORT``, ``RAG_PG_USER``, ``RAG_PG_PASSWORD``."""
    port = os.environ.get("RAG_PG_PORT") or "5432"
    if not port.isdigit():
        raise InvalidRequest(f"RAG_PG_PORT is {port!r}, not a port number")
    return PostgresServer(required("RAG_PG_HOST"), int(port), required("RAG_PG_USER"),
                          os.environ.get("RAG_PG_PASSWORD", ""),
                          bin_dir=os.environ.get("RAG_PG_BIN_DIR") or None)


def offsite_from_env() -> BackupRepository | None:
    """``RAG_BACKUP_OFFSITE`` (a directory or ``s3://bucket/prefix``, with its own
    ``RAG_OFFSITE_S3_*``: another site, nothing falls back to the primary's), or ``None`` when
    unset; opened with the primary's encryption settings (the same ciphertext)."""
    from rag_backup.repository.offsite import open_offsite

    url = os.environ.get("RAG_BACKUP_OFFSITE", "").strip()
    if not url:
        return None
    crypto = Crypto.from_env()
    return open_offsite(
        url, s3_endpoint=os.environ.get("RAG_OFFSITE_S3_ENDPOINT") or None,
        s3_access_key=os.environ.get("RAG_OFFSITE_S3_ACCESS_KEY") or None,
        s3_secret_key=os.environ.get("RAG_OFFSITE_S3_SECRET_KEY") or None,
        s3_region=os.environ.get("RAG_OFFSITE_S3_REGION") or "us-east-1",
        lock_mode=os.environ.get("RAG_OFFSITE_LOCK_MODE") or "COMPLIANCE",
        retention_days=float(os.environ.get("RAG_OFFSITE_RETENTION_DAYS") or 0) or None,
        crypto=crypto)
