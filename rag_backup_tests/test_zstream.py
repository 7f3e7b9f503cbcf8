"""``engines.zstream.decompress_artifact``: the three overlapping stages (read and hash,
decompress, write) give back exactly the bytes that were compressed, count the compressed bytes
as progress, and refuse a damaged artifact, naming it, before anything acts on it. The stores'
restores through it are tested against the real servers (test_postgres, test_redis)."""

from __future__ import annotations

import io
import os

import pytest

from rag_backup import progress
from rag_backup.engines import zstream
from rag_backup.errors import IntegrityError
from rag_backup.repository import BackupRepository, FilesystemBackend
from rag_backup.repository.manifest import BackupOutcome

PARTITION = "2026-11-23-10:00"


@pytest.fixture
def stored(tmp_path):
    """A committed backup whose one artifact is 5.5 MB of half random, half repeated bytes,
    compressed as the engines do (several 1 MiB blocks on each side)."""
    data = b"".join(os.urandom(1 << 19) + b"COPY filler row\t" * (1 << 15) for _ in range(5)) \
        + os.urandom(123_457)
    repo = BackupRepository(FilesystemBackend(tmp_path / "repo"))
    with repo.begin("redis", PARTITION, "t") as pending:
        zstream.compress_into(pending, "data.zst", io.BytesIO(data), 3)
        pending.commit(BackupOutcome({"dbs": {}, "keys": 0, "expires": 0}, {}, "7"))
    record = repo.get("redis", PARTITION)
    [artifact] = record.manifest.artifacts
    return repo, record, artifact, data


def test_the_bytes_come_back_and_the_compressed_bytes_are_the_progress(stored):
    repo, record, artifact, data = stored
    out = io.BytesIO()
    with progress.tracking("unpack", total=artifact.size) as tracker:
        zstream.decompress_artifact(repo, record, artifact, out=out)
    assert out.getvalue() == data
    assert tracker.done == artifact.size  # counted by the reading thread, in the caller's context


@pytest.mark.parametrize("where", [0.1, 0.5, 0.999])
def test_a_damaged_artifact_is_refused_naming_it(stored, where):
    repo, record, artifact, _ = stored
    path = repo.local_artifact_path(record, artifact)
    damaged = bytearray(path.read_bytes())
    damaged[int(len(damaged) * where)] ^= 0x55
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match=f"{artifact.path}"):
        zstream.decompress_artifact(repo, record, artifact, out=io.BytesIO())


def test_a_block_reader_hands_out_blocks_in_pieces_and_ends_only_at_the_end():
    reader = zstream.BlockReader(iter([b"abc", b"", b"defgh", b"i"]))
    assert [reader.read(2), reader.read(2), reader.read(-1), reader.read(10), reader.read(10),
            reader.read(10)] == [b"ab", b"c", b"defgh", b"i", b"", b""]
