"""The offsite copy: every committed, verified backup copied to a second repository at another
site (a directory or an S3 bucket, ``RAG_BACKUP_OFFSITE``), byte for byte.

A copy moves the files *as stored* (``BackupRepository.storage`` on both sides: ciphertext and
its ``.age`` sidecars once the repository is encrypted), never decrypted. For one partition it
copies, in this order:

1. every file of the backup's directory ``<store>/<partition>/<backup_id>/...``;
2. for MinIO, the content-addressed blobs the offsite lacks (``objectstore/blobs``: missing,
   or of another size; the offsite is asked only about blobs written since its last complete
   sync, and listed in full weekly: ``_sync_blobs``);
3. ``verification.json``, then ``manifest.json`` LAST (the commit point: a partition exists
   offsite only once its manifest is there, exactly as in the primary);
4. the offsite record ``offsite/<store>/<partition>.json`` in the OFFSITE repository, once every
   file was checked where it landed (``copy_verified``): on S3, the server's ETag is the MD5
   it took of what it stored and must be that of the bytes sent; in a directory, or on a
   server whose ETags are not MD5s, the file is read back and its sha256 must be the
   primary's.

Idempotent and resumable: writes are atomic per key (a killed copy leaves no partial file
under a real name), and a re-run skips every file the offsite already holds with the same
size, after checking its sha256 against the primary's (a file corrupted offsite is found and
copied again: ``repaired``). The record holds counts, sizes, times and the sha256 of the
stored bytes of each file: no secrets, no data values.

Also here: how a restore picks its repository (``choose_repository``: primary, offsite or
auto) and the offsite's own retention (``apply_offsite_retention``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from rag_backup.errors import BackupNotFound, InvalidRequest, IntegrityError, RagBackupError
from rag_backup.pool import in_pool
from rag_backup.repository.backends import Backend, S3Backend, backend_from_url, describe_key
from rag_backup.repository.blobs import BLOB_PREFIX
from rag_backup.repository.locking import (
    DEFAULT_LOCK_MODE,
    LOCK_MARGIN,
    LockedS3Backend,
    LockedVersion,
    bucket_lock_enabled,
)
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.repository import (
    MANIFEST,
    VERIFICATION,
    BackupRecord,
    BackupRepository,
)
from rag_backup.repository.retention import RetentionCandidate, plan_retention
from rag_backup.repository.sealed import HEADER_SUFFIX, KEY_RECORD

RECORD_ROOT = "offsite"  # offsite/<store>/<partition>.json, in the offsite repository
RECORD_FORMAT = 1
CHUNK = 1024 * 1024
DEFAULT_WORKERS = 8
SIDECAR = HEADER_SUFFIX  # the encryption's header file beside an encrypted file
# The primary's retention per store; the offsite keeps each backup twice as long by default.
PRIMARY_RETENTION = {"postgres": timedelta(days=30), "milvus": timedelta(days=7),
                     "minio": timedelta(days=14), "redis": timedelta(days=1)}
REPOSITORY_CHOICES = ("primary", "offsite", "auto")

log = logging.getLogger(__name__)
T = TypeVar("T")
_COUNTING = threading.Lock()  # the copy's workers add to one report


def offsite_window(store: str, days: float | None = None) -> timedelta:
    """How long the offsite keeps a backup of ``store``: ``days`` (RAG_OFFSITE_RETENTION_DAYS)
    when set, else twice the primary's window."""
    if days:
        return timedelta(days=days)
    return 2 * PRIMARY_RETENTION.get(store, timedelta(days=30))


def record_key(store: str, partition_key: str) -> str:
    return f"{RECORD_ROOT}/{store}/{partition_key}.json"


# -- opening the offsite repository ---------------------------------------------------------

def open_offsite(url: str, *, s3_endpoint: str | None = None, s3_access_key: str | None = None,
                 s3_secret_key: str | None = None, s3_region: str = "us-east-1",
                 lock_mode: str = DEFAULT_LOCK_MODE, retention_days: float | None = None,
                 crypto: Any = None) -> BackupRepository:
    """The offsite repository at ``url``. An S3 bucket with Object Lock enabled gets a
    ``LockedS3Backend``: every object it writes is locked for its store's offsite window plus a
    margin. ``crypto``: the primary's (the offsite holds the same ciphertext)."""
    backend = backend_from_url(url, s3_endpoint=s3_endpoint, s3_access_key=s3_access_key,
                               s3_secret_key=s3_secret_key, s3_region=s3_region)
    if isinstance(backend, S3Backend) and bucket_lock_enabled(backend.client, backend.bucket):
        def retain_until(key: str) -> datetime:
            store, _ = describe_key(key.removeprefix(f"{RECORD_ROOT}/"))
            return utcnow() + offsite_window(store or "postgres", retention_days) + LOCK_MARGIN

        backend = LockedS3Backend(backend.client, backend.bucket, backend.prefix,
                                  mode=lock_mode, retain_until=retain_until)
    return BackupRepository(backend, crypto) if crypto is not None else BackupRepository(backend)


