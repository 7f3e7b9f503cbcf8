"""The embedded local stack: real PostgreSQL, Redis, an S3 server (moto) and Milvus on free
loopback ports, with all state under one root directory, and deterministic sample data.

    from rag_backup.devstack import DevStack
    stack = DevStack(root=tmp_path, services=("postgres", "redis"))
    env = stack.up(seed=True)      # idempotent
    stack.down()

CLI: ``python -m rag_backup.devstack up|down|status|env [--root DIR] [--no-seed] [--services ...]``.
No Dagster imports here: this package is used by test fixtures and scripts alike.
"""

from rag_backup.devstack.procs import DevStackError
from rag_backup.devstack.settings import (
    ENV_NAMES,
    MilvusSettings,
    PostgresSettings,
    RedisSettings,
    S3Settings,
)
from rag_backup.devstack.stack import SERVICE_NAMES, DevStack, default_root

__all__ = [
    "ENV_NAMES",
    "SERVICE_NAMES",
    "DevStack",
    "DevStackError",
    "MilvusSettings",
    "PostgresSettings",
    "RedisSettings",
    "S3Settings",
    "default_root",
]
