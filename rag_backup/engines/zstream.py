"""Streaming zstd between tools, files and the repository, never whole in memory."""

from __future__ import annotations

from collections.abc import Iterator
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


class BlockReader:
    """The file object zstd's stream reader wants, over an iterator of byte blocks (a read
    returns at most the rest of the current block: the reader asks again; b"" only at the
    end)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks, self.pending = blocks, memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self.pending:  # an empty block is not the end
            block = next(self.blocks, None)
            if block is None:
                return b""
            self.pending = memoryview(block)
        size = len(self.pending) if size < 0 else size
        data, self.pending = self.pending[:size], self.pending[size:]
        return bytes(data)


def decompress_artifact(repo: BackupRepository, record: BackupRecord, artifact: Artifact, *,
                        consumer: StreamingProcess | None = None,
                        out: Writer | None = None) -> None:
    """Stream an artifact through sha256 and zstd into a child's stdin and/or a file.

    Memory stays bounded by a few ``COPY_CHUNK`` whatever the compression ratio. Three stages
    overlap, each on its own thread: reading the next compressed blocks (decrypting and hashing
    them), decompressing the block before, writing the one before that (zstd, sha256 and the
    decryption release the GIL). The compressed bytes read advance the current progress
    tracker (their total is ``artifact.size``). Raises
    ``IntegrityError`` for a checksum or size mismatch (reported first: it is the better
    diagnosis) or an invalid zstd stream (zstd's own frame checksum included). A consumer that
    stops reading early (``pg_restore --list`` after the table of contents) is tolerated.
    """
    pipe_open = consumer is not None
    failure: zstandard.ZstdError | None = None
    with repo.open_checked(record, artifact) as raw:
        counted = CountedReader(raw)
        compressed = read_ahead(iter(lambda: counted.read(COPY_CHUNK), b""), name="read")
        reader = zstandard.ZstdDecompressor().stream_reader(
            BlockReader(compressed), read_size=COPY_CHUNK, closefd=False)
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
            compressed.close()  # the reading thread is done before ``finish`` reads on
        raw.finish()
    if failure is not None:
        raise IntegrityError(f"{record.location}/{artifact.path} is not a valid zstd stream: "
                             f"{failure}")