def is_locked(repo: BackupRepository) -> bool:
    return isinstance(repo.storage, LockedS3Backend)


# -- the record ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OffsiteRecord:
    """A partition's backup copied offsite and verified there (no secrets, no data values)."""

    store: str
    partition_key: str
    backup_id: str
    copied_at: str  # ISO time the copy was verified
    primary: str  # where it came from (a path or s3:// URL, never credentials)
    files: int
    bytes: int
    sha256: dict[str, str]  # stored bytes, per file key (relative to the repository root)
    blobs_copied: int = 0
    blob_bytes_copied: int = 0
    locked_until: str | None = None  # Object Lock: when the newest version may be deleted
    format_version: int = RECORD_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> OffsiteRecord:
        doc = json.loads(raw)
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


def read_record(offsite: BackupRepository, store: str, partition_key: str
                ) -> OffsiteRecord | None:
    raw = offsite.storage.read_bytes(record_key(store, partition_key))
    if raw is None:
        return None
    try:
        return OffsiteRecord.from_json(raw)
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: the partition counts as not (verifiably) offsite


def offsite_records(offsite: BackupRepository, store: str) -> dict[str, OffsiteRecord]:
    """Every partition of ``store`` copied offsite and verified, by partition key."""
    found = {}
    for info in offsite.storage.list_files(f"{RECORD_ROOT}/{store}"):
        name = info.key.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            record = read_record(offsite, store, name[:-len(".json")])
            if record is not None:
                found[record.partition_key] = record
    return found


# -- copying ------------------------------------------------------------------------------

@dataclass
class CopyReport:
    """What one copy did."""

    store: str
    partition_key: str
    backup_id: str
    files_copied: int = 0
    bytes_copied: int = 0
    files_skipped: int = 0
    bytes_skipped: int = 0
    files_repaired: int = 0  # found offsite with other bytes than the primary's: copied again
    blobs_copied: int = 0
    blob_bytes_copied: int = 0
    blobs_skipped: int = 0
    verified_files: int = 0
    duration_s: float = 0.0
    locked: bool = False
    repaired: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items()
                if isinstance(v, int) and not isinstance(v, bool)}


