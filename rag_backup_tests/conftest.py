"""Session fixtures: one real local stack (PostgreSQL, Redis, S3 server, Milvus) for the run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_backup.devstack import DevStack
from rag_backup.engines.postgres import PostgresServer
from rag_backup.repository import (
    BackupRecord,
    BackupRepository,
    FilesystemBackend,
    PendingBackup,
    Verification,
)
from rag_backup.repository.manifest import utcnow

ALL_SERVICES = ("postgres", "redis", "s3", "milvus")


def session_services(session: pytest.Session) -> tuple[str, ...]:
    """The services the collected tests need: a test module may name its own in
    ``STACK_SERVICES`` (e.g. no Milvus for the PostgreSQL tests); otherwise all of them."""
    wanted: set[str] = set()
    for item in session.items:
        wanted.update(getattr(item.module, "STACK_SERVICES", ALL_SERVICES))
    return tuple(name for name in ALL_SERVICES if name in wanted) or ALL_SERVICES


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[DevStack]:
    """The embedded stack, started and seeded once per session, stopped afterwards."""
    root = tmp_path_factory.mktemp("stack")
    # 750 documents (1,069 objects: listings still take two pages), conversations and vectors:
    # enough for every check, and the drills, which copy every object, stay quick; the demo
    # and test_devstack seed the full 2,000.
    stack = DevStack(root=root, services=session_services(request.session),
                     corpus_documents=750)
    try:
        stack.up(seed=True)
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def stack_env(stack: DevStack) -> dict[str, str]:
    return stack.env()


@pytest.fixture(scope="session")
def pg(stack_env: dict[str, str]) -> PostgresServer:
    return PostgresServer(stack_env["RAG_PG_HOST"], int(stack_env["RAG_PG_PORT"]),
                          stack_env["RAG_PG_USER"], stack_env["RAG_PG_PASSWORD"])


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repository"
    path.mkdir()
    return path


@pytest.fixture
def repo(repo_dir: Path) -> BackupRepository:
    return BackupRepository(FilesystemBackend(repo_dir))


@pytest.fixture
def dagster_env(stack_env: dict[str, str], repo_dir: Path,
                monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment the Definitions read, pointing at the stack and a fresh repo."""
    for name, value in stack_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAG_BACKUP_REPOSITORY", str(repo_dir))
    return dict(os.environ)


def take_backup(repo: BackupRepository, store: str, partition: str,
                backup: Callable[[PendingBackup], Any],
                verify: Callable[[BackupRecord], dict[str, Any]] | None = None,
                run_id: str = "test") -> tuple[Any, BackupRecord]:
    """Back up ``store`` for ``partition`` (``backup``: an engine's backup into the pending
    backup), commit it, and, given ``verify`` (an engine's verify), record that verification as
    passed. Returns the engine's outcome and the committed record."""
    with repo.begin(store, partition, run_id) as pending:
        outcome = backup(pending)
        pending.commit(outcome)
    record = repo.get(store, partition)
    assert record is not None
    if verify is not None:
        checks = verify(record)
        repo.record_verification(store, partition, Verification(
            record.backup_id, True, utcnow(), run_id, checks))
        record = repo.get(store, partition)
    return outcome, record


@pytest.fixture(scope="session")
def s3_client(stack_env: dict[str, str]):
    """A client of the stack's S3 server (tests of the repository's S3 backend)."""
    import boto3

    return boto3.client("s3", endpoint_url=stack_env["RAG_S3_ENDPOINT"],
                        aws_access_key_id=stack_env["RAG_S3_ACCESS_KEY"],
                        aws_secret_access_key=stack_env["RAG_S3_SECRET_KEY"],
                        region_name=stack_env.get("RAG_S3_REGION", "us-east-1"))


@pytest.fixture(params=["filesystem", "s3"])
def any_repo(request: pytest.FixtureRequest, tmp_path: Path) -> BackupRepository:
    """An empty repository on each backend: a directory, and a new bucket of the stack's S3
    server (a module using it names "s3" in STACK_SERVICES)."""
    import uuid

    from rag_backup.repository import FilesystemBackend, S3Backend

    if request.param == "filesystem":
        return BackupRepository(FilesystemBackend(tmp_path / "repo"))
    client = request.getfixturevalue("s3_client")
    bucket = f"repo-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return BackupRepository(S3Backend(client, bucket, prefix="rag-backup"))
