"""Reading a Milvus backup's artifacts through the repository: by manifest path, as a
checked local file, and the collection descriptions.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rag_backup.engines.milvus.fingerprint import fingerprint_of
from rag_backup.engines.milvus.schema import check_description
from rag_backup.errors import IntegrityError
from rag_backup.repository import Artifact, BackupRecord, BackupRepository


def _artifact(record: BackupRecord, path: str) -> Artifact:
    found = next((a for a in record.manifest.artifacts if a.path == path), None)
    if found is None:
        raise IntegrityError(f"milvus backup {record.partition_key}: the manifest lists no "
                             f"artifact {path}")
    return found


@contextmanager
def local_artifact(repo: BackupRepository, record: BackupRecord, path: str) -> Iterator[Path]:
    """A local file with the artifact's checked content (size and sha256 match the manifest):
    the file itself on a filesystem repository, else a temporary copy."""
    artifact = _artifact(record, path)
    local = repo.local_artifact_path(record, artifact)
    if local is not None:
        repo.stream_artifact(record, artifact)
        yield local
        return
    with tempfile.NamedTemporaryFile(prefix="rag-backup-milvus-", suffix=".part") as tmp:
        repo.stream_artifact(record, artifact, tmp.write)
        tmp.flush()
        yield Path(tmp.name)


def read_description(repo: BackupRepository, record: BackupRecord, name: str) -> dict[str, Any]:
    path = fingerprint_of(record).collections[name].description
    chunks: list[bytes] = []
    repo.stream_artifact(record, _artifact(record, path), chunks.append)
    try:
        desc = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise IntegrityError(f"milvus backup {record.partition_key}: {path} is not valid JSON: "
                             f"{exc}") from exc
    check_description(desc)
    return desc


def _where(record: BackupRecord, path: str) -> str:
    return f"milvus backup {record.partition_key}: {record.location}/{path}"
