"""Storage backends of the backup repository: a local directory and an S3 bucket.

Both expose the same small interface over relative, '/'-separated keys. Writes are atomic per
key: a reader sees the old content or the new, never a part. On the filesystem that is a write
to a temporary name, fsync, rename; on S3 it is a single PUT or a completed multipart upload.

Every failure of the storage itself (S3: connection refused or reset, timeout, HTTP 5xx, access
denied; filesystem: disk full, read-only, I/O error, permission denied) is raised as a
``RepositoryError`` that names the operation, the location, the store and partition the key
belongs to, and carries the backend's own text; transient ones are ``RepositoryUnavailable``.
A missing key is still ``FileNotFoundError`` (or ``None`` from ``read_bytes``). A failed clean-up
after an error never replaces that error: it is logged and added to it as a note.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from rag_backup.errors import (
    IntegrityError,
    InvalidRequest,
    RepositoryError,
    RepositoryUnavailable,
    StoreUnreachable,
)

TMP_MARKER = ".tmp-"
S3_PART_SIZE = 16 * 1024 * 1024
S3_MAX_ATTEMPTS = 5  # botocore's attempts per request (standard retry mode) before we see it
S3_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
S3_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "ServiceUnavailable",
                                "InternalError", "OperationAborted", "RequestTimeTooSkewed"})
PARTITION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(-\d{2}:\d{2})?$")
SHARED_AREAS = {"objectstore": "minio"}  # top-level areas that belong to one store

log = logging.getLogger(__name__)

# errno -> (what it is, what to do); anything else is reported with the system's own text
FS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "Free space on the repository's filesystem or enlarge it "
                   "(retention of expired backups frees space); nothing was committed, the "
                   "previous backup of the partition is intact."),
    errno.EDQUOT: ("quota exceeded", "Raise the quota of the repository's filesystem or free "
                   "space; nothing was committed."),
    errno.EROFS: ("read-only filesystem", "The repository's filesystem is mounted read-only "
                  "(often after disk errors): check the kernel log, then remount it read-write."),
    errno.EIO: ("I/O error", "The repository's disk reports I/O errors: check the device "
                "(kernel log, SMART) before trusting it; verify recent backups afterwards."),
    errno.EACCES: ("permission denied", "Give the user running Dagster write access to the "
                   "repository directory."),
    errno.EPERM: ("operation not permitted", "Give the user running Dagster write access to "
                  "the repository directory."),
}
FS_TRANSIENT = frozenset({errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.ECONNRESET,
                          errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED})


def safe_key(key: str) -> str:
    """Reject keys that could escape the repository root; return the normalised key."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"unsafe repository key {key!r}")
    parts = PurePosixPath(key).parts
    if any(p in ("", ".", "..") for p in parts) or str(PurePosixPath(*parts)) != key.rstrip("/"):
        raise InvalidRequest(f"unsafe repository key {key!r}")
    return key.rstrip("/")


def describe_key(key: str) -> tuple[str | None, str | None]:
    """The store and partition a repository key belongs to (``None`` where it has none)."""
    parts = key.split("/")
    if not parts or not parts[0]:
        return None, None
    store = SHARED_AREAS.get(parts[0], parts[0])
    partition = parts[1] if len(parts) > 1 and PARTITION_RE.match(parts[1]) else None
    return store, partition


def _context(store: str | None, partition: str | None) -> str:
    bits = [f"store {store}" if store else "", f"partition {partition}" if partition else ""]
    joined = ", ".join(b for b in bits if b)
    return f" ({joined})" if joined else ""


def filesystem_error(exc: OSError, operation: str, location: str, key: str
                     ) -> RepositoryError:
    store, partition = describe_key(key)
    kind, hint = FS_ERRORS.get(exc.errno or 0, ("error", "Check the repository's filesystem."))
    transient = exc.errno in FS_TRANSIENT
    if transient:
        kind, hint = "unavailable", "Retried; if it persists, check the network filesystem."
    text = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
    cls = RepositoryUnavailable if transient else RepositoryError
    return cls(f"backup repository {kind}: {operation} {location}{_context(store, partition)} "
               f"failed: {text}. {hint}", operation=operation, location=location, store=store,
               partition=partition, backend_error=text)


