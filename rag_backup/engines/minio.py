"""MinIO (any S3 server): incremental, content-addressed snapshots of buckets, their
verification, garbage collection of unreferenced content, and point-in-time restores.

Layout in the backup repository::

    minio/<partition>/manifest.json                          the commit record (repository.py)
    minio/<partition>/<backup_id>/buckets/<bucket>.jsonl.zst  the snapshot of one bucket
    objectstore/blobs/<aa>/<sha256>                          object contents, named by their hash
    objectstore/tmp/<backup_id>-<hex>                        a large blob while it is written

A snapshot is a zstd-compressed JSON-lines file: a header line, then one line per object in key
order (S3's listing order, which is UTF-8 byte order): key, size, etag, last_modified, sha256,
content type, user metadata, the other headers a PUT sets (Cache-Control,
Content-Disposition, Content-Encoding, Content-Language) and, from format version 2, the
object's tags. Version-1 snapshots (no tags) are still read and restored; their objects' tags
are "not recorded" and a restore reports the tag comparison as not run. Keys exist only inside
that file; blobs are named by their hash, so no key (``..``, a leading ``/``, spaces, any
unicode) ever becomes part of a path in the repository.

Incremental backups: the bucket listing is walked alongside the previous snapshot (both are in
key order, so memory stays bounded whatever the bucket's size). An object whose key, size and
etag are unchanged, and whose blob is present with the right size, is not downloaded again: its
sha256 is taken from the previous snapshot (and its headers too, when its Last-Modified is
unchanged; otherwise one HEAD refreshes them, since a metadata-only copy keeps the etag). Tags
are read for every object on every backup: changing an object's tags changes neither its etag
nor its Last-Modified, so an unchanged object costs one GetObjectTagging (by the worker pool).
A downloaded object's GET says whether it has tags (``x-amz-tagging-count``, sent only for a
tagged object and only to credentials that may read tags): a missing header is taken as "no
tags" only once this backup has seen, on one tagged object, GetObjectTagging succeed with the
count its GET reported (``_TagCountTrust``); until then, and for good on a server that omits
the header, GetObjectTagging is asked. New or changed objects are downloaded by a pool of threads, hashed while they stream, and stored as
blobs (idempotent: the same content always gets the same name). GETs carry ``If-Match`` with the
listed etag, so the bytes always belong to the version recorded; an object overwritten after
the listing is re-read as its new version, one deleted after the listing is left out (each
object in a snapshot is one consistent version from the backup's run).

The previous snapshot ("reuse source") is the newest committed one at or before the partition
whose age is at most ``window - gc_grace``: retention cannot delete it while this backup runs
(see ``collect_garbage`` for why that matters).

Two clients: the hot path of a backup (listing, one GET or HEAD per new or changed object, one
GetObjectTagging per object unless the GET settled it) uses MinIO's SDK, which spends less than half of botocore's CPU
per request; a backup of many small objects is bound by exactly that. Keys the SDK refuses
(``.`` or ``..`` path segments, which S3 allows) and everything else (probing, bucket creation,
restores with their checked multipart uploads) go through boto3. Both clients' errors become
this project's (``translate``).

Every restore starts with a pre-flight that changes nothing (``_preflight``): the snapshot is
read to its end against the manifest, objects already identical on the target are found by
reading only (HEAD, a GET when etags differ; their blobs are not needed), and every blob the
restore will write is checked by size and sha256 (each distinct blob once, streamed, in the
worker pool). A missing or damaged blob refuses the restore with ``IntegrityError`` naming the
blobs and the keys that need them, before any bucket is created or any object written, tagged
or removed. The copy hashes each blob again as it reads it; one damaged after the pre-flight
stops the restore with ``RestoreAborted``, which says how far it got.

After every restore, the target is compared with the snapshot object by object
(``compare_bucket``): presence, size, sha256 of the bytes the server returns (re-read in
parallel and hashed as they stream: moto, the test server, stores a client-sent
``x-amz-checksum-sha256`` without checking it and returns none unless asked for the algorithm,
so a server-side checksum would prove nothing there), content type, user metadata, the PUT
headers and tags. Single-part restores send the sha256 along (``ChecksumSHA256``) so that
servers which check it (MinIO, AWS) refuse a body damaged on the way. A difference fails the
restore (``RestoreDiffers``, which carries the report) unless ``accept_differences``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode, urlsplit

import boto3
import botocore
import minio
import urllib3
import zstandard
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from rag_backup import repository
from rag_backup.engines.comparison import Comparison
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    IntegrityError,
    InvalidRequest,
    RagBackupError,
    StoreUnreachable,
)
from rag_backup.repository import BackupRecord, BackupRepository, PendingBackup
from rag_backup.repository.backends import TMP_MARKER, S3Backend
from rag_backup.repository.manifest import Artifact, utcnow
from rag_backup.repository.repository import BLOB_PREFIX, blob_key
from rag_backup.repository.retention import partition_start

STORE = "minio"
TMP_PREFIX = "objectstore/tmp"
SNAPSHOT_DIR = "buckets"
SNAPSHOT_SUFFIX = ".jsonl.zst"
SNAPSHOT_FORMAT = "rag-backup/minio-snapshot"
SNAPSHOT_VERSION = 2                # 2: object tags recorded; 1: no tags (still read)
READABLE_VERSIONS = (1, 2)
CHUNK = 1024 * 1024
SMALL_OBJECT = 8 * 1024 * 1024     # copied through memory; larger objects stream to a temp blob
PART_SIZE = 8 * 1024 * 1024        # restore: multipart part size (grown to stay under MAX_PARTS)
MAX_PARTS = 10_000
MAX_QUEUED = 10_000                # snapshot lines waiting behind a slower download
MAX_RESUMES = 5                    # a broken download resumes with a Range request this often
MAX_CHANGES = 3                    # an object overwritten again and again during its download
DEFAULT_WORKERS = 8
DEFAULT_GC_GRACE = timedelta(hours=48)
DEFAULT_FULL_VERIFY_BYTES = 50 * 1024**3
DEFAULT_ROTATION_DAYS = 7
EXAMPLES = 5
PREFLIGHT_EXAMPLES = 10            # missing or damaged blobs a refused restore names (then a count)
PREFLIGHT_KEYS = 3                 # keys named per such blob
HEADER_PARAMS = {  # boto3 parameter (PUT) / response field (GET, HEAD) -> HTTP header
    "CacheControl": "Cache-Control",
    "ContentDisposition": "Content-Disposition",
    "ContentEncoding": "Content-Encoding",
    "ContentLanguage": "Content-Language",
}
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
    "ExpiredToken", "InvalidSecurity", "AllAccessDisabled", "AuthorizationHeaderMalformed",
    "403", "Forbidden",
})
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "OperationAborted",
    "XMinioServerNotInitialized", "XMinioStorageFull", "500", "502", "503", "504",
})
MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
CHANGED = frozenset({"PreconditionFailed", "412"})
STREAM_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, OSError,
                                                   urllib3.exceptions.HTTPError)
SDK_ERRORS: tuple[type[BaseException], ...] = (MinioException, urllib3.exceptions.HTTPError)
TAG_COUNT_HEADER = "x-amz-tagging-count"
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- the S3 endpoint and its errors ---------------------------------------------------------

@dataclass(frozen=True)
class S3Endpoint:
    """How to reach MinIO (or any S3 server). The keys are never printed (``repr=False``)."""

    url: str
    access_key: str = field(repr=False, default="")
    secret_key: str = field(repr=False, default="")
    region: str = "us-east-1"
    connect_timeout_s: float = 10
    read_timeout_s: float = 120
    max_attempts: int = 3
    max_connections: int = 32

    def describe(self, bucket: str | None = None) -> str:
        where = f"MinIO {self.url or 'AWS S3'}"
        return f"{where} bucket {bucket!r}" if bucket else where

    def reader(self) -> minio.Minio:
        """MinIO's SDK, for the hot path of a backup (one GET or HEAD per new or changed
        object): it spends less than half of botocore's CPU per request (measured: 0.6 ms
        against 1.3 ms), and a backup of many small objects is bound by exactly that.
        Thread-safe; share it between the worker threads."""
        parts = urlsplit(self.url or "https://s3.amazonaws.com")
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.connect_timeout_s, read=self.read_timeout_s),
            maxsize=self.max_connections, cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or os.environ.get("AWS_CA_BUNDLE") or None,
            retries=urllib3.Retry(total=self.max_attempts, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]))
        return minio.Minio(parts.netloc, access_key=self.access_key or None,
                           secret_key=self.secret_key or None,
                           secure=parts.scheme == "https", region=self.region, http_client=http)

    def client(self) -> Any:
        """A boto3 S3 client (thread-safe; share it between the worker threads)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url or None, aws_access_key_id=self.access_key or None,
            aws_secret_access_key=self.secret_key or None, region_name=self.region,
            config=Config(
                connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"}, max_pool_connections=self.max_connections,
                signature_version="s3v4"))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def translate(exc: BaseException, endpoint: S3Endpoint, what: str,
              bucket: str | None = None) -> RagBackupError:
    """Our error for a botocore one: unreachable (retried), credentials refused (not retried),
    a missing bucket, or anything else with the server's own code and message."""
    where = endpoint.describe(bucket)
    if isinstance(exc, NoCredentialsError):
        return CredentialsRejected(f"{what}: no S3 credentials for {where}; set "
                                   "RAG_S3_ACCESS_KEY and RAG_S3_SECRET_KEY")
    answer: tuple[str, int, str] | None = None
    if isinstance(exc, ClientError):
        answer = (_code(exc), _status(exc), exc.response.get("Error", {}).get("Message", ""))
    elif isinstance(exc, S3Error):
        answer = (exc.code or "", exc.response.status if exc.response else 0, exc.message or "")
    elif isinstance(exc, ServerError):
        answer = (str(exc.status_code), exc.status_code, str(exc))
    elif isinstance(exc, InvalidResponseError):
        answer = ("InvalidResponse", 0, str(exc))
    if answer is not None:
        code, status, message = answer
        if code in CREDENTIAL_CODES or status == 403:
            return CredentialsRejected(
                f"{what}: {where} refused the credentials ({code}: {message}); check "
                "RAG_S3_ACCESS_KEY / RAG_S3_SECRET_KEY and that the key's policy allows this "
                "bucket")
        if code == "NoSuchBucket":
            return InvalidRequest(f"{what}: {where} does not exist; check the bucket name "
                                  "(RAG_MINIO_BUCKETS) or create it")
        if code in TRANSIENT_CODES or status >= 500:
            return StoreUnreachable(f"{what}: {where} is not available ({code}: {message}); "
                                    "retried")
        return RagBackupError(f"{what}: {where} answered {code or status}: {message}")
    return StoreUnreachable(f"{what}: {where} is unreachable: {exc}; check RAG_S3_ENDPOINT "
                            "and that the server is up (retried)")


