"""Resources: where the backup repository is and how to reach each store.
Secrets arrive through ``dg.EnvVar`` and are never shown in the UI, logs or metadata.
"""


import os
from datetime import timedelta

import dagster as dg
from pydantic import Field

from rag_backup.alerts import Notifier, SmtpChannel, WebhookChannel
from rag_backup.defs.offsite_settings import OffsiteSettings, offsite_settings_from_env
from rag_backup.engines.milvus import DEFAULT_ROWS_PER_FILE, MilvusServer
from rag_backup.engines.minio import S3Endpoint
from rag_backup.engines.postgres import PostgresServer
from rag_backup.engines.redis import RedisServer
from rag_backup.repository import BackupRepository, backend_from_url
from rag_backup.repository.sealed import ENV_IDENTITY, ENV_RECIPIENTS, Crypto


def optional_env(name: str) -> dg.EnvVar | None:
    """``EnvVar(name)`` when the variable is set where the definitions load, else ``None``."""
    return dg.EnvVar(name) if os.environ.get(name) else None


class BackupRepositoryResource(OffsiteSettings):  # and the offsite copy's settings
    """The backup repository: a local directory, or ``s3://bucket/prefix`` (MinIO ``backups``)."""

    location: str = Field(description="Directory path, or s3://bucket/prefix")
    s3_endpoint: str | None = Field(default=None, description="S3 endpoint URL for s3:// locations")
    s3_access_key: str | None = Field(default=None, description="S3 access key (env)")
    s3_secret_key: str | None = Field(default=None, description="S3 secret key (env)")
    s3_region: str = "us-east-1"
    encrypt_to: str | None = Field(
        default=None, description="Age public keys backups are encrypted to, or a file of them "
        "(RAG_BACKUP_ENCRYPT_TO); unset: not encrypted, unless the repository already is")
    identity: str | None = Field(
        default=None, description="Age secret key that restores and verification decrypt "
        "with, or the path of an identity file (RAG_BACKUP_IDENTITY, from the environment)")

    def open(self) -> BackupRepository:
        return BackupRepository(backend_from_url(
            self.location, s3_endpoint=self.s3_endpoint, s3_access_key=self.s3_access_key,
            s3_secret_key=self.s3_secret_key, s3_region=self.s3_region), self.crypto())

    def crypto(self) -> Crypto | None:
        """The keys of both repositories (the offsite holds the same ciphertext)."""
        return Crypto.from_env({ENV_RECIPIENTS: self.encrypt_to or "",
                                ENV_IDENTITY: self.identity or ""})


class PostgresResource(dg.ConfigurableResource):
    """The PostgreSQL server to back up and restore into (a superuser, or a role that may dump
    every configured database and create databases)."""

    host: str
    port: int = 5432
    user: str
    password: str = Field(default="", description="From the environment (RAG_PG_PASSWORD)")
    databases: str = Field(default="", description="Comma-separated databases; empty: every "
                                                   "non-template database")
    bin_dir: str | None = Field(default=None, description="Directory of pg_dump/pg_restore; "
                                                          "default: the newest installed")
    timeout_s: int = Field(default=6 * 3600, description="Deadline of one pg_dump/pg_restore")
    zstd_level: int = Field(default=3, description="zstd level of the dump stream (1-19)")

    def server(self) -> PostgresServer:
        return PostgresServer(self.host, self.port, self.user, self.password,
                              bin_dir=self.bin_dir)

    def database_list(self) -> list[str] | None:
        names = [d.strip() for d in self.databases.split(",") if d.strip()]
        return names or None


class RedisResource(dg.ConfigurableResource):
    """The Redis server to back up (and the default target of replay restores)."""

    host: str
    port: int = 6379
    username: str | None = Field(default=None, description="ACL user; empty for the default")
    password: str = Field(default="", description="From the environment (RAG_REDIS_PASSWORD)")
    timeout_s: int = Field(default=3600, description="Deadline of one RDB transfer or load")
    zstd_level: int = Field(default=3, description="zstd level of the stored RDB (1-19)")

    def server(self) -> RedisServer:
        return RedisServer(self.host, self.port, self.password, self.username)


