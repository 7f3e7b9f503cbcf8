"""Immutability of the offsite copy: an S3 bucket with Object Lock (WORM).

When the offsite bucket has Object Lock enabled (``GetObjectLockConfiguration`` says
``Enabled``), every object written there carries ``ObjectLockMode`` (``COMPLIANCE`` by default,
or ``GOVERNANCE``: ``RAG_OFFSITE_LOCK_MODE``) and ``ObjectLockRetainUntilDate`` covering the
backup's offsite retention window plus a margin. Until that date no one, not even the root
account (COMPLIANCE), can delete that object version or shorten its lock; an overwrite or a
delete without a version id only adds a newer version or a delete marker, and the locked bytes
stay readable by their version id. That is what protects the copy from ransomware or an
operator error at the primary site holding the offsite credentials.

A multipart upload asks for the lock when it is created, and the lock is also set on the
completed version with ``PutObjectRetention`` (some servers, moto among them, ignore the lock
headers of ``CreateMultipartUpload``; on the others it is the same date, a no-op).

Deleting a backup from a locked bucket (offsite retention) deletes each object *version*, only
once its retention date has passed; a version still locked is reported, never forced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from rag_backup.errors import InvalidRequest
from rag_backup.repository.backends import S3Backend

LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")
DEFAULT_LOCK_MODE = "COMPLIANCE"
LOCK_MARGIN = timedelta(days=1)  # beyond the retention window: a late retention run is fine


def bucket_lock_enabled(client, bucket: str) -> bool:
    """Whether ``bucket`` has S3 Object Lock enabled."""
    try:
        found = client.get_object_lock_configuration(Bucket=bucket)
    except client.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration",
                    "NotImplemented", "MethodNotAllowed"):
            return False
        raise
    return found.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


@dataclass(frozen=True)
class LockedVersion:
    """One stored version of a key and its lock."""

    key: str  # relative to the backend's root
    version_id: str
    retain_until: datetime | None
    mode: str | None


class LockedS3Backend(S3Backend):
    """An S3 backend on an Object-Lock bucket: every write is locked until
    ``retain_until(key)`` in ``mode``."""

    def __init__(self, client, bucket: str, prefix: str = "", *, mode: str = DEFAULT_LOCK_MODE,
                 retain_until: Callable[[str], datetime]) -> None:
        if mode not in LOCK_MODES:
            raise InvalidRequest(f"RAG_OFFSITE_LOCK_MODE is {mode!r}; use one of {LOCK_MODES}")
        super().__init__(client, bucket, prefix)
        self.mode, self.retain_until = mode, retain_until

    def lock_arguments(self, key: str) -> dict:
        until = max(self.retain_until(key), datetime.now(timezone.utc) + LOCK_MARGIN)
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": until}

    def lock_version(self, key: str, version_id: str | None) -> None:
        args = self.lock_arguments(key)
        with self._op("lock", key):
            self.client.put_object_retention(
                Bucket=self.bucket, Key=self._key(key),
                **({"VersionId": version_id} if version_id else {}),
                Retention={"Mode": args["ObjectLockMode"],
                           "RetainUntilDate": args["ObjectLockRetainUntilDate"]})

    def _put_arguments(self, key: str) -> dict:
        """Every object created is locked: PutObject and CreateMultipartUpload carry it."""
        return self.lock_arguments(key)

    def _completed(self, key: str, response: dict) -> None:
        """A completed multipart upload's version gets the lock by PutObjectRetention too."""
        self.lock_version(key, response.get("VersionId"))

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> bool:
        raise InvalidRequest("the offsite repository (Object Lock) holds no leases")

    def rename(self, source: str, target: str) -> None:
        with self.open_read(source) as reader, self.open_write(target) as writer:
            for chunk in iter(lambda: reader.read(1024 * 1024), b""):
                writer.write(chunk)
        self.delete(source)

    # -- versions (retention of a locked bucket) -----------------------------------------
    def versions(self, prefix: str) -> Iterator[LockedVersion]:
        """Every version (not delete markers) under ``prefix`` with its lock."""
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._op("list the versions under", prefix):
            paginator = self.client.get_paginator("list_object_versions")
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=full))
        for page in pages:
            for v in page.get("Versions", []) or []:
                key = v["Key"][strip:]
                with self._op("read the lock of", key):
                    head = self.client.head_object(Bucket=self.bucket, Key=v["Key"],
                                                   VersionId=v["VersionId"])
                until = head.get("ObjectLockRetainUntilDate")
                yield LockedVersion(key, v["VersionId"],
                                    until.astimezone(timezone.utc) if until else None,
                                    head.get("ObjectLockMode"))

    def delete_versions(self, prefix: str) -> tuple[int, list[LockedVersion], list[str]]:
        """Delete every version under ``prefix`` and its delete markers, all or nothing: when a
        version is still locked (by the real clock: locks are about real time) nothing is
        deleted. Returns (versions deleted, versions still locked, deletions the server
        refused: e.g. a lock this client could not see)."""
        now = datetime.now(timezone.utc)
        found = list(self.versions(prefix))
        locked = [v for v in found if v.retain_until is not None and v.retain_until > now]
        if locked:  # never a backup with some of its files gone
            return 0, locked, []
        full = self._full_prefix(prefix)
        with self._op("list the delete markers under", prefix):
            markers = [{"Key": m["Key"], "VersionId": m["VersionId"]}
                       for page in self.client.get_paginator("list_object_versions").paginate(
                           Bucket=self.bucket, Prefix=full)
                       for m in page.get("DeleteMarkers", []) or []]
        batch = [{"Key": self._key(v.key), "VersionId": v.version_id} for v in found] + markers
        deleted, refused = 0, []
        for start in range(0, len(batch), 1000):
            chunk = batch[start:start + 1000]
            with self._op("delete versions under", prefix):
                resp = self.client.delete_objects(Bucket=self.bucket,
                                                  Delete={"Objects": chunk, "Quiet": True})
            errors = resp.get("Errors") or []
            refused += [f"{e.get('Key')}: {e.get('Code')} {e.get('Message')}" for e in errors]
            deleted += len(chunk) - len(errors)
        return deleted, [], refused