@contextmanager
def s3_errors(endpoint: S3Endpoint, what: str, bucket: str | None = None) -> Iterator[None]:
    """Translate the S3 clients' exceptions raised inside the block (see ``translate``)."""
    try:
        yield
    except (ClientError, BotoCoreError, *SDK_ERRORS) as exc:
        raise translate(exc, endpoint, what, bucket) from exc


def check_bucket_name(bucket: str, role: str = "bucket") -> str:
    if not BUCKET_RE.fullmatch(bucket or "") or ".." in bucket:
        raise InvalidRequest(f"{role} {bucket!r} is not a valid S3 bucket name (3-63 of a-z, "
                             "0-9, '.', '-')")
    return bucket


def repository_bucket(repo: BackupRepository) -> str | None:
    """The bucket that holds the backup repository, when it is on S3."""
    backend = repo.backend
    return backend.bucket if isinstance(backend, S3Backend) else None


def refuse_repository_bucket(repo: BackupRepository, bucket: str, what: str) -> None:
    holder = repository_bucket(repo)
    if holder is not None and bucket == holder:
        where = f"s3://{holder}/{getattr(repo.backend, 'prefix', '')}".rstrip("/")
        raise InvalidRequest(
            f"{STORE}: {what} bucket {bucket!r} holds the backup repository "
            f"({where}); backing it up into itself, or restoring into it, "
            "is refused. Remove it from RAG_MINIO_BUCKETS / choose another target bucket (if "
            "the repository is on a different S3 server, give one of the buckets another name)")


# -- snapshot records -------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectEntry:
    """One object of a snapshot."""

    key: str
    size: int
    etag: str
    last_modified: str
    sha256: str
    content_type: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] | None = None  # None: not recorded (a version-1 snapshot)

    def to_line(self) -> bytes:
        doc: dict[str, Any] = {
            "key": self.key, "size": self.size, "etag": self.etag,
            "last_modified": self.last_modified, "sha256": self.sha256,
            "content_type": self.content_type, "metadata": self.metadata,
            "headers": self.headers}
        if self.tags is not None:
            doc["tags"] = self.tags
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes, where: str, version: int = SNAPSHOT_VERSION) -> ObjectEntry:
        """One line of a snapshot of format ``version`` (from 2 on, every line has its
        object's tags, ``{}`` for none; version 1 recorded none: ``tags`` is None)."""
        try:
            doc = json.loads(line)
            tags = None if version < 2 else {str(k): str(v) for k, v in doc["tags"].items()}
            entry = cls(str(doc["key"]), int(doc["size"]), str(doc["etag"]),
                        str(doc["last_modified"]), str(doc["sha256"]),
                        str(doc.get("content_type", "")),
                        {str(k): str(v) for k, v in doc.get("metadata", {}).items()},
                        {str(k): str(v) for k, v in doc.get("headers", {}).items()}, tags)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where}: unreadable snapshot line: {exc}") from exc
        if not SHA_RE.fullmatch(entry.sha256) or entry.size < 0:
            raise IntegrityError(f"{where}: snapshot line for key {entry.key!r} has an invalid "
                                 f"sha256 {entry.sha256!r} or size {entry.size}")
        return entry


def blob_sha(key: str) -> str | None:
    """The sha256 of a blob key, or None for anything else found under the blob prefix."""
    parts = key.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == BLOB_PREFIX and SHA_RE.fullmatch(parts[3]) \
            and parts[2] == parts[3][:2]:
        return parts[3]
    return None


def snapshot_name(bucket: str) -> str:
    return f"{SNAPSHOT_DIR}/{check_bucket_name(bucket)}{SNAPSHOT_SUFFIX}"


def snapshot_buckets(record: BackupRecord) -> list[str]:
    return sorted(record.manifest.fingerprint.get("buckets", {}))


def _snapshot_artifact(record: BackupRecord, bucket: str) -> Artifact:
    name = snapshot_name(bucket)
    for artifact in record.manifest.artifacts:
        if artifact.path == name:
            return artifact
    raise IntegrityError(f"{STORE} backup {record.partition_key}: the manifest lists no "
                         f"snapshot {name} for bucket {bucket!r}")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        if not chunk:
            continue
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    if rest:
        yield rest


def _decompressed(repo: BackupRepository, record: BackupRecord, artifact: Artifact
                  ) -> Iterator[bytes]:
    """The artifact's decompressed bytes, in chunks; its size, sha256 and zstd frame are
    checked at the end (``IntegrityError``)."""
    where = f"{record.location}/{artifact.path}"
    digest, size = hashlib.sha256(), 0
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        stream = repo.open_artifact(record, artifact)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} is "
                             "missing") from exc
    with stream:
        for raw in iter(lambda: stream.read(CHUNK), b""):
            digest.update(raw)
            size += len(raw)
            try:
                yield decompressor.decompress(raw)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} "
                                     f"is not a valid zstd stream: {exc}") from exc
    if size != artifact.size or digest.hexdigest() != artifact.sha256:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} has "
                             f"{size} bytes / sha256 {digest.hexdigest()}, the manifest says "
                             f"{artifact.size} / {artifact.sha256} (corrupt)")
    if not decompressor.eof:
        raise IntegrityError(f"{STORE} backup {record.partition_key}: snapshot {where} ends "
                             "before its zstd frame does (truncated)")


def read_snapshot(repo: BackupRepository, record: BackupRecord, bucket: str
                  ) -> Iterator[ObjectEntry]:
    """The entries of one bucket's snapshot, in key order, streamed.

    Damage raises ``IntegrityError``; a checksum mismatch is only known once the last entry has
    been read, so a consumer that must not act on a damaged snapshot checks it first
    (``check_snapshot``)."""
    artifact = _snapshot_artifact(record, bucket)
    where = f"{record.location}/{artifact.path}"
    lines = _lines(_decompressed(repo, record, artifact))
    try:
        header = json.loads(next(lines))
    except (StopIteration, ValueError) as exc:
        raise IntegrityError(f"{where}: no snapshot header") from exc
    version = header.get("version")
    if header.get("format") != SNAPSHOT_FORMAT or version not in READABLE_VERSIONS \
            or header.get("bucket") != bucket:
        raise IntegrityError(f"{where}: header {header!r} is not a snapshot of bucket "
                             f"{bucket!r} in a format this release reads (versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
    previous: str | None = None
    for line in lines:
        entry = ObjectEntry.from_line(line, where, version)
        if previous is not None and entry.key <= previous:
            raise IntegrityError(f"{where}: key {entry.key!r} follows {previous!r} (a snapshot "
                                 "is in strictly increasing key order)")
        previous = entry.key
        yield entry


def check_snapshot(repo: BackupRepository, record: BackupRecord, bucket: str) -> None:
    """Size and sha256 of one bucket's snapshot against the manifest (no parsing)."""
    repo.stream_artifact(record, _snapshot_artifact(record, bucket))


class _Cursor:
    """Walks a key-ordered snapshot alongside a key-ordered listing."""

    def __init__(self, entries: Iterator[ObjectEntry]) -> None:
        self._entries = entries
        self._next = next(entries, None)

    def find(self, key: str) -> ObjectEntry | None:
        while self._next is not None and self._next.key < key:
            self._next = next(self._entries, None)
        return self._next if self._next is not None and self._next.key == key else None

    def close(self) -> None:
        close = getattr(self._entries, "close", None)
        if close is not None:
            close()


# -- backup ----------------------------------------------------------------------------------

@dataclass
class BucketStats:
    objects: int = 0
    bytes: int = 0
    objects_copied: int = 0
    bytes_copied: int = 0
    objects_reused: int = 0
    objects_vanished: int = 0

    def counts(self) -> dict[str, int]:
        return {"objects": self.objects, "bytes": self.bytes}


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    buckets: dict[str, BucketStats]
    reuse_source: str | None

    def _total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.buckets.values())

    @property
    def objects(self) -> int:
        return self._total("objects")

    @property
    def bytes(self) -> int:
        return self._total("bytes")

    @property
    def objects_copied(self) -> int:
        return self._total("objects_copied")

    @property
    def objects_reused(self) -> int:
        return self._total("objects_reused")

    @property
    def bytes_copied(self) -> int:
        return self._total("bytes_copied")

    @property
    def objects_vanished(self) -> int:
        return self._total("objects_vanished")


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