class MinioResource(dg.ConfigurableResource):
    """The MinIO (S3) server whose buckets are backed up, and the default restore target."""

    endpoint: str = Field(description="S3 endpoint URL of MinIO, e.g. http://minio:9000 "
                                      "(RAG_S3_ENDPOINT)")
    access_key: str = Field(description="Access key (from the environment: RAG_S3_ACCESS_KEY)")
    secret_key: str = Field(description="Secret key (from the environment: RAG_S3_SECRET_KEY)")
    region: str = Field(default="us-east-1", description="S3 region (RAG_S3_REGION)")
    buckets: str = Field(default="documents,models", description="Comma-separated buckets to "
                         "back up (RAG_MINIO_BUCKETS); never the bucket holding the backup "
                         "repository.")
    workers: int = Field(default=8, description="Parallel object transfers.")
    gc_grace_hours: int = Field(default=48, description="Unreferenced blobs younger than this "
                                "are never collected; must exceed the longest backup.")

    def s3(self, workers: int | None = None) -> S3Endpoint:
        return S3Endpoint(self.endpoint, self.access_key, self.secret_key, self.region,
                                 max_connections=max(10, 2 * (workers or self.workers)))

    def bucket_list(self) -> list[str]:
        return [b.strip() for b in self.buckets.split(",") if b.strip()]

    @property
    def gc_grace(self) -> timedelta:
        return timedelta(hours=self.gc_grace_hours)


class MilvusResource(dg.ConfigurableResource):
    """The Milvus server to back up and restore into (one database of it)."""

    uri: str = Field(description="Milvus endpoint, e.g. http://milvus:19530 (RAG_MILVUS_URI)")
    token: str = Field(default="", description="From the environment (RAG_MILVUS_TOKEN): "
                       "'user:password' or an API key; empty when authentication is off")
    db_name: str = Field(default="default", description="Database (RAG_MILVUS_DB_NAME)")
    collections: str = Field(default="", description="Comma-separated collections to back up "
                             "(RAG_MILVUS_COLLECTIONS); empty: every collection of the database")
    storage_root: str = Field(default="", description="Where the server keeps its binlogs, as "
                              "the server sees it (RAG_MILVUS_STORAGE_ROOT): localStorage.path "
                              "for local storage, minio.rootPath (e.g. 'files') for MinIO. Only "
                              "restores of auto_id collections that keep their ids need it.")
    batch_rows: int = Field(default=0, description="Rows per iterator/insert batch (64-16384); "
                            "0: about 16 MiB of raw data per batch. Memory is bounded by it.")
    rows_per_file: int = Field(default=DEFAULT_ROWS_PER_FILE,
                               description="A new Parquet file every this many rows")
    timeout_s: int = Field(default=120, description="Deadline of one ordinary Milvus call")
    long_timeout_s: int = Field(default=3600, description="Deadline of loads, flushes, index "
                                "builds and bulk imports")

    def server(self) -> MilvusServer:
        return MilvusServer(self.uri, self.token, self.db_name or "default",
                                   timeout_s=self.timeout_s, long_timeout_s=self.long_timeout_s,
                                   storage_root=self.storage_root)

    def collection_list(self) -> list[str] | None:
        names = [c.strip() for c in self.collections.split(",") if c.strip()]
        return names or None


class AlertResource(dg.ConfigurableResource):
    """Where alerts go: a webhook (JSON POST) and/or e-mail over SMTP. Unset channels are off."""

    webhook_url: str | None = Field(default=None, description="RAG_ALERT_WEBHOOK_URL")
    webhook_token: str | None = Field(default=None, description="Bearer token "
                                      "(RAG_ALERT_WEBHOOK_TOKEN)")
    smtp_host: str | None = Field(default=None, description="RAG_ALERT_SMTP_HOST")
    smtp_port: int = Field(default=25, description="RAG_ALERT_SMTP_PORT")
    smtp_username: str | None = Field(default=None, description="RAG_ALERT_SMTP_USERNAME")
    smtp_password: str | None = Field(default=None, description="RAG_ALERT_SMTP_PASSWORD")
    smtp_starttls: bool = Field(default=False, description="RAG_ALERT_SMTP_STARTTLS")
    smtp_from: str = Field(default="rag-backup@localhost", description="RAG_ALERT_EMAIL_FROM")
    smtp_to: str = Field(default="", description="Comma-separated recipients "
                         "(RAG_ALERT_EMAIL_TO)")

    def notifier(self) -> Notifier:
        recipients = tuple(a.strip() for a in self.smtp_to.split(",") if a.strip())
        smtp = (SmtpChannel(self.smtp_host, self.smtp_port, self.smtp_from, recipients,
                            self.smtp_username, self.smtp_password, self.smtp_starttls)
                if self.smtp_host and recipients else None)
        webhook = WebhookChannel(self.webhook_url, self.webhook_token) if self.webhook_url else None
        return Notifier(smtp=smtp, webhook=webhook)