def s3_error(exc: BaseException, operation: str, location: str, key: str, endpoint: str
             ) -> RepositoryError | IntegrityError | None:
    """A ``RepositoryError`` for a botocore/urllib3 failure (``IntegrityError`` when the bytes
    S3 returned do not match the checksum stored with the object: damaged, not unreachable);
    ``None`` if ``exc`` is not one."""
    from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError
    from urllib3.exceptions import HTTPError as Urllib3Error

    store, partition = describe_key(key)
    where = f"{operation} {location} at {endpoint}{_context(store, partition)}"
    if isinstance(exc, FlexibleChecksumError):
        return IntegrityError(f"{location}{_context(store, partition)} is damaged: {operation} "
                              f"at {endpoint} returned bytes that do not match the checksum "
                              f"stored with the object ({exc})")
    fields = dict(operation=operation, location=location, store=store, partition=partition,
                  backend_error=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code", ""))
        text = f"HTTP {status} {code}: {err.get('Message', '') or exc}"
        fields["backend_error"] = text
        if status >= 500 or code in S3_TRANSIENT_CODES:
            return RepositoryUnavailable(
                f"backup repository unavailable: {where} failed: {text}. Retried; if it "
                "persists, check the S3 service.", **fields)
        hint = ("Check the repository's credentials (RAG_S3_ACCESS_KEY / RAG_S3_SECRET_KEY) and "
                "the bucket policy." if status in (401, 403) else
                "Check RAG_BACKUP_REPOSITORY and that the bucket exists.")
        return RepositoryError(f"backup repository refused: {where} failed: {text}. {hint}",
                               **fields)
    if isinstance(exc, (BotoCoreError, Urllib3Error)):
        from botocore.exceptions import NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return RepositoryError(f"backup repository refused: {where} failed: {exc}. Set "
                                   "RAG_S3_ACCESS_KEY / RAG_S3_SECRET_KEY.", **fields)
        return RepositoryUnavailable(
            f"backup repository unreachable: {where} failed: {type(exc).__name__}: {exc}. "
            "Retried; if it persists, check the S3 service, the network and RAG_S3_ENDPOINT.",
            **fields)
    return None


def cleanup_after(error: BaseException, what: str, action: Callable[[], Any]) -> None:
    """Run a clean-up step after ``error``; if it fails too, log that and add it to ``error``
    as a note, never replacing ``error`` (the caller re-raises it)."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the original error is the one to report
        note = (f"clean-up after this error failed too ({what}): {type(exc).__name__}: {exc}; "
                "what it left behind is collected by retention once stale")
        log.warning(note)
        error.add_note(note)


@dataclass(frozen=True)
class FileInfo:
    """One stored file: its key (relative to the backend's root), size and modification time."""

    key: str
    size: int
    mtime: datetime


@dataclass(frozen=True)
class IncompleteUpload:
    """An S3 multipart upload that was started and never completed nor aborted."""

    key: str  # relative to the backend's root
    upload_id: str
    initiated: datetime


class Backend(Protocol):
    # ``sync=False``: durable only after the next ``sync_pending`` (one barrier for many small
    # files instead of an fsync each); a backend whose writes are durable when they return
    # (S3) ignores it
    def open_write(self, key: str, *, sync: bool = True
                   ) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes, *, sync: bool = True) -> None: ...
    def sync_pending(self) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def list_children(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def location(self, key: str) -> str: ...
    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]: ...
    def rename(self, source: str, target: str) -> None: ...
    def delete_many(self, keys: Iterable[str]) -> None: ...
    def list_incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]: ...
    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None: ...
    def put_if(self, key: str, data: bytes, expected: bytes | None) -> bool: ...
    def delete_if(self, key: str, expected: bytes) -> bool: ...