class _TagCountTrust:
    """Whether a GET's ``x-amz-tagging-count`` can stand in for a GetObjectTagging, learnt
    once per backup. S3 sends the header only for an object that has tags, and only to
    credentials that may read them; so a missing header proves "no tags" only once this
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


@dataclass
class _Objects:
    """Per-object reads against one S3 server, shared by worker threads: MinIO's SDK where it
    can name the key (less CPU per request), boto3 otherwise."""

    client: Any
    reader: minio.Minio
    endpoint: S3Endpoint

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
            tags = self.tags(bucket, key)
            if tags is None:
                return None
            return _Observed(length, digest.hexdigest(), download.head, tags)
        raise StoreUnreachable(f"{self.endpoint.describe(bucket)}: object {key!r} was "
                               f"overwritten {MAX_CHANGES} times while it was being compared; "
                               "retried")


@dataclass
class _Copier(_Objects):
    """What the worker threads of one backup share."""

    repo: BackupRepository
    backup_id: str
    existing: dict[bytes, int]      # blobs present when the backup started: sha -> size
    written: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tag_counts: _TagCountTrust = field(default_factory=_TagCountTrust)

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

    def blob_present(self, sha: str, size: int) -> bool:
        return self.existing.get(bytes.fromhex(sha)) == size

    def _claim(self, sha: str) -> bool:
        """True for the first thread of this run to store ``sha``: it writes the blob. A blob
        is written even when it exists already, so its mtime is fresh (see collect_garbage)."""
        with self.lock:
            if sha in self.written:
                return False
            self.written.add(sha)
            return True

    def _release(self, sha: str) -> None:
        with self.lock:
            self.written.discard(sha)

    def _store(self, chunks: Iterator[bytes], size: int) -> tuple[str, int]:
        """Store a stream as a blob; return its sha256 and length. Small objects are hashed in
        memory and written once; large ones stream to a temporary blob that is renamed to its
        hash (same content, same name: idempotent)."""
        backend = self.repo.backend
        if size <= SMALL_OBJECT:
            data = b"".join(chunks)
            sha = hashlib.sha256(data).hexdigest()
            if self._claim(sha):
                try:
                    backend.write_bytes(blob_key(sha), data)
                except BaseException:
                    self._release(sha)
                    raise
            return sha, len(data)
        tmp = f"{TMP_PREFIX}/{self.backup_id}-{uuid.uuid4().hex}"
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
            except Exception:  # noqa: BLE001 - collect_garbage removes stale temporaries
                pass
            raise
        return sha, length

    def copy(self, bucket: str, obj: _Listed) -> tuple[ObjectEntry | None, str]:
        """Download one object into a blob, and read its tags. ``(entry, "copied")``, or
        ``(None, "vanished")`` when it was deleted after the listing."""
        for _ in range(MAX_CHANGES):
            try:
                download = self._get(bucket, obj.key, obj.etag)
                if download is None:
                    return None, "vanished"
                head = download.head
                sha, length = self._store(self._chunks(bucket, obj.key, obj.etag, download),
                                          obj.size)
                if length != obj.size:
                    raise IntegrityError(f"GET {obj.key!r} from {self.endpoint.describe(bucket)}"
                                         f" returned {length} bytes, the listing says {obj.size}")
                tags = self.downloaded_tags(bucket, obj.key, head.tag_count)
                if tags is None:
                    return None, "vanished"
                return ObjectEntry(obj.key, length, obj.etag, obj.last_modified, sha,
                                   head.content_type, head.metadata, head.headers,
                                   tags), "copied"
            except _ObjectChanged:
                current = self.head(bucket, obj.key)
                if current is None:
                    return None, "vanished"
                obj = _Listed(obj.key, current.size, current.etag, current.last_modified)
        raise StoreUnreachable(f"{self.endpoint.describe(bucket)}: object {obj.key!r} was "
                               f"overwritten {MAX_CHANGES} times while it was being copied; "
                               "retried")

    def refresh(self, bucket: str, obj: _Listed, previous: ObjectEntry
                ) -> tuple[ObjectEntry | None, str]:
        """Same content as the previous snapshot but a new Last-Modified: the headers may have
        changed (a metadata-only copy keeps the etag). One HEAD and the tags; no download."""
        head = self.head(bucket, obj.key)
        if head is None:
            return None, "vanished"
        if head.etag != previous.etag or head.size != previous.size:
            return self.copy(bucket, _Listed(obj.key, head.size, head.etag, head.last_modified))
        tags = self.tags(bucket, obj.key)
        if tags is None:
            return None, "vanished"
        # The listing's Last-Modified, not the HEAD's: HTTP dates have one-second resolution,
        # MinIO's listings milliseconds; the next backup compares with the listing.
        return replace(previous, last_modified=obj.last_modified,
                       content_type=head.content_type, metadata=head.metadata,
                       headers=head.headers, tags=tags), "reused"

    def retag(self, bucket: str, previous: ObjectEntry) -> tuple[ObjectEntry | None, str]:
        """Unchanged since the previous snapshot (key, size, etag, Last-Modified), but its
        tags may not be: changing them changes neither the etag nor Last-Modified."""
        tags = self.tags(bucket, previous.key)
        if tags is None:
            return None, "vanished"
        return replace(previous, tags=tags), "reused"


def choose_reuse_source(repo: BackupRepository, partition_key: str, *, window: timedelta,
                        gc_grace: timedelta, now: datetime | None = None, tz: str = "UTC"
                        ) -> BackupRecord | None:
    """The newest committed snapshot at or before ``partition_key`` that retention cannot
    delete within ``gc_grace`` (its age is at most ``window - gc_grace``; partition keys are
    dates in timezone ``tz``, as retention reads them)."""
    now = now or utcnow()
    eligible = [r for r in repo.list_backups(STORE)
                if r.partition_key <= partition_key
                and now - partition_start(r.partition_key, tz) <= window - gc_grace]
    return eligible[-1] if eligible else None


def existing_blobs(repo: BackupRepository) -> dict[bytes, int]:
    """Every blob in the repository: sha256 (32 bytes) -> size."""
    found: dict[bytes, int] = {}
    for info in repo.backend.list_files(BLOB_PREFIX):
        sha = blob_sha(info.key)
        if sha is not None:
            found[bytes.fromhex(sha)] = info.size
    return found


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


def probe_bucket(client: Any, endpoint: S3Endpoint, bucket: str, what: str) -> str:
    """One cheap request proving the bucket exists and the credentials work; returns the
    server's ``Server`` header."""
    with s3_errors(endpoint, what, bucket):
        resp = client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    return str(resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("server", "unknown"))


