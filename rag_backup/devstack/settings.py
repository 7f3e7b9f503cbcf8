"""Connection settings of the devstack's stores, read from the environment-variable contract.

The names below are the contract other code reads (``eval "$(python -m rag_backup.devstack env)"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PG_ADMIN_USER = "rag_admin"
DAGSTER_USER = "dagster"
DAGSTER_DB = "dagster"
RAGQA_USER = "ragqa_user"
RAGQA_DB = "ragqa"
S3_REGION = "us-east-1"
S3_BUCKETS = ("documents", "models", "backups")

ENV_NAMES: dict[str, tuple[str, ...]] = {
    "postgres": (
        "RAG_PG_HOST",
        "RAG_PG_PORT",
        "RAG_PG_USER",
        "RAG_PG_PASSWORD",
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_PORT",
        "DAGSTER_PG_USER",
        "DAGSTER_PG_PASSWORD",
        "DAGSTER_PG_DB",
    ),
    "redis": ("RAG_REDIS_HOST", "RAG_REDIS_PORT", "RAG_REDIS_PASSWORD"),
    "s3": (
        "RAG_S3_ENDPOINT",
        "RAG_S3_ACCESS_KEY",
        "RAG_S3_SECRET_KEY",
        "RAG_S3_REGION",
    ),
    "milvus": ("RAG_MILVUS_URI", "RAG_MILVUS_TOKEN", "RAG_MILVUS_STORAGE_ROOT"),
    "stack": ("RAG_BACKUP_REPOSITORY", "DAGSTER_HOME"),
}
SECRET_ENV_NAMES = frozenset(
    {
        "RAG_PG_PASSWORD",
        "DAGSTER_PG_PASSWORD",
        "RAG_REDIS_PASSWORD",
        "RAG_S3_ACCESS_KEY",
        "RAG_S3_SECRET_KEY",
        "RAG_MILVUS_TOKEN",
    }
)


@dataclass(frozen=True)
class PostgresSettings:
    host: str
    port: int
    user: str
    password: str
    dbname: str = "postgres"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PostgresSettings:
        return cls(
            env["RAG_PG_HOST"],
            int(env["RAG_PG_PORT"]),
            env["RAG_PG_USER"],
            env["RAG_PG_PASSWORD"],
        )

    def connect_kwargs(self, dbname: str | None = None) -> dict[str, object]:
        """Keyword arguments for ``psycopg2.connect`` (the password travels in the connection, not argv)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": dbname or self.dbname,
            "connect_timeout": 10,
            "application_name": "rag_backup.devstack",
        }


@dataclass(frozen=True)
class RedisSettings:
    host: str
    port: int
    password: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedisSettings:
        return cls(
            env["RAG_REDIS_HOST"], int(env["RAG_REDIS_PORT"]), env["RAG_REDIS_PASSWORD"]
        )


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = S3_REGION

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Settings:
        return cls(
            env["RAG_S3_ENDPOINT"],
            env["RAG_S3_ACCESS_KEY"],
            env["RAG_S3_SECRET_KEY"],
            env["RAG_S3_REGION"],
        )

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                max_pool_connections=16,
            ),
        )


@dataclass(frozen=True)
class MilvusSettings:
    uri: str
    token: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MilvusSettings:
        return cls(env["RAG_MILVUS_URI"], env.get("RAG_MILVUS_TOKEN", ""))
