"""Reading objects from an S3 server, shared by backups, restores and comparisons: the key-ordered
listing, HEAD, GetObjectTagging and GETs (pinned to a version with ``If-Match``, resumed with a
Range request when the connection breaks), through MinIO's SDK where it can name the key and
boto3 otherwise."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

import minio
from botocore.exceptions import BotoCoreError, ClientError
from minio.error import S3Error

from rag_backup.engines.minio.client import (
    CHANGED,
    MISSING_KEY,
    SDK_ERRORS,
    STREAM_ERRORS,
    S3Endpoint,
    _code,
    s3_errors,
    translate,
)
from rag_backup.engines.minio.common import CHUNK
from rag_backup.engines.minio.snapshot import ObjectEntry
from rag_backup.errors import IntegrityError, StoreUnreachable

MAX_RESUMES = 5                    # a broken download resumes with a Range request this often
MAX_CHANGES = 3                    # an object overwritten again and again during its download
HEADER_PARAMS = {  # boto3 parameter (PUT) / response field (GET, HEAD) -> HTTP header
    "CacheControl": "Cache-Control",
    "ContentDisposition": "Content-Disposition",
    "ContentEncoding": "Content-Encoding",
    "ContentLanguage": "Content-Language",
}
TAG_COUNT_HEADER = "x-amz-tagging-count"


class _ObjectChanged(Exception):
    """The object was overwritten between the listing (or the first GET) and a later GET."""


@dataclass(frozen=True)
class _Listed:
    key: str
    size: int
    etag: str
    last_modified: str


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat()


def _headers(resp: dict[str, Any]) -> dict[str, str]:
    """The PUT headers of a boto3 response (HEAD or GET)."""
    return {header: str(resp[param]) for param, header in HEADER_PARAMS.items()
            if resp.get(param)}


def _quoted(etag: str) -> str:
    """ETags as S3 lists them, in quotes (MinIO's SDK strips them)."""
    return etag if etag.startswith('"') else f'"{etag}"'


@dataclass(frozen=True)
class _Head:
    """What a GET or HEAD says about an object, read from its HTTP headers."""

    size: int
    etag: str
    last_modified: str
    content_type: str
    metadata: dict[str, str]
    headers: dict[str, str]
    tag_count: int | None = None  # a GET's x-amz-tagging-count; None: no such header

    @classmethod
    def from_boto(cls, resp: dict[str, Any]) -> _Head:
        count = resp.get("TagCount")
        return cls(int(resp["ContentLength"]), resp["ETag"], _iso(resp["LastModified"]),
                   str(resp.get("ContentType") or ""), dict(resp.get("Metadata") or {}),
                   _headers(resp), None if count is None else int(count))

    @classmethod
    def from_http(cls, h: Any) -> _Head:
        metadata = {k[len("x-amz-meta-"):].lower(): v for k, v in h.items()
                    if k.lower().startswith("x-amz-meta-")}
        count = h.get(TAG_COUNT_HEADER)
        return cls(int(h.get("content-length", 0)), _quoted(h.get("etag", "")),
                   _iso(parsedate_to_datetime(h["last-modified"])) if h.get("last-modified")
                   else "", h.get("content-type", ""), metadata,
                   {name: h[name] for name in HEADER_PARAMS.values() if h.get(name)},
                   int(count) if count is not None and str(count).isdigit() else None)


@dataclass
class _Download:
    """An open GET: what its headers say, its bytes as stored, and how to let go of it."""

    head: _Head
    chunks: Iterator[bytes]
    close: Callable[[], None]


def _sdk_can_name(key: str) -> bool:
    """MinIO's SDK refuses keys with '.' or '..' path segments (S3 allows them)."""
    segments = key.split("/")
    return bool(key) and "." not in segments and ".." not in segments


def _tag_header(tags: dict[str, str]) -> str:
    """Tags as the ``x-amz-tagging`` header of a PUT wants them (URL-encoded, UTF-8)."""
    return urlencode(tags, quote_via=quote, safe="")


@dataclass(frozen=True)
class _Observed:
    """What the server has for one object: its bytes' length and sha256 (read and hashed),
    what the GET's headers say, and its tags."""

    size: int
    sha256: str
    head: _Head
    tags: dict[str, str]


class _TagCountTrust:
    """Whether a GET's ``x-amz-tagging-count`` can stand in for a GetObjectTagging, learnt
    once per backup (or comparison). S3 sends the header only for an object that has tags, and
    only to credentials that may read them; so a missing header proves "no tags" only once this
    backup has seen, on one object, GetObjectTagging succeed with tags AND the GET of that
    object carry the header with the same count. A tagged object whose GET had no header
    turns the trust off for the rest of the backup. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "unknown"  # "unknown" | "trusted" | "distrusted"
        self.skipped = 0        # GetObjectTaggings saved

    def untagged(self, count: int | None) -> bool:
        """True when the GET's header proves the object has no tags (one request saved)."""
        with self._lock:
            if self.state == "trusted" and not count:
                self.skipped += 1
                return True
            return False

    def learn(self, count: int | None, tags: dict[str, str]) -> None:
        """What GetObjectTagging found for an object whose GET said ``count``."""
        if not tags:
            return
        with self._lock:
            if count is None:
                self.state = "distrusted"
            elif count == len(tags) and self.state == "unknown":
                self.state = "trusted"


@dataclass
class _Objects:
    """Per-object reads against one S3 server, shared by worker threads: MinIO's SDK where it
    can name the key (less CPU per request), boto3 otherwise."""

    client: Any
    reader: minio.Minio
    endpoint: S3Endpoint
    tag_counts: _TagCountTrust = field(default_factory=_TagCountTrust, kw_only=True)

    def _failed(self, exc: Exception, what: str, bucket: str, key: str) -> None:
        """Return for a missing object, raise ``_ObjectChanged`` for a failed If-Match, and
        our own error for anything else (both clients' exceptions)."""
        code = _code(exc) if isinstance(exc, ClientError) else (
            exc.code if isinstance(exc, S3Error) else None)
        if code in MISSING_KEY:
            return
        if code in CHANGED:
            raise _ObjectChanged(key) from exc
        raise translate(exc, self.endpoint, f"{what} {key!r}", bucket) from exc

    def head(self, bucket: str, key: str) -> _Head | None:
        try:
            if _sdk_can_name(key):
                return _Head.from_http(self.reader.stat_object(bucket, key).metadata)
            return _Head.from_boto(self.client.head_object(Bucket=bucket, Key=key))
        except (ClientError, BotoCoreError, *SDK_ERRORS) as exc:
            self._failed(exc, "HEAD", bucket, key)
            return None

    def tags(self, bucket: str, key: str) -> dict[str, str] | None:
        """The object's tags (``{}`` for none); None if the object is gone."""
        try:
            if _sdk_can_name(key):
                try:
                    return dict(self.reader.get_object_tags(bucket, key) or {})
                except ValueError:  # the SDK refuses tags it thinks invalid (e.g. with '&')
                    pass
            resp = self.client.get_object_tagging(Bucket=bucket, Key=key)
            return {str(t["Key"]): str(t.get("Value") or "") for t in resp.get("TagSet", [])}
        except (ClientError, BotoCoreError, *SDK_ERRORS) as exc:
            self._failed(exc, "GetObjectTagging", bucket, key)
            return None

    def downloaded_tags(self, bucket: str, key: str, count: int | None
                        ) -> dict[str, str] | None:
        """The tags of an object just downloaded, whose GET said ``count`` (see
        ``_TagCountTrust``): ``{}`` without a request when that is proven, else
        GetObjectTagging. None if the object is gone."""
        if self.tag_counts.untagged(count):
            return {}
        tags = self.tags(bucket, key)
        if tags is not None:
            self.tag_counts.learn(count, tags)
        return tags

    def _get(self, bucket: str, key: str, etag: str | None, offset: int = 0
             ) -> _Download | None:
        """A GET of exactly the version ``etag`` (If-Match; any version for None), from
        ``offset``; None if the object is gone. Bytes come as stored, never decoded, whatever
        the Content-Encoding."""
        try:
            if _sdk_can_name(key):
                resp = self.reader.get_object(
                    bucket, key, offset=offset,
                    request_headers={"If-Match": etag} if etag else None)

                def release() -> None:
                    resp.close()
                    resp.release_conn()

                return _Download(_Head.from_http(resp.headers),
                                 resp.stream(CHUNK, decode_content=False), release)
            args: dict[str, Any] = {"Bucket": bucket, "Key": key}
            if etag:
                args["IfMatch"] = etag
            if offset:
                args["Range"] = f"bytes={offset}-"
            got = self.client.get_object(**args)
            body = got["Body"]
            return _Download(_Head.from_boto(got), iter(lambda: body.read(CHUNK), b""),
                             body.close)
        except (ClientError, BotoCoreError, *SDK_ERRORS) as exc:
            self._failed(exc, "GET", bucket, key)
            return None

    def _chunks(self, bucket: str, key: str, etag: str, download: _Download
                ) -> Iterator[bytes]:
        """The object's bytes; a connection broken mid-body resumes with a Range request for
        the same version (If-Match), at most MAX_RESUMES times."""
        offset = resumes = 0
        while True:
            try:
                for chunk in download.chunks:
                    offset += len(chunk)
                    yield chunk
                return
            except STREAM_ERRORS as exc:
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise StoreUnreachable(
                        f"GET {key!r}: {self.endpoint.describe(bucket)} broke the transfer "
                        f"{resumes} times (last: {exc}); retried") from exc
            finally:
                download.close()
            resumed = self._get(bucket, key, etag, offset)
            if resumed is None:
                raise _ObjectChanged(key)
            download = resumed

    def observe(self, bucket: str, key: str) -> _Observed | None:
        """Read one object as the server has it: GET (streamed and hashed, never held in
        memory) and its tags; None if it is gone."""
        for _ in range(MAX_CHANGES):
            try:
                download = self._get(bucket, key, None)
                if download is None:
                    return None
                digest, length = hashlib.sha256(), 0
                for chunk in self._chunks(bucket, key, download.head.etag, download):
                    digest.update(chunk)
                    length += len(chunk)
            except _ObjectChanged:
                continue
            tags = self.downloaded_tags(bucket, key, download.head.tag_count)
            if tags is None:
                return None
            return _Observed(length, digest.hexdigest(), download.head, tags)
        raise StoreUnreachable(f"{self.endpoint.describe(bucket)}: object {key!r} was "
                               f"overwritten {MAX_CHANGES} times while it was being compared; "
                               "retried")


def _list_bucket(reader: minio.Minio, endpoint: S3Endpoint, bucket: str,
                 prefix: str = "") -> Iterator[_Listed]:
    """Every object of ``bucket`` (under ``prefix``) in key order, 1000 per request."""
    previous: str | None = None
    with s3_errors(endpoint, "listing", bucket):
        for obj in reader.list_objects(bucket, prefix=prefix or None, recursive=True):
            key = obj.object_name  # a recursive listing has no prefixes: "dir/" is an object
            if key is None:
                continue
            if previous is not None and key <= previous:
                raise IntegrityError(f"{endpoint.describe(bucket)} listed {key!r} after "
                                     f"{previous!r}: the listing is not in key order")
            previous = key
            yield _Listed(key, int(obj.size or 0), _quoted(obj.etag or ""),
                          _iso(obj.last_modified) if obj.last_modified else "")


def _merge(entries: Iterator[ObjectEntry], listed: Iterator[_Listed]
           ) -> Iterator[tuple[ObjectEntry | None, _Listed | None]]:
    """Outer join of two key-ordered streams: (entry, object on target) by key."""
    entry, obj = next(entries, None), next(listed, None)
    while entry is not None or obj is not None:
        if obj is None or (entry is not None and entry.key < obj.key):
            yield entry, None
            entry = next(entries, None)
        elif entry is None or obj.key < entry.key:
            yield None, obj
            obj = next(listed, None)
        else:
            yield entry, obj
            entry, obj = next(entries, None), next(listed, None)