def backup(endpoint: S3Endpoint, pending: PendingBackup, buckets: Sequence[str], *,
           window: timedelta, gc_grace: timedelta = DEFAULT_GC_GRACE,
           workers: int = DEFAULT_WORKERS, tz: str = "UTC", log: Log = _quiet) -> BackupOutcome:
    """Snapshot ``buckets`` into ``pending``: one snapshot artifact per bucket; new or changed
    objects copied as blobs, unchanged ones reused from the previous snapshot."""
    repo = pending.repo
    buckets = list(dict.fromkeys(buckets))
    if not buckets:
        raise InvalidRequest(f"{STORE}: no buckets configured (RAG_MINIO_BUCKETS)")
    for bucket in buckets:
        check_bucket_name(bucket)
        refuse_repository_bucket(repo, bucket, "source")
    if gc_grace >= window:
        raise InvalidRequest(f"{STORE}: the garbage-collection grace ({gc_grace}) must be "
                             f"shorter than the retention window ({window})")
    client = endpoint.client()
    server = "unknown"
    for bucket in buckets:
        server = probe_bucket(client, endpoint, bucket, f"{STORE} backup of partition "
                              f"{pending.partition_key}")
    source = choose_reuse_source(repo, pending.partition_key, window=window, gc_grace=gc_grace,
                                 tz=tz)
    started = time.monotonic()
    copier = _Copier(client, endpoint.reader(), endpoint, repo, pending.backup_id,
                     existing_blobs(repo))
    log(f"{len(copier.existing)} blobs in the repository; reusing unchanged objects from "
        f"{'snapshot ' + source.partition_key if source else 'no earlier snapshot'}")
    stats: dict[str, BucketStats] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-backup")
    try:
        for bucket in buckets:
            stats[bucket] = _backup_bucket(copier, pool, pending, bucket, source, log)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    log(f"tags of downloaded objects: x-amz-tagging-count {copier.tag_counts.state}; "
        f"{copier.tag_counts.skipped} GetObjectTagging requests saved")
    fingerprint = {
        "buckets": {b: s.counts() for b, s in stats.items()},
        "objects": sum(s.objects for s in stats.values()),
        "bytes": sum(s.bytes for s in stats.values()),
        "incremental_from": source.partition_key if source else None,
        "transfer": {"objects_copied": sum(s.objects_copied for s in stats.values()),
                     "bytes_copied": sum(s.bytes_copied for s in stats.values()),
                     "objects_reused": sum(s.objects_reused for s in stats.values()),
                     "tag_reads_saved": copier.tag_counts.skipped,
                     "duration_s": round(time.monotonic() - started, 3)},
    }
    versions = {"boto3": boto3.__version__, "botocore": botocore.__version__}
    return BackupOutcome(fingerprint, versions, server, stats,
                         source.partition_key if source else None)


def _previous_entries(copier: _Copier, source: BackupRecord | None, bucket: str,
                      log: Log) -> Iterator[ObjectEntry]:
    if source is None or bucket not in source.manifest.fingerprint.get("buckets", {}):
        return iter(())
    try:
        check_snapshot(copier.repo, source, bucket)
    except IntegrityError as exc:
        log(f"bucket {bucket}: the snapshot of {source.partition_key} is damaged, copying every "
            f"object again ({exc})")
        return iter(())
    return read_snapshot(copier.repo, source, bucket)


def _backup_bucket(copier: _Copier, pool: ThreadPoolExecutor, pending: PendingBackup,
                   bucket: str, source: BackupRecord | None, log: Log) -> BucketStats:
    stats = BucketStats()
    previous = _Cursor(_previous_entries(copier, source, bucket, log))
    queue: deque[Future | tuple[ObjectEntry | None, str]] = deque()
    header = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "bucket": bucket,
              "partition_key": pending.partition_key, "backup_id": pending.backup_id,
              "incremental_from": source.partition_key if source else None}
    try:
        with pending.artifact(snapshot_name(bucket)) as out, \
                zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
                    out, closefd=False) as zout:
            zout.write(json.dumps(header).encode() + b"\n")

            def emit(result: tuple[ObjectEntry | None, str]) -> None:
                entry, how = result
                if entry is None:
                    stats.objects_vanished += 1
                    return
                zout.write(entry.to_line())
                stats.objects += 1
                stats.bytes += entry.size
                if how == "copied":
                    stats.objects_copied += 1
                    stats.bytes_copied += entry.size
                else:
                    stats.objects_reused += 1

            def drain(everything: bool) -> None:
                while queue:
                    head = queue[0]
                    if isinstance(head, Future):
                        if not (everything or len(queue) > MAX_QUEUED or head.done()):
                            return
                        result = head.result()
                    else:
                        result = head
                    queue.popleft()
                    emit(result)

            for obj in _list_bucket(copier.reader, copier.endpoint, bucket):
                prev = previous.find(obj.key)
                if prev is not None and prev.size == obj.size and prev.etag == obj.etag \
                        and copier.blob_present(prev.sha256, prev.size):
                    if prev.last_modified == obj.last_modified:
                        queue.append(pool.submit(copier.retag, bucket, prev))
                    else:
                        queue.append(pool.submit(copier.refresh, bucket, obj, prev))
                else:
                    queue.append(pool.submit(copier.copy, bucket, obj))
                drain(False)
            drain(True)
    except BaseException:
        for item in queue:
            if isinstance(item, Future):
                item.cancel()
        raise
    finally:
        previous.close()
    log(f"bucket {bucket}: {stats.objects} objects ({stats.bytes} bytes): "
        f"{stats.objects_copied} copied ({stats.bytes_copied} bytes), {stats.objects_reused} "
        f"unchanged, {stats.objects_vanished} deleted during the backup")
    return stats


# -- verification ------------------------------------------------------------------------

def _rotation_slot(partition_key: str, rotation_days: int) -> int:
    """Consecutive days get consecutive slots (modulo ``rotation_days``)."""
    return date.fromisoformat(partition_key[:10]).toordinal() % rotation_days


def _in_slot(sha: str, rotation_days: int, slot: int) -> bool:
    return int(sha[:8], 16) % rotation_days == slot


def _where_used(repo: BackupRepository, record: BackupRecord, shas: set[str],
                limit: int = EXAMPLES) -> dict[str, list[str]]:
    """For error messages: ``sha -> ["bucket/key", ...]`` (a few per blob)."""
    found: dict[str, list[str]] = {}
    for bucket in snapshot_buckets(record):
        for entry in read_snapshot(repo, record, bucket):
            if entry.sha256 in shas and len(found.setdefault(entry.sha256, [])) < limit:
                found[entry.sha256].append(f"{bucket}/{entry.key}")
    return found


def _check_blob(repo: BackupRepository, sha: str, size: int) -> tuple[str | None, int]:
    """``(None, bytes read)`` when the blob is present, ``size`` bytes long and its bytes hash
    to its name; otherwise ``(what is wrong, bytes read)``. Streamed in CHUNKs (never the whole
    blob in memory); reading stops once the blob is longer than ``size``."""
    digest, length = hashlib.sha256(), 0
    try:
        stream = repo.open_blob(sha)
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
    if digest.hexdigest() != sha:
        return f"content hashes to {digest.hexdigest()} (corrupt)", length
    return None, length


def _rehash(repo: BackupRepository, sha: str, size: int) -> str | None:
    """None when the blob's bytes hash to its name and its size is right, else what is wrong."""
    return _check_blob(repo, sha, size)[0]


def verify(repo: BackupRepository, record: BackupRecord, *,
           full_max_bytes: int = DEFAULT_FULL_VERIFY_BYTES,
           rotation_days: int = DEFAULT_ROTATION_DAYS, workers: int = DEFAULT_WORKERS,
           log: Log = _quiet) -> dict[str, Any]:
    """Check a snapshot: every bucket's snapshot file against the manifest (size, sha256,
    order, counts and bytes against the fingerprint), every referenced blob present with its
    size, and the sha256 of blobs re-computed: all of them when the referenced content is at
    most ``full_max_bytes``, otherwise the share whose slot (first 32 bits of the hash modulo
    ``rotation_days``) is that of the partition's day, so consecutive daily verifications
    re-read every blob within ``rotation_days`` days."""
    if rotation_days < 1:
        raise InvalidRequest("rotation_days must be at least 1")
    part = record.partition_key
    fp = record.manifest.fingerprint
    refs: dict[str, int] = {}
    objects = total = 0
    for bucket, counts in sorted(fp.get("buckets", {}).items()):
        n = size = 0
        for entry in read_snapshot(repo, record, bucket):
            n += 1
            size += entry.size
            if refs.setdefault(entry.sha256, entry.size) != entry.size:
                raise IntegrityError(f"{STORE} backup {part}: bucket {bucket} key {entry.key!r} "
                                     f"has size {entry.size}, another object with the same "
                                     f"sha256 {entry.sha256} has {refs[entry.sha256]}")
        if n != counts["objects"] or size != counts["bytes"]:
            raise IntegrityError(f"{STORE} backup {part}: the snapshot of bucket {bucket} lists "
                                 f"{n} objects / {size} bytes, the fingerprint records "
                                 f"{counts['objects']} / {counts['bytes']}")
        objects += n
        total += size
    log(f"{objects} objects in {len(fp.get('buckets', {}))} bucket snapshots reference "
        f"{len(refs)} blobs")

    unseen, wrong_size = dict(refs), {}
    for info in repo.backend.list_files(BLOB_PREFIX):
        sha = blob_sha(info.key)
        if sha is not None and sha in unseen:
            if info.size != unseen.pop(sha):
                wrong_size[sha] = f"{info.size} bytes, {refs[sha]} expected"
    problems = {**{sha: "missing" for sha in unseen}, **wrong_size}
    if problems:
        _raise_blob_problems(repo, record, problems, "referenced blobs are missing or of the "
                             "wrong size")

    blob_bytes = sum(refs.values())
    if blob_bytes <= full_max_bytes:
        chosen, slot, coverage = list(refs), -1, "all referenced blobs"
    else:
        slot = _rotation_slot(part, rotation_days)
        chosen = [sha for sha in refs if _in_slot(sha, rotation_days, slot)]
        coverage = (f"share {slot + 1} of {rotation_days} (the partition's day): every blob is "
                    f"re-read within {rotation_days} days")
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-verify") as pool:
        outcomes = list(pool.map(lambda sha: (sha, _rehash(repo, sha, refs[sha])), chosen))
    bad = {sha: problem for sha, problem in outcomes if problem is not None}
    if bad:
        _raise_blob_problems(repo, record, bad, "blobs do not match their sha256")
    rehashed_bytes = sum(refs[sha] for sha in chosen)
    log(f"re-hashed {len(chosen)} blobs ({rehashed_bytes} bytes): {coverage}")
    return {
        "buckets": len(fp.get("buckets", {})),
        "objects_checked": objects,
        "bytes_in_snapshot": total,
        "blobs_referenced": len(refs),
        "blob_bytes_referenced": blob_bytes,
        "blobs_present": len(refs),
        "blobs_rehashed": len(chosen),
        "bytes_rehashed": rehashed_bytes,
        "rotation_days": 0 if slot < 0 else rotation_days,
        "rehash_coverage": coverage,
    }


