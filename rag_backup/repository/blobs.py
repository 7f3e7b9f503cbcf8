"""The content-addressed blob store: object contents (the MinIO engine's copies), shared by
every backup and named by their sha256, so one content is stored once whatever its key, and no
key ever becomes part of a path in the repository.

Layout (identical on every backend)::

    objectstore/blobs/<aa>/<sha256>    a blob: exactly the bytes whose sha256 is its name
                                       (``<aa>``: the hash's first two hex digits)
    objectstore/tmp/<owner>-<hex>      a large blob while it is written: streamed there,
                                       hashed on the way, renamed to its name once its hash is
                                       known (``<owner>``: the writing backup's id)

A put is idempotent (same content, same name). A blob is written again whenever a writer
stores it, even when it exists already, so its modification time is fresh: garbage collection
(``BlobStore.collect``) deletes only unreferenced blobs older than a grace period, which is
what keeps the blobs of a backup still running. A small NEW blob is written without its own
fsync: the writer's ``sync`` (and the backup's commit, before its manifest) makes all of them
durable at once, so a crash before the commit can leave a damaged blob only where no committed
backup refers to it (a later backup writes it again; verification re-hashes every referenced
blob). A blob that exists already is never replaced unsynced (``FilesystemBackend`` links new
names and syncs replacements). Readers hash what they read against the name;
the store itself never trusts a blob's bytes.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from rag_backup.errors import IntegrityError
from rag_backup.repository.backends import TMP_MARKER, Backend
from rag_backup.repository.manifest import utcnow

BLOB_PREFIX = "objectstore/blobs"
TMP_PREFIX = "objectstore/tmp"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SMALL_BLOB = 8 * 1024 * 1024     # hashed in memory and written once; larger ones stream to a temp
CHUNK = 1024 * 1024
DELETE_BATCH = 1000


def blob_key(sha256: str) -> str:
    """``objectstore/blobs/<aa>/<sha256>``; only ever built from a validated hex digest."""
    if not SHA256_HEX.fullmatch(sha256 or ""):
        raise IntegrityError(f"{sha256!r} is not a sha256 hex digest")
    return f"{BLOB_PREFIX}/{sha256[:2]}/{sha256}"


def blob_sha(key: str) -> str | None:
    """The sha256 of a blob key, or None for anything else found under the blob prefix."""
    parts = key.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == BLOB_PREFIX \
            and SHA256_HEX.fullmatch(parts[3]) and parts[2] == parts[3][:2]:
        return parts[3]
    return None


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its name, size and modification time (from the backend's listing)."""

    sha256: str
    size: int
    mtime: datetime


@dataclass(frozen=True)
class BlobCollection:
    """What one garbage collection found (and, unless ``dry_run``, deleted)."""

    blobs_seen: int
    blobs_deleted: int
    bytes_deleted: int
    blobs_kept_in_grace: int
    temporaries_deleted: int
    unknown_files: int
    dry_run: bool