class _TranslatingStream:
    """A file-like object whose read/write failures become ``RepositoryError``s."""

    def __init__(self, raw: Any, translate: Callable[[BaseException], RepositoryError | None]
                 ) -> None:
        self._raw, self._translate = raw, translate

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._raw, name)(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from exc

    def read(self, size: int = -1) -> bytes:
        return self._call("read", size)

    def write(self, data: bytes) -> int:
        return self._call("write", data)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _TranslatingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FilesystemBackend:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._unsynced = False  # a write with sync=False since the last sync_pending

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def _translate(self, operation: str, key: str) -> Callable[[BaseException], Any]:
        def translate(exc: BaseException) -> RepositoryError | None:
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                return filesystem_error(exc, operation, self.location(key) if key else
                                        str(self.root), key)
            return None
        return translate

    @contextlib.contextmanager
    def _op(self, operation: str, key: str) -> Iterator[None]:
        """Raise the storage's own failures inside the block as ``RepositoryError``."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self._translate(operation, key)(exc) from exc

    @contextlib.contextmanager
    def open_write(self, key: str, *, sync: bool = True) -> Iterator[BinaryIO]:
        """Write ``key`` atomically (a temporary renamed into place); durable when the block
        exits (fsync of the file and its directory), or with ``sync=False`` at the next
        ``sync_pending`` (a new file only: one that replaces a file is always synced)."""
        final = self._path(key)
        tmp = final.with_name(f"{final.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
        with self._op("create", key):
            final.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
        try:
            yield _TranslatingStream(fh, self._translate("write", key))  # type: ignore[misc]
            with self._op("write", key):
                fh.flush()
                if not sync and self._link_new(tmp, final):
                    fh.close()
                    tmp.unlink()
                    self._unsynced = True
                else:
                    os.fsync(fh.fileno())
                    fh.close()
                    os.replace(tmp, final)
                    _fsync_dir(final.parent)
        except BaseException as exc:
            cleanup_after(exc, f"closing {tmp}", fh.close)
            cleanup_after(exc, f"removing {tmp}", lambda: tmp.unlink(missing_ok=True))
            raise

    def open_read(self, key: str) -> BinaryIO:
        with self._op("read", key):
            fh = open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
        return _TranslatingStream(fh, self._translate("read", key))  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with self._op("read", key):
                return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes, *, sync: bool = True) -> None:
        with self.open_write(key, sync=sync) as fh:
            fh.write(data)

    @staticmethod
    def _link_new(tmp: Path, final: Path) -> bool:
        """Give ``tmp`` the name ``final`` only if no file has it (a hard link never replaces
        one): an unsynced write never replaces a file, which may belong to a committed backup.
        False when ``final`` exists or the filesystem has no hard links: write it durably."""
        try:
            os.link(tmp, final)
            return True
        except OSError:
            return False

    def sync_pending(self) -> None:
        """Make every write made with ``sync=False`` durable: one ``syncfs`` of the
        repository's filesystem, one journal commit instead of two fsyncs per file."""
        if not self._unsynced:
            return
        self._unsynced = False  # a write finishing meanwhile is synced below or sets it again
        with self._op("sync", ""):
            _syncfs(self.root)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (atomically); return whether it was written."""
        path = self._path(key)
        with self._op("create", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    def exists(self, key: str) -> bool:
        with self._op("stat", key):
            return self._path(key).exists()

    def size(self, key: str) -> int | None:
        """``key``'s size in bytes, ``None`` if there is no such file."""
        with self._op("stat", key):
            try:
                return self._path(key).stat().st_size
            except FileNotFoundError:
                return None

    def list_children(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        with self._op("list", prefix):
            if not base.is_dir():
                return []
            return sorted(p.name for p in base.iterdir() if TMP_MARKER not in p.name)

    def delete(self, key: str) -> None:
        with self._op("delete", key):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        with self._op("delete", prefix):
            shutil.rmtree(path, onerror=_ignore_missing)

    def location(self, key: str) -> str:
        return str(self.root) if not key else str(self._path(key))

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]:
        """Every file under ``prefix`` (recursively, in key order) with its size and mtime.

        Temporary files of unfinished writes are left out unless ``include_temporary`` (garbage
        collection looks for stale ones)."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        with self._op("list", prefix):
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for name in sorted(filenames):
                    if TMP_MARKER in name and not include_temporary:
                        continue
                    path = Path(dirpath) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:  # removed while we walked
                        continue
                    yield FileInfo(path.relative_to(self.root).as_posix(), st.st_size,
                                   datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def rename(self, source: str, target: str) -> None:
        """Move ``source`` to ``target`` atomically, replacing it; durable once this returns."""
        src, dst = self._path(source), self._path(target)
        with self._op("rename", target):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            _fsync_dir(dst.parent)
            if src.parent != dst.parent:
                _fsync_dir(src.parent)

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def list_incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        """None on a filesystem: an unfinished write is a temporary file (``list_files``)."""
        return iter(())

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive flock on the directory holding ``key`` (no lock file is left behind):
        compare-and-swap on the files in it."""
        import fcntl

        directory = self._path(key).parent
        with self._op("lock", key):
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> bool:
        """Write ``key`` only if its content is ``expected`` (``None``: only if absent), as
        one atomic step; whether it was written."""
        with self._locked(key):
            if self.read_bytes(key) != expected:
                return False
            self.write_bytes(key, data)
            return True

    def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if its content is ``expected``; whether it was deleted."""
        with self._locked(key):
            if self.read_bytes(key) != expected:
                return False
            self.delete(key)
            return True

    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        raise InvalidRequest("a filesystem repository has no multipart uploads")


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):  # removed meanwhile: fine
        raise exc_info[1]


def _syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding ``path`` (``os.sync`` where libc has none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _S3MultipartWriter:
    """A write-only stream that uploads in parts; nothing is visible until ``complete``."""

    def __init__(self, backend: S3Backend, key: str, part_size: int | None = None) -> None:
        self.backend, self.key = backend, key  # key: relative to the backend's root
        self.client, self.bucket, self.full_key = backend.client, backend.bucket, backend._key(key)
        self.part_size = part_size or S3_PART_SIZE
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.etag: str | None = None  # the server's, once complete
        self._md5s: list[bytes] | None = None  # per part, once ``track_md5`` was called

    def track_md5(self) -> None:
        """Take the MD5 of every part sent, for ``etag_confirms`` (call before writing)."""
        self._md5s = []

    def expected_etag(self) -> str | None:
        """The ETag S3 gives an object of exactly the bytes sent: their MD5 for a single PUT,
        the MD5 of the parts' MD5s and ``-N`` for a multipart upload."""
        if self._md5s is None:
            return None
        if self.upload_id is None:
            return self._md5s[0].hex() if self._md5s else None
        combined = hashlib.md5(b"".join(self._md5s), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self._md5s)}"

    def etag_confirms(self) -> bool | None:
        """Whether the server's ETag, the MD5 it took of what it stored, is that of the bytes
        sent: True means it received them intact. False means either a damaged upload or a
        server whose ETags are not MD5s (SSE-C, SSE-KMS, some encrypting MinIO set-ups):
        reading the object back tells which. None: ``track_md5`` was not called."""
        expected = self.expected_etag()
        if expected is None or self.etag is None:
            return None
        return self.etag.strip('"').lower() == expected

    def _single_put_md5(self) -> None:
        if self._md5s is not None:
            self._md5s = [hashlib.md5(self.buffer, usedforsecurity=False).digest()]

    def write(self, data: bytes) -> int:
        self.buffer.extend(data)
        while len(self.buffer) >= self.part_size:
            self._upload_part(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]
        return len(data)

    def flush(self) -> None:  # parts are uploaded as they fill; nothing to do before complete
        pass

    def _upload_part(self, chunk: bytes) -> None:
        number = len(self.parts) + 1
        if self._md5s is not None:
            self._md5s.append(hashlib.md5(chunk, usedforsecurity=False).digest())
        with self.backend._op(f"upload part {number} of", self.key):
            if self.upload_id is None:
                self.upload_id = self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=self.full_key,
                    **self.backend._put_arguments(self.key))["UploadId"]
            resp = self.client.upload_part(Bucket=self.bucket, Key=self.full_key,
                                           PartNumber=number, UploadId=self.upload_id,
                                           Body=chunk)
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def complete(self) -> None:
        if self.upload_id is None:
            self._single_put_md5()
            with self.backend._op("write", self.key):
                self.etag = self.client.put_object(
                    Bucket=self.bucket, Key=self.full_key, Body=bytes(self.buffer),
                    **self.backend._put_arguments(self.key)).get("ETag")
            return
        if self.buffer:
            self._upload_part(bytes(self.buffer))
        with self.backend._op("complete the multipart upload of", self.key):
            done = self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.full_key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts})
        self.etag = done.get("ETag")
        self.backend._completed(self.key, done)

    def abort(self) -> None:
        if self.upload_id is not None:
            with self.backend._op(f"abort multipart upload {self.upload_id} of", self.key):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key,
                                                   UploadId=self.upload_id)