def _raise_blob_problems(repo: BackupRepository, record: BackupRecord,
                         problems: dict[str, str], summary: str) -> None:
    used = _where_used(repo, record, set(problems))
    lines = []
    for sha, problem in sorted(problems.items())[:EXAMPLES]:
        keys = ", ".join(used.get(sha, [])) or "?"
        lines.append(f"{repo.blob_location(sha)}: {problem} (used by {keys})")
    more = f" (and {len(problems) - EXAMPLES} more)" if len(problems) > EXAMPLES else ""
    raise IntegrityError(
        f"{STORE} backup {record.partition_key}: {len(problems)} {summary}{more}: "
        + "; ".join(lines)
        + ". Delete the damaged blob files and run minio_backup for today's partition: objects "
          "still in the source are copied again; this snapshot cannot restore them.")


# -- garbage collection ---------------------------------------------------------------------

@dataclass(frozen=True)
class GcReport:
    snapshots: int
    blobs_referenced: int
    blobs_seen: int
    blobs_deleted: int
    bytes_deleted: int
    blobs_kept_in_grace: int
    temporaries_deleted: int
    unknown_files: int
    dry_run: bool


def referenced_blobs(repo: BackupRepository) -> tuple[int, set[str]]:
    """Every sha256 referenced by a committed snapshot (read completely and checked)."""
    referenced: set[str] = set()
    snapshots = 0
    for record in repo.list_backups(STORE):
        current: BackupRecord | None = record
        for _ in range(3):  # a re-run of the partition may replace it while we read it
            try:
                for bucket in snapshot_buckets(current):
                    check_snapshot(repo, current, bucket)
                    referenced.update(e.sha256 for e in read_snapshot(repo, current, bucket))
                snapshots += 1
                break
            except IntegrityError as exc:
                fresh = repo.get(STORE, record.partition_key)
                if fresh is None:  # deleted meanwhile (retention)
                    break
                if fresh.backup_id == current.backup_id:
                    raise IntegrityError(
                        f"{STORE} garbage collection refused, nothing deleted: the snapshot of "
                        f"partition {record.partition_key} cannot be read, so the blobs it "
                        f"references are unknown ({exc}). Re-run minio_backup for that "
                        "partition, or delete that backup if it is expendable.") from exc
                current = fresh
    return snapshots, referenced


def collect_garbage(repo: BackupRepository, *, grace: timedelta = DEFAULT_GC_GRACE,
                    now: datetime | None = None, dry_run: bool = False,
                    log: Log = _quiet) -> GcReport:
    """Delete blobs that no snapshot references, safely while a backup runs.

    The rule: a blob is deleted only when (1) no committed snapshot references it, read after
    retention has deleted the expired snapshots, and (2) its modification time (from the
    backend's listing) is older than ``grace``. Stale temporary files (of crashed backups) older
    than ``grace`` go too; files under the blob prefix that are not named like blobs are left
    alone. If any snapshot cannot be read, nothing is deleted.

    Why a backup running at the same time loses nothing, provided ``grace`` is longer than the
    longest backup (default 48 h):

    - every blob the backup writes gets a fresh mtime: a blob is written (or rewritten, when
      the same content exists already) whenever its object is downloaded, so it is younger than
      ``grace`` until the backup has committed the snapshot that references it;
    - every blob it reuses without writing is referenced by its reuse source, the newest
      snapshot whose age is at most ``window - grace``; retention cannot delete that snapshot
      before ``grace`` has passed, so it is one of the snapshots read here.
    """
    now = now or utcnow()
    cutoff = now - grace
    backend = repo.backend
    snapshots, referenced = referenced_blobs(repo)
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
        if len(doomed) >= 1000:
            flush()
    for info in backend.list_files(TMP_PREFIX, include_temporary=True):
        if info.mtime < cutoff:
            temporaries += 1
            doomed.append(info.key)
    flush()
    verb = "would delete" if dry_run else "deleted"
    log(f"{snapshots} snapshots reference {len(referenced)} blobs; {seen} blobs stored; "
        f"{verb} {deleted} unreferenced blobs ({deleted_bytes} bytes) and {temporaries} stale "
        f"temporary files; kept {young} unreferenced blobs younger than {grace}")
    return GcReport(snapshots, len(referenced), seen, deleted, deleted_bytes, young,
                    temporaries, unknown, dry_run)


# -- restore ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preflight:
    """What a restore checked before it changed anything on the target: every blob it will
    write (size and sha256, each distinct blob once) and the snapshot file (read to its end,
    size and sha256 against the manifest)."""

    blobs_checked: int = 0
    bytes_hashed: int = 0
    objects_to_write: int = 0
    objects_identical: int = 0    # identical on the target already: their blobs not needed
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"blobs_checked": self.blobs_checked, "bytes_hashed": self.bytes_hashed,
                "objects_to_write": self.objects_to_write,
                "objects_identical": self.objects_identical,
                "duration_s": round(self.duration_s, 3)}


@dataclass(frozen=True)
class BucketRestore:
    source_bucket: str
    target_bucket: str
    in_snapshot: int
    restored: int
    skipped_identical: int       # identical objects left alone (those with tags corrected too)
    removed: int
    bytes_restored: int
    missing_after: int
    tags_corrected: int = 0      # identical objects whose tags were rewritten
    comparison: Comparison = field(default_factory=Comparison)

    @property
    def matches_snapshot(self) -> bool:
        return self.comparison.matches


@dataclass(frozen=True)
class RestoreReport:
    partition_key: str
    backup_id: str
    buckets: tuple[BucketRestore, ...]
    duration_s: float
    comparison: Comparison = field(default_factory=Comparison)  # every bucket's, together
    preflight: Preflight = field(default_factory=Preflight)

    def total(self, name: str) -> int:
        return sum(getattr(b, name) for b in self.buckets)

    @property
    def matches_snapshot(self) -> bool:
        return self.comparison.matches


class RestoreDiffers(IntegrityError):
    """After a restore, the target differs from the snapshot. The objects were written;
    ``report`` says what was restored and holds the comparison with every difference."""

    def __init__(self, message: str, report: RestoreReport) -> None:
        super().__init__(message)
        self.report = report


class RestoreAborted(IntegrityError):
    """A blob turned out missing or damaged while the restore copied it (it passed the
    pre-flight, so it changed in between): the restore stopped part-way. ``report`` says how
    far it got (the bucket it stopped in is the last, its comparison not run)."""

    def __init__(self, message: str, report: RestoreReport) -> None:
        super().__init__(message)
        self.report = report


class _BlobDamaged(IntegrityError):
    """A blob read during the copy is missing or does not match its sha256."""


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