class BlobStore:
    """The repository's content-addressed blobs (``repo.blobs``)."""

    TMP_PREFIX = TMP_PREFIX  # where large blobs are written before their hash is known

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def location(self, sha256: str) -> str:
        """Where the blob ``sha256`` is, for messages (a path or an ``s3://`` URL)."""
        return self._backend.location(blob_key(sha256))

    def open(self, sha256: str) -> BinaryIO:
        """A stream of the blob named ``sha256`` (``FileNotFoundError`` if there is none). The
        bytes are not checked here: the reader hashes them against the name."""
        return self._backend.open_read(blob_key(sha256))

    def list(self) -> Iterator[BlobInfo]:
        """Every blob, in key order (files under the prefix not named like blobs are left
        out)."""
        for info in self._backend.list_files(BLOB_PREFIX):
            sha = blob_sha(info.key)
            if sha is not None:
                yield BlobInfo(sha, info.size, info.mtime)

    def sizes(self) -> dict[bytes, int]:
        """Which blobs exist, with their size: sha256 (32 bytes) -> size, from one listing."""
        return {bytes.fromhex(blob.sha256): blob.size for blob in self.list()}

    def check(self, sha256: str, size: int) -> tuple[str | None, int]:
        """``(None, bytes read)`` when the blob is present, ``size`` bytes long and its bytes
        hash to its name; otherwise ``(what is wrong, bytes read)``. Streamed in CHUNKs (never
        the whole blob in memory); reading stops once the blob is longer than ``size``."""
        digest, length = hashlib.sha256(), 0
        try:
            stream = self.open(sha256)
        except FileNotFoundError:
            return "missing", 0
        with stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
                length += len(chunk)
                if length > size:
                    return f"longer than the {size} bytes expected (overwritten)", length
        if length != size:
            return f"{length} bytes, {size} expected (truncated or overwritten)", length
        if digest.hexdigest() != sha256:
            return f"content hashes to {digest.hexdigest()} (corrupt)", length
        return None, length

    def writer(self, owner: str) -> BlobWriter:
        """A writer of blobs for one backup (``owner``: its id, which names its temporaries),
        shared by its worker threads."""
        return BlobWriter(self._backend, owner)

    def collect(self, referenced: Collection[str], *, grace: timedelta,
                now: datetime | None = None, dry_run: bool = False) -> BlobCollection:
        """Delete blobs not in ``referenced`` whose modification time is older than ``grace``,
        and temporaries (of writers that died) older than ``grace``. Files under the blob
        prefix not named like blobs are counted and left alone.

        ``referenced`` must be complete, read before this call: a caller that cannot know
        every reference (a record it cannot read) raises instead of calling, and nothing is
        deleted. ``grace`` must be longer than the longest writer: a blob being written (or
        written again) is younger than that until the record referencing it is committed."""
        cutoff = (now or utcnow()) - grace
        backend = self._backend
        seen = deleted = deleted_bytes = young = temporaries = unknown = 0
        doomed: list[str] = []

        def flush() -> None:
            if doomed and not dry_run:
                backend.delete_many(doomed)
            doomed.clear()

        for info in backend.list_files(BLOB_PREFIX, include_temporary=True):
            if TMP_MARKER in info.key.rsplit("/", 1)[-1]:
                if info.mtime < cutoff:
                    temporaries += 1
                    doomed.append(info.key)
                continue
            sha = blob_sha(info.key)
            if sha is None:
                unknown += 1
                continue
            seen += 1
            if sha in referenced:
                continue
            if info.mtime >= cutoff:
                young += 1
                continue
            deleted += 1
            deleted_bytes += info.size
            doomed.append(info.key)
            if len(doomed) >= DELETE_BATCH:
                flush()
        for info in backend.list_files(TMP_PREFIX, include_temporary=True):
            if info.mtime < cutoff:
                temporaries += 1
                doomed.append(info.key)
        flush()
        return BlobCollection(seen, deleted, deleted_bytes, young, temporaries, unknown,
                              dry_run)


class BlobWriter:
    """The puts of one backup, shared by its worker threads: each content is written once per
    backup (by the first thread to store it), always, even when it exists already, so its
    modification time is fresh (see ``BlobStore.collect``)."""

    def __init__(self, backend: Backend, owner: str) -> None:
        self._backend, self.owner = backend, owner
        self._written: set[str] = set()
        self._lock = threading.Lock()

    def _claim(self, sha: str) -> bool:
        """True for the first thread of this writer to store ``sha``: it writes the blob."""
        with self._lock:
            if sha in self._written:
                return False
            self._written.add(sha)
            return True

    def _release(self, sha: str) -> None:
        with self._lock:
            self._written.discard(sha)

    def sync(self) -> None:
        """Make the small blobs written so far durable: on a filesystem one ``syncfs``
        instead of two fsyncs per blob (``PendingBackup.commit`` does it too, before the
        manifest)."""
        self._backend.sync_pending()

    def put(self, chunks: Iterable[bytes], size: int) -> tuple[str, int]:
        """Store a stream as a blob; return its sha256 and length. ``size`` (expected) chooses
        how: small blobs are hashed in memory and written once; large ones stream to a
        temporary under ``TMP_PREFIX`` that is renamed to their hash (same content, same name:
        idempotent)."""
        backend = self._backend
        if size <= SMALL_BLOB:
            data = b"".join(chunks)
            sha = hashlib.sha256(data).hexdigest()
            if self._claim(sha):
                try:  # made durable by ``sync`` (before the backup's manifest commits)
                    backend.write_bytes(blob_key(sha), data, sync=False)
                except BaseException:
                    self._release(sha)
                    raise
            return sha, len(data)
        tmp = f"{TMP_PREFIX}/{self.owner}-{uuid.uuid4().hex}"
        digest, length = hashlib.sha256(), 0
        try:
            with backend.open_write(tmp) as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    length += len(chunk)
            sha = digest.hexdigest()
            if self._claim(sha):
                try:
                    backend.rename(tmp, blob_key(sha))
                except BaseException:
                    self._release(sha)
                    raise
            else:
                backend.delete(tmp)
        except BaseException:
            try:
                backend.delete(tmp)
            except Exception:  # noqa: BLE001 - collection removes stale temporaries
                pass
            raise
        return sha, length
