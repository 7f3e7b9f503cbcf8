"""Storage backends of the backup repository: a local directory and an S3 bucket.

Both expose the same small interface over relative, '/'-separated keys. Writes are atomic per
key: a reader sees the old content or the new, never a part. On the filesystem that is a write
to a temporary name, fsync, rename; on S3 it is a single PUT or a completed multipart upload.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from rag_backup.errors import InvalidRequest, StoreUnreachable

TMP_MARKER = ".tmp-"
S3_PART_SIZE = 16 * 1024 * 1024


def safe_key(key: str) -> str:
    """Reject keys that could escape the repository root; return the normalised key."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"unsafe repository key {key!r}")
    parts = PurePosixPath(key).parts
    if any(p in ("", ".", "..") for p in parts) or str(PurePosixPath(*parts)) != key.rstrip("/"):
        raise InvalidRequest(f"unsafe repository key {key!r}")
    return key.rstrip("/")


@dataclass(frozen=True)
class FileInfo:
    """One stored file: its key (relative to the backend's root), size and modification time."""

    key: str
    size: int
    mtime: datetime


class Backend(Protocol):
    def open_write(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes | None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_children(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def location(self, key: str) -> str: ...
    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]: ...
    def rename(self, source: str, target: str) -> None: ...
    def delete_many(self, keys: Iterable[str]) -> None: ...


class FilesystemBackend:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "xb") as fh:
                yield fh  # type: ignore[misc]
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as fh:
            fh.write(data)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list_children(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if TMP_MARKER not in p.name)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def location(self, key: str) -> str:
        return str(self._path(key))

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
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        _fsync_dir(dst.parent)
        if src.parent != dst.parent:
            _fsync_dir(src.parent)

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _S3MultipartWriter:
    """A write-only stream that uploads in parts; nothing is visible until ``complete``."""

    def __init__(self, client, bucket: str, key: str, part_size: int = S3_PART_SIZE) -> None:
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, data: bytes) -> int:
        self.buffer.extend(data)
        while len(self.buffer) >= self.part_size:
            self._upload_part(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]
        return len(data)

    def _upload_part(self, chunk: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        resp = self.client.upload_part(Bucket=self.bucket, Key=self.key, PartNumber=number,
                                       UploadId=self.upload_id, Body=chunk)
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def complete(self) -> None:
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
            return
        if self.buffer:
            self._upload_part(bytes(self.buffer))
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                               UploadId=self.upload_id)


class S3Backend:
    """A prefix of an S3 bucket (MinIO's ``backups`` bucket in production)."""

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        writer = _S3MultipartWriter(self.client, self.bucket, self._key(key))
        try:
            yield writer  # type: ignore[misc]
            writer.complete()
        except BaseException:
            writer.abort()
            raise

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(self.location(key)) from exc

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.open_read(key).read()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list_children(self, prefix: str) -> list[str]:
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            names.update(p["Prefix"][len(full):].rstrip("/")
                         for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(full):] for o in page.get("Contents", []))
        return sorted(n for n in names if n)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        full = self._key(prefix) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]:
        """Every object under ``prefix`` (in key order) with its size and LastModified."""
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
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
            resp = self.client.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": batch, "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(f"{self.location('')}: {len(errors)} deletions refused, e.g. "
                              f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")
            batch.clear()

        for key in keys:
            batch.append({"Key": self._key(key)})
            if len(batch) == 1000:
                flush()
        flush()


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
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
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