class AutomationResource(dg.ConfigurableResource):
    """Tunables of catch-up and RPO monitoring."""

    catchup_window_hours: int = Field(default=72, description="How far back the catch-up sensor "
                                      "looks for partitions without a backup (never beyond a "
                                      "store's retention window).")
    rpo_grace_minutes: int = Field(default=30, description="Added to a store's RPO before an "
                                   "alert: a backup in progress is not a breach.")


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources configured from the environment (names in README.md, 'Configuration')."""
    return {
        "alerts": AlertResource(
            webhook_url=optional_env("RAG_ALERT_WEBHOOK_URL"),
            webhook_token=optional_env("RAG_ALERT_WEBHOOK_TOKEN"),
            smtp_host=optional_env("RAG_ALERT_SMTP_HOST"),
            smtp_port=dg.EnvVar.int("RAG_ALERT_SMTP_PORT") if os.environ.get(
                "RAG_ALERT_SMTP_PORT") else 25,
            smtp_username=optional_env("RAG_ALERT_SMTP_USERNAME"),
            smtp_password=optional_env("RAG_ALERT_SMTP_PASSWORD"),
            smtp_starttls=os.environ.get("RAG_ALERT_SMTP_STARTTLS", "").lower() in ("1", "true"),
            smtp_from=optional_env("RAG_ALERT_EMAIL_FROM") or "rag-backup@localhost",
            smtp_to=optional_env("RAG_ALERT_EMAIL_TO") or "",
        ),
        "automation": AutomationResource(),
        "repository": BackupRepositoryResource(
            location=dg.EnvVar("RAG_BACKUP_REPOSITORY"),
            s3_endpoint=optional_env("RAG_S3_ENDPOINT"),
            s3_access_key=optional_env("RAG_S3_ACCESS_KEY"),
            s3_secret_key=optional_env("RAG_S3_SECRET_KEY"),
            s3_region=optional_env("RAG_S3_REGION") or "us-east-1",
            encrypt_to=optional_env("RAG_BACKUP_ENCRYPT_TO"),
            identity=optional_env("RAG_BACKUP_IDENTITY"),
            **offsite_settings_from_env(),
        ),
        "postgres": PostgresResource(
            host=dg.EnvVar("RAG_PG_HOST"),
            port=dg.EnvVar.int("RAG_PG_PORT"),
            user=dg.EnvVar("RAG_PG_USER"),
            password=optional_env("RAG_PG_PASSWORD") or "",
            databases=optional_env("RAG_PG_DATABASES") or "",
            bin_dir=optional_env("RAG_PG_BIN_DIR"),
        ),
        "milvus": MilvusResource(
            uri=dg.EnvVar("RAG_MILVUS_URI"),
            token=optional_env("RAG_MILVUS_TOKEN") or "",
            db_name=optional_env("RAG_MILVUS_DB_NAME") or "default",
            collections=optional_env("RAG_MILVUS_COLLECTIONS") or "",
            storage_root=optional_env("RAG_MILVUS_STORAGE_ROOT") or "",
        ),
        "minio": MinioResource(
            endpoint=dg.EnvVar("RAG_S3_ENDPOINT"),
            access_key=dg.EnvVar("RAG_S3_ACCESS_KEY"),
            secret_key=dg.EnvVar("RAG_S3_SECRET_KEY"),
            region=optional_env("RAG_S3_REGION") or "us-east-1",
            buckets=optional_env("RAG_MINIO_BUCKETS") or "documents,models",
        ),
        "redis": RedisResource(
            host=dg.EnvVar("RAG_REDIS_HOST"),
            port=dg.EnvVar.int("RAG_REDIS_PORT"),
            username=optional_env("RAG_REDIS_USERNAME"),
            password=optional_env("RAG_REDIS_PASSWORD") or "",
        ),
    }