class S3Backend:
    """A prefix of an S3 bucket (MinIO's ``backups`` bucket in production)."""

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        return self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")

    @property
    def endpoint(self) -> str:
        return str(getattr(self.client.meta, "endpoint_url", "") or "AWS")

    def _translate(self, operation: str, key: str) -> Callable[[BaseException], Any]:
        def translate(exc: BaseException) -> RepositoryError | None:
            where = self.location(key) if key else self.location("")
            return s3_error(exc, operation, where, key, self.endpoint)
        return translate

    @contextlib.contextmanager
    def _op(self, operation: str, key: str) -> Iterator[None]:
        """Raise the S3 service's failures inside the block as ``RepositoryError``."""
        try:
            yield
        except (FileNotFoundError, RepositoryError):
            raise
        except Exception as exc:
            translated = self._translate(operation, key)(exc)
            if translated is None:
                raise
            raise translated from exc

    def _put_arguments(self, key: str) -> dict[str, Any]:
        """Extra arguments of every request that creates ``key`` (PutObject,
        CreateMultipartUpload): none here; the Object-Lock backend adds the lock."""
        return {}

    def _completed(self, key: str, response: dict[str, Any]) -> None:
        """Called with CompleteMultipartUpload's response: nothing to do here."""

    @contextlib.contextmanager
    def open_write(self, key: str, *, sync: bool = True) -> Iterator[BinaryIO]:
        # an S3 object is durable once its PUT (or complete) returns: ``sync`` changes nothing
        writer = _S3MultipartWriter(self, key)
        try:
            yield writer  # type: ignore[misc]
            writer.complete()
        except BaseException as exc:
            cleanup_after(exc, f"aborting the multipart upload of {self.location(key)}",
                          writer.abort)
            raise

    def open_read(self, key: str) -> BinaryIO:
        with self._op("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in S3_NOT_FOUND:
                    raise FileNotFoundError(self.location(key)) from exc
                raise
        return _TranslatingStream(body, self._translate("read", key))  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes | None:
        try:
            with self.open_read(key) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes, *, sync: bool = True) -> None:
        with self._op("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   **self._put_arguments(key))

    def sync_pending(self) -> None:
        """Nothing to do: every S3 write is durable when it returns."""

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> bool:
        """Write ``key`` only if its content is ``expected`` (``None``: only if absent), with
        S3's conditional writes (If-None-Match / If-Match on the ETag, the MD5 of a single-part
        object); whether it was written."""
        condition = ({"IfNoneMatch": "*"} if expected is None
                     else {"IfMatch": f'"{hashlib.md5(expected).hexdigest()}"'})
        with self._op("write", key):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       **condition)
            except self.client.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409",
                            *S3_NOT_FOUND):
                    return False
                raise
        return True

    def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` if its content is ``expected`` (checked, then deleted: a writer in
        between is possible only once the record expired)."""
        if self.read_bytes(key) != expected:
            return False
        self.delete(key)
        return True

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        """``key``'s size in bytes (one HEAD), ``None`` if there is no such object."""
        with self._op("stat", key):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))[
                    "ContentLength"])
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in S3_NOT_FOUND:
                    return None
                raise

    def list_children(self, prefix: str) -> list[str]:
        full = self._full_prefix(prefix)
        names: set[str] = set()
        with self._op("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                names.update(p["Prefix"][len(full):].rstrip("/")
                             for p in page.get("CommonPrefixes", []))
                names.update(o["Key"][len(full):] for o in page.get("Contents", []))
        return sorted(n for n in names if n and TMP_MARKER not in n)

    def delete(self, key: str) -> None:
        with self._op("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        full = self._key(prefix) + "/"
        with self._op("delete", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else \
            f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]:
        """Every object under ``prefix`` (in key order) with its size and LastModified."""
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._op("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    key = obj["Key"][strip:]
                    if TMP_MARKER in key.rsplit("/", 1)[-1] and not include_temporary:
                        continue
                    yield FileInfo(key, int(obj["Size"]),
                                   obj["LastModified"].astimezone(timezone.utc))

    def rename(self, source: str, target: str) -> None:
        """Server-side copy (multipart for large objects), then delete the source."""
        from boto3.s3.transfer import TransferConfig

        with self._op("rename", target):
            self.client.copy({"Bucket": self.bucket, "Key": self._key(source)}, self.bucket,
                             self._key(target),
                             Config=TransferConfig(multipart_threshold=S3_PART_SIZE,
                                                   multipart_chunksize=S3_PART_SIZE,
                                                   use_threads=False))
            self.client.delete_object(Bucket=self.bucket, Key=self._key(source))

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete in batches of 1000 (one request each); raise if the server refuses any."""
        batch: list[dict[str, str]] = []

        def flush() -> None:
            if not batch:
                return
            with self._op("delete", batch[0]["Key"][len(self.prefix) + 1 if self.prefix
                                                    else 0:]):
                resp = self.client.delete_objects(Bucket=self.bucket,
                                                  Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise RepositoryError(
                    f"backup repository refused: {self.location('')}: {len(errors)} deletions "
                    f"refused, e.g. {first.get('Key')}: {first.get('Code')} "
                    f"{first.get('Message')}", operation="delete", location=self.location(''),
                    backend_error=f"{first.get('Code')} {first.get('Message')}")
            batch.clear()

        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == 1000:
                flush()
        flush()

    def list_incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        """Multipart uploads under ``prefix`` that were started and never completed nor
        aborted (ListMultipartUploads)."""
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._op("list the multipart uploads under", prefix):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for up in page.get("Uploads", []) or []:
                    yield IncompleteUpload(up["Key"][strip:], up["UploadId"],
                                           up["Initiated"].astimezone(timezone.utc))

    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        with self._op(f"abort multipart upload {upload.upload_id} of", upload.key):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(upload.key),
                                                   UploadId=upload.upload_id)
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # gone: fine
                    raise


def backend_from_url(url: str, *, s3_endpoint: str | None = None, s3_access_key: str | None = None,
                     s3_secret_key: str | None = None, s3_region: str = "us-east-1") -> Backend:
    """``/path`` or ``file:///path``: filesystem; ``s3://bucket/prefix``: S3 (checked
    reachable)."""
    if url.startswith("s3://"):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = boto3.client(
            "s3", endpoint_url=s3_endpoint or None, aws_access_key_id=s3_access_key or None,
            aws_secret_access_key=s3_secret_key or None, region_name=s3_region,
            config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                          connect_timeout=10, read_timeout=120),
        )
        try:
            client.head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnreachable(
                f"backup repository s3://{bucket} at {s3_endpoint or 'AWS'} is not usable: {exc}"
            ) from exc
        return S3Backend(client, bucket, prefix)
    path = url[len("file://"):] if url.startswith("file://") else url
    return FilesystemBackend(path)
