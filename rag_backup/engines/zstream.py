"""Streaming zstd between tools, files and the repository, never whole in memory."""

from __future__ import annotations

from typing import IO, Any

import zstandard

from rag_backup.errors import IntegrityError
from rag_backup.proc import StreamingProcess
from rag_backup.repository import Artifact, BackupRecord, BackupRepository, PendingBackup

COPY_CHUNK = 1024 * 1024


def copy_stream(source: IO[bytes], sink: Any, chunk: int = COPY_CHUNK) -> int:
    total = 0
    for block in iter(lambda: source.read(chunk), b""):
        sink.write(block)
        total += len(block)
    return total


def compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)


def compress_into(pending: PendingBackup, name: str, source: IO[bytes], level: int) -> None:
    """Stream ``source`` through zstd into artifact ``name`` of a pending backup."""
    with pending.artifact(name) as out:
        with compressor(level).stream_writer(out, closefd=False) as zout:
            copy_stream(source, zout)


def decompress_artifact(repo: BackupRepository, record: BackupRecord, artifact: Artifact, *,
                        consumer: StreamingProcess | None = None,
                        out: IO[bytes] | None = None) -> None:
    """Stream an artifact through sha256 and zstd into a child's stdin and/or a file.

    Raises ``IntegrityError`` for a checksum or size mismatch (reported first: it is the better
    diagnosis), an invalid zstd stream or a truncated frame. A consumer that stops reading early
    (``pg_restore --list`` after the table of contents) is tolerated.
    """
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    state: dict[str, Any] = {"pipe_open": consumer is not None, "error": None}
    where = f"{record.location}/{artifact.path}"

    def feed(chunk: bytes) -> None:
        if state["error"] is not None:
            return
        try:
            data = decompressor.decompress(chunk)
        except zstandard.ZstdError as exc:
            state["error"] = exc
            return
        if out is not None:
            out.write(data)
        if state["pipe_open"] and data:
            try:
                consumer.proc.stdin.write(data)  # type: ignore[union-attr]
            except BrokenPipeError:
                state["pipe_open"] = False

    repo.stream_artifact(record, artifact, feed)
    if state["error"] is not None:
        raise IntegrityError(f"{where} is not a valid zstd stream: {state['error']}")
    if not decompressor.eof:
        raise IntegrityError(f"{where} ends before its zstd frame does (truncated)")
