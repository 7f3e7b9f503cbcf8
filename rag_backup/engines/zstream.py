"""Streaming zstd between tools, files and the repository, never whole in memory."""

from __future__ import annotations

from typing import IO, Any, Protocol

import zstandard

from rag_backup import progress
from rag_backup.engines.prefetch import read_ahead
from rag_backup.errors import IntegrityError
from rag_backup.proc import StreamingProcess
from rag_backup.repository import Artifact, BackupRecord, BackupRepository, PendingBackup

COPY_CHUNK = 1024 * 1024


class Writer(Protocol):
    """Where decompressed bytes go: a file, or a wrapper of one (``postgres.toc.BlockMarks``)."""

    def write(self, data: bytes, /) -> Any: ...


def copy_stream(source: IO[bytes], sink: Any, chunk: int = COPY_CHUNK) -> int:
    """Copy ``source`` into ``sink``; the bytes read advance the current progress tracker."""
    total = 0
    for block in iter(lambda: source.read(chunk), b""):
        sink.write(block)
        total += len(block)
        progress.advance(len(block))
    return total


class CountedReader:
    """A reader whose bytes advance the current progress tracker: the compressed side of a
    decompression, whose size the manifest knows exactly (the decompressed size it does not)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        progress.advance(len(data))
        return data


def compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)


def compress_into(pending: PendingBackup, name: str, source: IO[bytes], level: int) -> None:
    """Stream ``source`` through zstd into artifact ``name`` of a pending backup."""
    with pending.artifact(name) as out:
        with compressor(level).stream_writer(out, closefd=False) as zout:
            copy_stream(source, zout)


def decompress_artifact(repo: BackupRepository, record: BackupRecord, artifact: Artifact, *,
                        consumer: StreamingProcess | None = None,
                        out: Writer | None = None) -> None:
    """Stream an artifact through sha256 and zstd into a child's stdin and/or a file.

    Memory stays bounded by a few ``COPY_CHUNK`` whatever the compression ratio. A thread reads,
    checks and decompresses the next block while this one is written (zstd and sha256 release
    the GIL), so the two overlap. The compressed bytes read advance the current progress
    tracker (their total is ``artifact.size``). Raises
    ``IntegrityError`` for a checksum or size mismatch (reported first: it is the better
    diagnosis) or an invalid zstd stream (zstd's own frame checksum included). A consumer that
    stops reading early (``pg_restore --list`` after the table of contents) is tolerated.
    """
    pipe_open = consumer is not None
    failure: zstandard.ZstdError | None = None
    with repo.open_checked(record, artifact) as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(CountedReader(raw),
                                                            read_size=COPY_CHUNK, closefd=False)
        blocks = read_ahead(iter(lambda: reader.read(COPY_CHUNK), b""), name="unzstd")
        try:
            for block in blocks:
                if out is not None:
                    out.write(block)
                if pipe_open:
                    try:
                        consumer.proc.stdin.write(block)  # type: ignore[union-attr]
                    except BrokenPipeError:
                        pipe_open = False
        except zstandard.ZstdError as exc:
            failure = exc
        finally:
            blocks.close()
        raw.finish()
    if failure is not None:
        raise IntegrityError(f"{record.location}/{artifact.path} is not a valid zstd stream: "
                             f"{failure}")