def _hash_stream(backend: Backend, key: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with backend.open_read(key) as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def copy_file(source: Backend, target: Backend, key: str) -> tuple[str, int, bool]:
    """Stream ``key`` from ``source`` to ``target`` (atomic on the target) in chunks; the
    sha256 and size of what was copied, and whether the target confirmed it stored exactly
    those bytes (an S3 target's ETag is the MD5 it took of them; False: not confirmed)."""
    digest, size = hashlib.sha256(), 0
    with source.open_read(key) as reader, target.open_write(key) as writer:
        track = getattr(writer, "track_md5", None)  # an S3 upload: MD5s of what is sent
        if track is not None:
            track()
        for chunk in iter(lambda: reader.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
    confirms = getattr(writer, "etag_confirms", None)
    return digest.hexdigest(), size, bool(confirms is not None and confirms())


def copy_verified(source: Backend, target: Backend, key: str, what: str = "offsite copy"
                  ) -> tuple[str, int]:
    """``copy_file``, then the copy checked where it landed: by the S3 server's ETag when it
    is the MD5 of the bytes sent (the server hashed what it stored: no second download, as
    ``rclone`` checks), else by reading it back and comparing sha256 (a directory, or a server
    whose ETags are not MD5s). ``IntegrityError`` when the copy differs."""
    expected, size, confirmed = copy_file(source, target, key)
    if not confirmed:
        try:
            found, _ = _hash_stream(target, key)
        except IntegrityError as exc:  # the server's own checksum of the object disagrees
            raise IntegrityError(f"{what} {target.location(key)} is not what was sent: {exc}; "
                                 "nothing was recorded as copied") from exc
        if found != expected:
            raise IntegrityError(f"{what} {target.location(key)} reads back with sha256 "
                                 f"{found}, the primary's is {expected}: the offsite storage "
                                 "corrupts data; nothing was recorded as copied")
    return expected, size


def _parallel(work: Callable[[T], Any], items: Iterable[T], workers: int) -> list[Any]:
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(in_pool(pool, work, items))


def _sync_file(primary: Backend, offsite: Backend, key: str, size: int,
               present: dict[str, int], report: CopyReport, sums: dict[str, str]) -> None:
    """Make offsite ``key`` hold the primary's bytes, verified (``copy_verified``)."""
    if present.get(key) == size:
        expected, _ = _hash_stream(primary, key)
        try:
            found, _ = _hash_stream(offsite, key)
        except IntegrityError as exc:  # S3's own checksum of it fails: damaged there
            found = f"unreadable ({exc})"
        if found == expected:
            with _COUNTING:
                report.files_skipped += 1
                report.bytes_skipped += size
                sums[key] = expected
            return
        with _COUNTING:
            report.files_repaired += 1
            report.repaired.append(key)
        log.warning(f"offsite {offsite.location(key)}: sha256 {found} is not the primary's "
                    f"{expected}: copying it again")
    expected, copied = copy_verified(primary, offsite, key)
    with _COUNTING:
        report.files_copied += 1
        report.bytes_copied += copied
        sums[key] = expected


BLOB_SYNC_KEY = f"{RECORD_ROOT}/blob-sync.json"  # in the offsite: what the last sync covered
BLOB_SYNC_SKEW = timedelta(hours=1)  # mtimes this much before it are still checked (clocks)
FULL_BLOB_LISTING_EVERY = timedelta(days=7)
HEAD_AT_MOST = 1000  # more candidates than this: one listing of the offsite is cheaper


def _blob_sync_since(offsite: Backend, primary_location: str, now: datetime
                     ) -> tuple[datetime, datetime] | None:
    """When the last complete blob sync from this primary listed it, and when the offsite was
    last listed in full, if recent enough to trust (``FULL_BLOB_LISTING_EVERY``): every
    primary blob older than the first was offsite then. ``None``: list the offsite in full."""
    raw = offsite.read_bytes(BLOB_SYNC_KEY)
    try:
        doc = json.loads(raw) if raw is not None else None
        if not doc or doc.get("primary") != primary_location:
            return None
        listed = datetime.fromisoformat(doc["listed_at"])
        full = datetime.fromisoformat(doc["full_listing_at"])
    except (ValueError, TypeError, KeyError):
        return None
    if now - full > FULL_BLOB_LISTING_EVERY or listed > now:
        return None
    return listed, full


def _sync_blobs(primary: Backend, offsite: Backend, report: CopyReport, workers: int,
                primary_location: str) -> None:
    """Copy the blobs (and ``.age`` sidecars) the offsite lacks or holds with another size;
    each copied one verified (``copy_verified``).

    Which ones the offsite lacks: after a complete sync, every blob the primary held when it
    was listed is offsite (blobs are never changed in place, and the offsite's are never
    collected), so the next sync asks the offsite only about primary blobs written since
    (mtime after that listing, less ``BLOB_SYNC_SKEW``): one HEAD each, in parallel, instead of
    listing every blob offsite each night. The offsite is listed in full when there is no such
    record, it came from another primary, it is older than ``FULL_BLOB_LISTING_EVERY`` (which
    also catches blobs removed offsite by hand), or more than ``HEAD_AT_MOST`` blobs are new."""
    listed_at = utcnow()
    last = _blob_sync_since(offsite, primary_location, listed_at)
    mine = list(primary.list_files(BLOB_PREFIX))
    candidates = mine if last is None else [
        f for f in mine if f.mtime >= last[0] - BLOB_SYNC_SKEW]
    full = last is None or len(candidates) > HEAD_AT_MOST
    if full:
        theirs = {f.key: f.size for f in offsite.list_files(BLOB_PREFIX)}
    else:
        keys = [f.key for f in candidates]
        theirs = dict(zip(keys, _parallel(offsite.size, keys, workers)))
    todo = [f for f in candidates if theirs.get(f.key) != f.size]
    report.blobs_skipped += len(mine) - len(todo)

    def one(info) -> int:
        return copy_verified(primary, offsite, info.key, "offsite blob")[1]

    sizes = _parallel(one, todo, workers)
    report.blobs_copied += len(sizes)
    report.blob_bytes_copied += sum(sizes)
    offsite.write_bytes(BLOB_SYNC_KEY, json.dumps({
        "primary": primary_location, "listed_at": listed_at.isoformat(),
        "full_listing_at": (listed_at if full else last[1]).isoformat(),
        "blobs": len(mine), "checked": len(candidates), "copied": len(todo),
        "offsite_listed": full}, indent=2, sort_keys=True).encode())
    log.info(f"offsite blobs: {len(mine)} in the primary; " + (
        "the offsite listed in full" if full else
        f"{len(candidates)} written since the last sync ({last[0]:%Y-%m-%d %H:%M} UTC) checked "
        "offsite") + f"; {len(todo)} copied")


def copy_backup(primary: BackupRepository, offsite: BackupRepository, store: str,
                partition_key: str, *, workers: int = DEFAULT_WORKERS,
                require_verified: bool = True, log_line: Callable[[str], None] = log.info
                ) -> CopyReport:
    """Copy the committed backup of ``store`` ``partition_key`` from ``primary`` to
    ``offsite`` (what is missing; every file checked by sha256), commit it there (manifest
    last) and write the offsite record. ``BackupNotFound`` if the primary has no such (verified)
    backup."""
    import time

    started = time.monotonic()
    record = primary.get(store, partition_key)
    if record is None:
        raise BackupNotFound(f"{store}: no committed backup for partition {partition_key} in "
                             f"the primary repository {primary.root_location} to copy offsite")
    if require_verified and not record.verified:
        raise BackupNotFound(f"{store} backup {partition_key} ({record.backup_id}) is not "
                             f"verified: materialize {store}_backup_verified first; only "
                             "verified backups are copied offsite")
    src, dst = primary.storage, offsite.storage
    part = f"{store}/{partition_key}"
    report = CopyReport(store, partition_key, record.backup_id, locked=is_locked(offsite))
    files = {f.key: f.size for f in src.list_files(f"{part}/{record.backup_id}")}
    present = {f.key: f.size for f in dst.list_files(f"{part}/{record.backup_id}")}
    sums: dict[str, str] = {}
    # the sidecars first: a file never appears offsite before what decrypts it
    ordered = sorted(files, key=lambda k: (not k.endswith(SIDECAR), k))
    _parallel(lambda k: _sync_file(src, dst, k, files[k], present, report, sums), ordered,
              workers)
    if store == "minio":
        _sync_blobs(src, dst, report, workers, primary.root_location)
    # the records last, the manifest (and its sidecar before it) at the very end; the key
    # record (public keys, since when) before it, so the offsite refuses a clear manifest of
    # an encrypted backup as the primary does
    records = [KEY_RECORD, f"{part}/{VERIFICATION}{SIDECAR}", f"{part}/{VERIFICATION}",
               f"{part}/{MANIFEST}{SIDECAR}", f"{part}/{MANIFEST}"]
    for key in records:
        if not src.exists(key):
            continue
        _sync_file(src, dst, key, -1, {}, report, sums)
    report.verified_files = len(sums)
    if report.files_repaired:
        log_line(f"{store} {partition_key}: {report.files_repaired} offsite file(s) differed "
                 f"from the primary and were copied again: {', '.join(report.repaired[:5])}")
    locked_until = None
    if isinstance(dst, LockedS3Backend):
        locked_until = dst.lock_arguments(f"{part}/{MANIFEST}")[
            "ObjectLockRetainUntilDate"].isoformat()
    _drop_replaced(offsite, store, partition_key, record.backup_id)
    dst.write_bytes(record_key(store, partition_key), OffsiteRecord(
        store, partition_key, record.backup_id, utcnow().isoformat(), primary.root_location,
        len(sums), sum(files.values()), dict(sorted(sums.items())), report.blobs_copied,
        report.blob_bytes_copied, locked_until).to_json())
    report.duration_s = time.monotonic() - started
    log_line(f"{store} {partition_key}: backup {record.backup_id} offsite at "
             f"{offsite.root_location}: {report.files_copied} file(s) copied "
             f"({report.bytes_copied} bytes), {report.files_skipped} already there, "
             f"{report.blobs_copied} blob(s) copied, {report.blobs_skipped} already there; "
             f"{report.verified_files} file(s) verified by sha256")
    return report


def _drop_replaced(offsite: BackupRepository, store: str, partition_key: str,
                   backup_id: str) -> None:
    """Remove offsite backup directories of the partition other than ``backup_id`` (the
    primary re-ran the partition). On a locked bucket this only adds delete markers: the
    locked versions stay until offsite retention removes them past their date."""
    part = f"{store}/{partition_key}"
    for child in offsite.storage.list_children(part):
        if child != backup_id and "." not in child:
            offsite.storage.delete_prefix(f"{part}/{child}")


def not_offsite(primary: BackupRepository, offsite: BackupRepository, store: str
                ) -> list[BackupRecord]:
    """The primary's verified backups of ``store`` whose backup is not (verifiably) offsite,
    oldest first."""
    copied = offsite_records(offsite, store)
    return [r for r in primary.scan(store).backups
            if r.verified and (copied.get(r.partition_key) is None
                               or copied[r.partition_key].backup_id != r.backup_id)]


# -- offsite retention ---------------------------------------------------------------------

@dataclass(frozen=True)
class OffsiteDecision:
    partition_key: str
    backup_id: str
    delete: bool
    reason: str
    deleted: bool = False  # actually removed (False when refused by the lock or dry run)
    locked_until: datetime | None = None


def apply_offsite_retention(offsite: BackupRepository, store: str, *, now: datetime,
                            window: timedelta, dry_run: bool = False
                            ) -> list[OffsiteDecision]:
    """Delete the offsite backups of ``store`` past ``window`` (counted from the start of
    their partition), never the newest verified one. On an Object-Lock bucket a backup is
    removed version by version, only once every version's lock has passed; one still locked
    is kept and reported (``locked_until``), never forced."""
    listing = offsite.scan(store)
    plan = plan_retention([RetentionCandidate(r.partition_key, r.backup_id,
                                              r.manifest.window.start, r.verified)
                           for r in listing.backups], now=now, window=window)
    out = []
    storage = offsite.storage
    for d in plan:
        if not d.delete or dry_run:
            out.append(OffsiteDecision(d.partition_key, d.backup_id, d.delete, d.reason))
            continue
        part = f"{store}/{d.partition_key}"
        if isinstance(storage, LockedS3Backend):
            deleted, locked, refused = storage.delete_versions(part)
            until = max((v.retain_until for v in locked if v.retain_until), default=None)
            if locked:
                out.append(OffsiteDecision(
                    d.partition_key, d.backup_id, True,
                    f"{d.reason}; {len(locked)} object version(s) are locked until "
                    f"{until:%Y-%m-%d %H:%M} UTC ({_mode(locked)}): kept, removed by a later "
                    f"run", False, until))
                continue
            if refused:
                out.append(OffsiteDecision(
                    d.partition_key, d.backup_id, True,
                    f"{d.reason}; the server refused {len(refused)} deletion(s), e.g. "
                    f"{refused[0]}: reported, retried by a later run", False))
                continue
            storage.delete_versions(record_key(store, d.partition_key))
        else:
            offsite.delete(store, d.partition_key, f"offsite retention: {d.reason}")
            storage.delete(record_key(store, d.partition_key))
        out.append(OffsiteDecision(d.partition_key, d.backup_id, True, d.reason, True))
    return out


def _mode(locked: list[LockedVersion]) -> str:
    return ", ".join(sorted({v.mode or "?" for v in locked}))


# -- which repository a restore reads ---------------------------------------------------------

@dataclass(frozen=True)
class RepositoryChoice:
    """The repository a restore reads, and why."""

    name: str  # "primary" | "offsite"
    repo: BackupRepository
    reason: str


def choose_repository(which: str, open_primary: Callable[[], BackupRepository],
                      open_offsite: Callable[[], BackupRepository | None],
                      has_backup: Callable[[BackupRepository], Any]) -> RepositoryChoice:
    """``primary`` or ``offsite`` as asked; ``auto``: the primary, unless it is unreachable or
    ``has_backup`` (e.g. resolving the asked backup) fails on it, then the offsite when
    ``has_backup`` succeeds there. An error when neither can serve: the primary's, with the
    offsite's added."""
    which = (which or "auto").strip().lower()
    if which not in REPOSITORY_CHOICES:
        raise InvalidRequest(f"repository {which!r}: choose one of {', '.join(REPOSITORY_CHOICES)}")
    if which == "primary":
        return RepositoryChoice("primary", open_primary(), "asked for the primary repository")
    if which == "offsite":
        repo = open_offsite()
        if repo is None:
            raise InvalidRequest("the offsite repository is not configured: set "
                                 "RAG_BACKUP_OFFSITE (and RAG_OFFSITE_S3_*)")
        return RepositoryChoice("offsite", repo, "asked for the offsite repository")
    try:
        primary = open_primary()
        has_backup(primary)
        return RepositoryChoice("primary", primary, "auto: the primary repository has it")
    except RagBackupError as exc:
        primary_error = exc
    try:
        offsite = open_offsite()
    except RagBackupError as exc:
        primary_error.add_note(f"the offsite repository cannot be opened either: {exc}")
        raise primary_error from None
    if offsite is None:
        raise primary_error
    try:
        has_backup(offsite)
    except RagBackupError as exc:
        primary_error.add_note(f"the offsite repository cannot serve it either: {exc}")
        raise primary_error from None
    return RepositoryChoice("offsite", offsite, f"auto: the primary repository cannot serve "
                            f"it ({type(primary_error).__name__}: {primary_error}); the "
                            "offsite copy has it")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