@dataclass
class _Restorer(_Objects):
    repo: BackupRepository
    record: BackupRecord

    def _damaged(self, bucket: str, entry: ObjectEntry, problem: str) -> _BlobDamaged:
        return _BlobDamaged(
            f"{STORE} backup {self.record.partition_key}: the blob of {bucket}/{entry.key!r} "
            f"({self.repo.blob_location(entry.sha256)}) {problem}; the object was "
            "not written. Restore it from another snapshot.")

    def upload(self, source_bucket: str, target: str, entry: ObjectEntry) -> None:
        """Write one object from its blob. The bytes are checked against the sha256 before the
        object becomes visible: small objects in memory, large ones before the multipart upload
        completes (aborted otherwise)."""
        extra: dict[str, Any] = {"Metadata": entry.metadata}
        if entry.content_type:
            extra["ContentType"] = entry.content_type
        for param, header in HEADER_PARAMS.items():
            if header in entry.headers:
                extra[param] = entry.headers[header]
        if entry.tags:  # with the object: no moment where it exists untagged
            extra["Tagging"] = _tag_header(entry.tags)
        try:
            stream = self.repo.open_blob(entry.sha256)
        except FileNotFoundError as exc:
            raise self._damaged(source_bucket, entry, "is missing") from exc
        what = f"restore of {entry.key!r}"
        with stream:
            if entry.size <= SMALL_OBJECT:
                data = _read_exactly(stream, entry.size + 1)
                if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                    raise self._damaged(source_bucket, entry, "does not match its sha256")
                # The sha256 goes along: servers that check it (MinIO, AWS) refuse a body
                # damaged on the way.
                checksum = base64.b64encode(bytes.fromhex(entry.sha256)).decode()
                with s3_errors(self.endpoint, what, target):
                    self.client.put_object(Bucket=target, Key=entry.key, Body=data,
                                           ChecksumSHA256=checksum, **extra)
                return
            part_size = max(PART_SIZE, math.ceil(entry.size / MAX_PARTS / CHUNK) * CHUNK)
            with s3_errors(self.endpoint, what, target):
                upload_id = self.client.create_multipart_upload(
                    Bucket=target, Key=entry.key, **extra)["UploadId"]
            try:
                digest, length, parts = hashlib.sha256(), 0, []
                while True:
                    data = _read_exactly(stream, part_size)
                    if not data:
                        break
                    digest.update(data)
                    length += len(data)
                    with s3_errors(self.endpoint, what, target):
                        resp = self.client.upload_part(
                            Bucket=target, Key=entry.key, UploadId=upload_id,
                            PartNumber=len(parts) + 1, Body=data)
                    parts.append({"PartNumber": len(parts) + 1, "ETag": resp["ETag"]})
                if length != entry.size or digest.hexdigest() != entry.sha256:
                    raise self._damaged(source_bucket, entry, "does not match its sha256")
                with s3_errors(self.endpoint, what, target):
                    self.client.complete_multipart_upload(
                        Bucket=target, Key=entry.key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
            except BaseException:
                try:
                    self.client.abort_multipart_upload(Bucket=target, Key=entry.key,
                                                       UploadId=upload_id)
                except (ClientError, BotoCoreError):
                    pass
                raise

    def identical(self, target: str, entry: ObjectEntry) -> bool:
        """The target's object has the snapshot's bytes (etag, or sha256 when the etags
        differ, e.g. multipart uploads with another part size) and the same headers.
        Reads only (HEAD, and a GET when the etags differ)."""
        with s3_errors(self.endpoint, f"HEAD {entry.key!r}", target):
            try:
                head = self.client.head_object(Bucket=target, Key=entry.key)
            except ClientError as exc:
                if _code(exc) in MISSING_KEY:
                    return False
                raise
        if int(head["ContentLength"]) != entry.size \
                or dict(head.get("Metadata") or {}) != entry.metadata \
                or _headers(head) != entry.headers \
                or (entry.content_type and head.get("ContentType") != entry.content_type):
            return False
        if head["ETag"] == entry.etag:
            return True
        digest = hashlib.sha256()
        with s3_errors(self.endpoint, f"GET {entry.key!r}", target):
            try:
                body = self.client.get_object(Bucket=target, Key=entry.key,
                                              IfMatch=head["ETag"])["Body"]
            except ClientError as exc:
                if _code(exc) in MISSING_KEY | CHANGED:
                    return False
                raise
            with body:
                for chunk in iter(lambda: body.read(CHUNK), b""):
                    digest.update(chunk)
        return digest.hexdigest() == entry.sha256

    def put_tags(self, target: str, entry: ObjectEntry) -> None:
        """Give the target's object exactly the snapshot's tags."""
        with s3_errors(self.endpoint, f"tagging {entry.key!r}", target):
            if entry.tags:
                self.client.put_object_tagging(Bucket=target, Key=entry.key, Tagging={
                    "TagSet": [{"Key": k, "Value": v} for k, v in entry.tags.items()]})
            else:
                self.client.delete_object_tagging(Bucket=target, Key=entry.key)

    def restore_one(self, source_bucket: str, target: str, entry: ObjectEntry,
                    on_target: _Listed | None, identical: bool) -> str:
        """``"restored"`` (written), ``"skipped"`` (identical) or ``"retagged"`` (identical
        bytes and headers, tags corrected). ``identical`` is the pre-flight's finding (it
        compared the target's object, reading only); an object gone since is written. A
        version-1 entry does not know its tags: an identical object keeps the ones it has."""
        if identical and on_target is not None and on_target.size == entry.size:
            if entry.tags is None:
                return "skipped"
            current = self.tags(target, entry.key)
            if current is not None:
                if current == entry.tags:
                    return "skipped"
                self.put_tags(target, entry)
                return "retagged"
        self.upload(source_bucket, target, entry)
        return "restored"


def _bucket_exists(client: Any, endpoint: S3Endpoint, bucket: str, what: str) -> bool:
    with s3_errors(endpoint, what, bucket):
        try:
            client.head_bucket(Bucket=bucket)
            return True
        except ClientError as exc:
            if _status(exc) != 404 and _code(exc) not in MISSING_KEY | {"NoSuchBucket"}:
                raise
    return False


def _ensure_bucket(client: Any, endpoint: S3Endpoint, bucket: str, log: Log) -> bool:
    """Create ``bucket`` if it does not exist; True if it was created."""
    if _bucket_exists(client, endpoint, bucket, "restore target"):
        return False
    with s3_errors(endpoint, "restore target", bucket):
        args: dict[str, Any] = {"Bucket": bucket}
        if endpoint.region and endpoint.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": endpoint.region}
        try:
            client.create_bucket(**args)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou",):
                raise
    log(f"created bucket {bucket!r} on {endpoint.describe()}")
    return True


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


class _Bits:
    """One bit per snapshot entry of a restore (in snapshot order): the pre-flight found the
    target's object identical. An eighth of a byte per object, whatever the bucket's size."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0  # entries seen

    def set(self, index: int) -> None:
        while index >> 3 >= len(self._bits):
            self._bits.extend(bytes(4096))
        self._bits[index >> 3] |= 1 << (index & 7)

    def __getitem__(self, index: int) -> bool:
        return index >> 3 < len(self._bits) and bool(self._bits[index >> 3] & 1 << (index & 7))


@dataclass
class _PreflightCheck:
    """The pre-flight of one restore: for every object it will write, its blob present with
    the right size and sha256 (each distinct blob hashed once, in the worker pool, streamed);
    objects already identical on the target (found by reading only) need no blob. Changes
    nothing anywhere. Only the main thread touches this object; workers run pure checks."""

    restorer: _Restorer
    pool: ThreadPoolExecutor
    submitted: set[bytes] = field(default_factory=set)      # blobs checked or in flight
    users: dict[str, list[str]] = field(default_factory=dict)  # in flight or bad: keys (a few)
    bad: dict[str, str] = field(default_factory=dict)       # the first PREFLIGHT_EXAMPLES
    bad_total: int = 0
    blobs: int = 0
    bytes: int = 0
    to_write: int = 0
    identical: int = 0
    queue: deque[tuple[Future, Any]] = field(default_factory=deque)

    def bucket(self, source: str, target: str, prefix: str, target_exists: bool) -> _Bits:
        restorer = self.restorer
        bits = _Bits()
        entries = (e for e in read_snapshot(restorer.repo, restorer.record, source)
                   if e.key.startswith(prefix))
        listed = (_list_bucket(restorer.reader, restorer.endpoint, target, prefix)
                  if target_exists else iter(()))
        try:
            for entry, obj in _merge(entries, listed):
                if entry is None:
                    continue
                index = bits.count
                bits.count += 1
                if obj is not None and obj.size == entry.size:
                    future = self.pool.submit(restorer.identical, target, entry)
                    self.queue.append((future, (bits, index, source, entry)))
                else:
                    self._need(source, entry)
                self._settle(False)
            self._settle(True)
        except BaseException:
            for future, _ in self.queue:
                future.cancel()
            raise
        return bits

    def _need(self, source: str, entry: ObjectEntry) -> None:
        """The restore will write ``entry``: its blob must be checked (once)."""
        self.to_write += 1
        sha = entry.sha256
        if sha in self.users:  # in flight, or found bad: name this key too
            if len(self.users[sha]) < PREFLIGHT_KEYS:
                self.users[sha].append(f"{source}/{entry.key}")
            return
        raw = bytes.fromhex(sha)
        if raw in self.submitted:  # checked already, and sound
            return
        self.submitted.add(raw)
        self.users[sha] = [f"{source}/{entry.key}"]
        future = self.pool.submit(_check_blob, self.restorer.repo, sha, entry.size)
        self.queue.append((future, sha))

    def _settle(self, block: bool) -> None:
        while self.queue and (block or self.queue[0][0].done()
                              or len(self.queue) > MAX_QUEUED):
            future, item = self.queue.popleft()
            if isinstance(item, str):  # a blob check
                problem, read = future.result()
                self.blobs += 1
                self.bytes += read
                if problem is None:
                    del self.users[item]
                else:
                    self.bad_total += 1
                    if len(self.bad) < PREFLIGHT_EXAMPLES:
                        self.bad[item] = problem
                    else:
                        del self.users[item]
                continue
            bits, index, source, entry = item  # an identity check on the target
            if future.result():
                self.identical += 1
                bits.set(index)
            else:
                self._need(source, entry)

    def refusal(self, partition_key: str, targets: Sequence[str]) -> IntegrityError:
        lines = [f"{self.restorer.repo.blob_location(sha)}: {problem} (needed by "
                 f"{', '.join(repr(k) for k in self.users.get(sha, []))})"
                 for sha, problem in self.bad.items()]
        more = self.bad_total - len(self.bad)
        return IntegrityError(
            f"{STORE} restore of {partition_key} refused before changing anything: "
            f"{self.bad_total} blob(s) that the restore would write are missing or damaged: "
            + "; ".join(lines) + (f"; and {more} more" if more > 0 else "")
            + f". The target ({', '.join(targets)}) was not changed: no bucket created, no "
              "object written, tagged or removed. Restore these keys from another snapshot "
              "(another partition_key), or, while the source still has them, run minio_backup "
              "for today's partition to copy them again (then verify it).")

    def summary(self, duration_s: float) -> Preflight:
        return Preflight(self.blobs, self.bytes, self.to_write, self.identical, duration_s)


def _preflight(restorer: _Restorer, pool: ThreadPoolExecutor, pairs: Sequence[tuple[str, str]],
               prefix: str, log: Log) -> tuple[Preflight, list[_Bits]]:
    """Before a restore changes anything: read every snapshot to its end (size and sha256
    against the manifest), compare the objects already on the targets (reading only), and
    check every blob the restore will write. Raises ``IntegrityError`` naming every missing
    or damaged blob (up to PREFLIGHT_EXAMPLES, with the keys that need each, then a count)."""
    started = time.monotonic()
    record = restorer.record
    check = _PreflightCheck(restorer, pool)
    targets = [t for _, t in pairs]
    plans = []
    try:
        for source, target in pairs:
            exists = _bucket_exists(restorer.client, restorer.endpoint, target, "restore target")
            plans.append(check.bucket(source, target, prefix, exists))
    except IntegrityError as exc:
        raise IntegrityError(f"{exc}. The restore was refused before changing anything: the "
                             f"target ({', '.join(targets)}) was not changed.") from exc
    if check.bad_total:
        raise check.refusal(record.partition_key, targets)
    summary = check.summary(time.monotonic() - started)
    log(f"pre-flight: snapshot(s) intact; {summary.objects_to_write} objects to write, "
        f"{summary.objects_identical} identical on the target; {summary.blobs_checked} blobs "
        f"checked ({summary.bytes_hashed} bytes hashed) in {summary.duration_s:.2f} s")
    return summary, plans


def restore(repo: BackupRepository, record: BackupRecord, endpoint: S3Endpoint, *,
            buckets: Sequence[str] | None = None, target_bucket: str = "", prefix: str = "",
            remove_extra: bool = False, confirm: str = "", workers: int = DEFAULT_WORKERS,
            accept_differences: bool = False, log: Log = _quiet) -> RestoreReport:
    """Restore buckets of a snapshot: each into itself, or one into ``target_bucket`` (created
    if missing), optionally only keys starting with ``prefix``.

    First a pre-flight that changes nothing (``_preflight``): every snapshot read to its end
    and checked, the target's objects compared (reading only), and every blob the restore will
    write checked by size and sha256. A missing or damaged one refuses the restore with
    ``IntegrityError`` before any bucket is created or any object written, tagged or removed.

    Objects on the target that are identical (size, bytes, headers) are skipped; their tags
    are corrected when they differ. Objects on the target that the snapshot does not have
    (under ``prefix``) are kept, unless ``remove_extra`` with ``confirm`` equal to the target
    bucket's name; they are removed only after every object of the snapshot was restored.
    The copy checks every blob against its sha256 again as it reads it, before its object is
    written; one that changed since the pre-flight stops the restore (``RestoreAborted``,
    saying how far it got).

    Afterwards every target is compared with the snapshot, object by object (see
    ``compare_bucket``; objects not in the snapshot count as differences when
    ``remove_extra``). A difference raises ``RestoreDiffers`` (carrying the report) unless
    ``accept_differences``; an aspect that could not be compared (tags of a version-1
    snapshot) is reported in ``comparison.not_run`` and makes ``matches_snapshot`` false."""
    started = time.monotonic()
    available = snapshot_buckets(record)
    chosen = list(dict.fromkeys(buckets)) if buckets else available
    unknown = [b for b in chosen if b not in available]
    if unknown:
        raise InvalidRequest(f"{STORE} backup {record.partition_key} has no snapshot of "
                             f"bucket(s) {unknown}; it has {available}")
    if target_bucket and len(chosen) != 1:
        raise InvalidRequest(f"target_bucket needs exactly one source bucket (the snapshot has "
                             f"{available}; choose one in buckets)")
    pairs = [(b, target_bucket or b) for b in chosen]
    for _, target in pairs:
        check_bucket_name(target, "target bucket")
        refuse_repository_bucket(repo, target, "target")
        if remove_extra and confirm != target:
            raise ConfirmationRequired(
                f"removing objects of bucket {target!r} that are not in the snapshot of "
                f"{record.partition_key} is destructive: set confirm to {target!r} to proceed "
                f"(or leave remove_extra off to keep them)")
    for source, _ in pairs:
        _snapshot_artifact(record, source)  # listed in the manifest (read by the pre-flight)
    restorer = _Restorer(endpoint.client(), endpoint.reader(), endpoint, repo, record)
    reports: list[BucketRestore] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-restore") \
            as pool:
        preflight, plans = _preflight(restorer, pool, pairs, prefix, log)
        try:
            for (source, target), plan in zip(pairs, plans):
                reports.append(_restore_bucket(restorer, pool, source, target, prefix,
                                               remove_extra, plan, log))
        except _Stopped as stop:
            report = RestoreReport(record.partition_key, record.backup_id,
                                   (*reports, stop.bucket), time.monotonic() - started,
                                   _combined([b.comparison for b in (*reports, stop.bucket)]),
                                   preflight)
            raise RestoreAborted(stop.message, report) from stop.__cause__
    report = RestoreReport(record.partition_key, record.backup_id, tuple(reports),
                           time.monotonic() - started,
                           _combined([b.comparison for b in reports]), preflight)
    comparison = report.comparison
    log(f"comparison with the snapshot: {dict(sorted(comparison.compared.items()))} compared; "
        f"{comparison.summary()}")
    if comparison.differences and not accept_differences:
        raise RestoreDiffers(
            f"{STORE} restore of {record.partition_key} into "
            f"{', '.join(t for _, t in pairs)}: the target differs from the snapshot in "
            f"{len(comparison.differences)} properties: {comparison.summary()}. The objects "
            "were written; find what else writes to the bucket and restore again, or set "
            "accept_differences to accept the restore as it is.", report)
    return report


def _combined(parts: Sequence[Comparison]) -> Comparison:
    """Several buckets' comparisons as one (their items already name their bucket)."""
    total = Comparison()
    for part in parts:
        for aspect, n in part.compared.items():
            total.count(aspect, n)
        total.differences.extend(part.differences)
        for aspect, why in part.not_run.items():
            total.skip(aspect, f"{total.not_run[aspect]}; {why}" if aspect in total.not_run
                       else why)
    return total


class _Stopped(Exception):
    """A bucket's copy stopped on a blob damaged after the pre-flight: how far it got."""

    def __init__(self, message: str, bucket: BucketRestore) -> None:
        super().__init__(message)
        self.message, self.bucket = message, bucket


def _restore_bucket(restorer: _Restorer, pool: ThreadPoolExecutor, source: str, target: str,
                    prefix: str, remove_extra: bool, plan: _Bits, log: Log) -> BucketRestore:
    client, endpoint, repo, record = (restorer.client, restorer.endpoint, restorer.repo,
                                      restorer.record)
    _ensure_bucket(client, endpoint, target, log)
    entries = (e for e in read_snapshot(repo, record, source) if e.key.startswith(prefix))
    listed = _list_bucket(restorer.reader, endpoint, target, prefix)
    in_snapshot = restored = skipped = retagged = restored_bytes = 0
    extra: list[str] = []
    pending: deque[tuple[Future, ObjectEntry]] = deque()

    def count(outcome: str, entry: ObjectEntry) -> None:
        nonlocal restored, skipped, retagged, restored_bytes
        if outcome == "restored":
            restored += 1
            restored_bytes += entry.size
        else:
            skipped += 1
            retagged += outcome == "retagged"

    def settle(block: bool) -> None:
        while pending and (block or pending[0][0].done() or len(pending) > 4 * MAX_QUEUED):
            future, entry = pending.popleft()
            count(future.result(), entry)

    try:
        for entry, obj in _merge(entries, listed):
            if entry is None:
                assert obj is not None
                extra.append(obj.key)
                continue
            index = in_snapshot
            in_snapshot += 1
            pending.append((pool.submit(restorer.restore_one, source, target, entry, obj,
                                        plan[index]), entry))
            settle(False)
        settle(True)
    except _BlobDamaged as exc:
        # Let the transfers already running finish (they were checked), then say how far.
        for future, _ in pending:
            future.cancel()
        for future, entry in pending:
            if not future.cancelled():
                try:
                    count(future.result(), entry)
                except Exception:  # noqa: BLE001 - the first failure is the one reported
                    pass
        stopped = Comparison()
        stopped.skip("objects", f"the restore of {source} into {target} stopped part-way")
        message = (
            f"{STORE} restore of {record.partition_key} into {target} stopped part-way: {exc} "
            f"The blob passed the pre-flight, so it was damaged or removed since. The target "
            f"WAS changed: {restored} of the {plan.count} objects of {source}"
            f"{' under ' + repr(prefix) if prefix else ''} written ({restored_bytes} bytes), "
            f"{skipped} found identical and left alone ({retagged} re-tagged); nothing was "
            "removed. Restore again from another snapshot (another partition_key).")
        log(message)
        raise _Stopped(message, BucketRestore(
            source, target, plan.count, restored, skipped, 0, restored_bytes, 0, retagged,
            stopped)) from exc
    except BaseException:
        for future, _ in pending:
            future.cancel()
        raise
    removed = 0
    if remove_extra and extra:
        with s3_errors(endpoint, "removing objects not in the snapshot", target):
            for start in range(0, len(extra), 1000):
                batch = extra[start:start + 1000]
                resp = client.delete_objects(Bucket=target, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise RagBackupError(f"{endpoint.describe(target)} refused to delete "
                                         f"{len(resp['Errors'])} objects, e.g. {first}")
                removed += len(batch)
    # Independent check: what the target now has, object by object, against the snapshot.
    comparison = _compare(restorer, pool, repo, record, source, target, prefix,
                          extra_objects=remove_extra)
    missing = sum(1 for d in comparison.differences
                  if d.property == "object" and d.actual is None)
    log(f"{source} -> {target}: {in_snapshot} objects in the snapshot"
        f"{' under ' + repr(prefix) if prefix else ''}: {restored} restored ({restored_bytes} "
        f"bytes), {skipped} identical skipped ({retagged} of them re-tagged), {removed} not in "
        f"the snapshot removed, {len(extra) - removed} not in the snapshot kept, {missing} "
        f"missing afterwards, {len(comparison.differences)} differences")
    return BucketRestore(source, target, in_snapshot, restored, skipped, removed,
                         restored_bytes, missing, retagged, comparison)


# -- comparison of a bucket with a snapshot ------------------------------------------------

def _compare_dicts(comparison: Comparison, aspect: str, item: str, label: str,
                   expected: dict[str, str], actual: dict[str, str]) -> None:
    """One comparison of ``aspect``; a difference per name whose value differs."""
    comparison.count(aspect)
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            comparison.differ(item, f"{label} {name}", expected.get(name), actual.get(name))


def _compare_object(comparison: Comparison, item: str, entry: ObjectEntry,
                    seen: _Observed | None) -> None:
    comparison.count("objects")
    if seen is None:
        comparison.differ(item, "object", f"present ({entry.size} bytes)", None)
        return
    comparison.check("sizes", item, "size", entry.size, seen.size)
    comparison.check("sha256", item, "sha256", entry.sha256, seen.sha256)
    if entry.content_type:  # always recorded: S3 gives every object one
        comparison.check("content_type", item, "content type", entry.content_type,
                         seen.head.content_type)
    _compare_dicts(comparison, "metadata", item, "metadata", entry.metadata, seen.head.metadata)
    _compare_dicts(comparison, "headers", item, "header", entry.headers, seen.head.headers)
    if entry.tags is not None:
        _compare_dicts(comparison, "tags", item, "tag", entry.tags, seen.tags)


def _compare(objects: _Objects, pool: ThreadPoolExecutor, repo: BackupRepository,
             record: BackupRecord, source: str, target: str, prefix: str, *,
             extra_objects: bool) -> Comparison:
    """Walk the snapshot of ``source`` alongside the listing of ``target`` (both in key
    order, memory bounded); every object present on both is read back by the pool (bytes
    hashed as they stream, headers, tags) and compared field by field."""
    comparison = Comparison()
    entries = (e for e in read_snapshot(repo, record, source) if e.key.startswith(prefix))
    listed = _list_bucket(objects.reader, objects.endpoint, target, prefix)
    pending: deque[tuple[Future, ObjectEntry]] = deque()
    untagged = 0

    def settle(block: bool) -> None:
        while pending and (block or pending[0][0].done() or len(pending) > MAX_QUEUED):
            future, entry = pending.popleft()
            _compare_object(comparison, f"{target}/{entry.key}", entry, future.result())

    try:
        for entry, obj in _merge(entries, listed):
            if entry is None:
                assert obj is not None
                if extra_objects:
                    comparison.count("objects")
                    comparison.differ(f"{target}/{obj.key}", "object", None,
                                      f"present ({obj.size} bytes), not in the snapshot")
                continue
            untagged += entry.tags is None
            if obj is None:
                _compare_object(comparison, f"{target}/{entry.key}", entry, None)
                continue
            pending.append((pool.submit(objects.observe, target, entry.key), entry))
            settle(False)
        settle(True)
    except BaseException:
        for future, _ in pending:
            future.cancel()
        raise
    if untagged:
        comparison.skip("tags", f"the snapshot of bucket {source!r} ({record.partition_key}) "
                                f"is format version 1, which did not record object tags "
                                f"({untagged} objects)")
    return comparison


def compare_bucket(repo: BackupRepository, record: BackupRecord, endpoint: S3Endpoint,
                   bucket: str, target_bucket: str = "", *, prefix: str = "",
                   extra_objects: bool = False, workers: int = DEFAULT_WORKERS) -> Comparison:
    """Compare what ``target_bucket`` (default: ``bucket`` itself) has now with the snapshot
    of ``bucket``, object by object: presence, size, sha256 of the bytes the server returns,
    content type, user metadata, the PUT headers and tags (not run for a version-1
    snapshot). Objects only on the target are differences when ``extra_objects``. Items are
    named ``<target bucket>/<key>``, properties e.g. ``sha256``, ``tag project``,
    ``metadata source``, ``header Cache-Control``. Reads only."""
    if bucket not in snapshot_buckets(record):
        raise InvalidRequest(f"{STORE} backup {record.partition_key} has no snapshot of "
                             f"bucket {bucket!r}; it has {snapshot_buckets(record)}")
    target = check_bucket_name(target_bucket or bucket, "target bucket")
    check_snapshot(repo, record, bucket)
    objects = _Objects(endpoint.client(), endpoint.reader(), endpoint)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="minio-compare") \
            as pool:
        return _compare(objects, pool, repo, record, bucket, target, prefix,
                        extra_objects=extra_objects)


def remove_bucket(endpoint: S3Endpoint, bucket: str, *, repo: BackupRepository) -> bool:
    """Empty and delete ``bucket`` (a scratch target of a restore or a drill), one listing page
    at a time; True if it existed. The bucket holding ``repo`` is refused."""
    check_bucket_name(bucket)
    holder = repository_bucket(repo)
    if holder is not None and bucket == holder:
        where = f"s3://{holder}/{getattr(repo.backend, 'prefix', '')}".rstrip("/")
        raise InvalidRequest(f"{STORE}: bucket {bucket!r} holds the backup repository "
                             f"({where}); removing it is refused (only scratch targets of a "
                             "restore are removed)")
    client = endpoint.client()
    if not _bucket_exists(client, endpoint, bucket, "removing a scratch bucket"):
        return False
    with s3_errors(endpoint, "removing a scratch bucket", bucket):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not keys:
                continue
            failed = client.delete_objects(Bucket=bucket, Delete={"Objects": keys,
                                                                  "Quiet": True}).get("Errors")
            if failed:
                raise RagBackupError(
                    f"{endpoint.describe(bucket)}: {len(failed)} object(s) could not be "
                    f"deleted while removing the bucket, e.g. {failed[0].get('Key')!r}: "
                    f"{failed[0].get('Code')} {failed[0].get('Message', '')}".rstrip())
        client.delete_bucket(Bucket=bucket)
    return True
