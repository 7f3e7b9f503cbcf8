"""The repository's encryption layer: a backend that encrypts what it writes and decrypts what
it reads, under every store (artifacts, blobs, WAL segments, history files: every file but the
records listed in ``is_clear``).

Layout of an encrypted file ``K`` (any backend)::

    K.age   its age header: the file's random key wrapped to each recipient, and a MAC
    K       its age payload: a nonce, then ChaCha20-Poly1305 chunks of 64 KiB

The header is written first and the payload second (each atomically): a payload is never
visible without its header, and a key rotation rewrites headers only. ``cat K.age K`` is a
standard age file (``age -d -i key.txt``). A file without a header is read as stored: backups
written before encryption was turned on stay readable; their manifests' sha256 (and a blob's
name) still check every byte.

What stays in clear: manifests (their fingerprint, which holds the stores' names and counts,
is sealed inside them; see ``seal_manifest``), verification records, tombstones, in-progress
markers, leases, the WAL archive's segment records, status and cluster records, the key
record, offsite records. None holds a data value. Sizes and names stay visible: a blob's name is
the sha256 of its plaintext (that is what deduplicates it), so whoever can read the repository
and holds a candidate file can tell whether that exact content is backed up.

The key record ``keys/encryption.json`` (clear, public keys only) names the recipients
writers encrypt to, since when, and the recipients removed by rotation (a writer configured
with a removed key is refused).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from rag_backup.errors import DamagedBackup, InvalidRequest
from rag_backup.repository import crypto
from rag_backup.repository.backends import Backend, FileInfo
from rag_backup.repository.crypto import (
    DecryptingReader,
    DecryptionError,
    EncryptingWriter,
    Identity,
    IdentityError,
    Recipient,
)
from rag_backup.repository.manifest import Manifest, utcnow

HEADER_SUFFIX = ".age"
KEY_RECORD = "keys/encryption.json"
CLEAR_NAMES = frozenset({"manifest.json", "verification.json", "tombstone.json",
                         "offsite.json"})
CLEAR_AREAS = frozenset({"leases", "keys", "offsite"})
ENV_RECIPIENTS = "RAG_BACKUP_ENCRYPT_TO"
ENV_IDENTITY = "RAG_BACKUP_IDENTITY"
FILE_KEY_CACHE = 20_000  # headers whose file key is kept (about 300 bytes each)

log = logging.getLogger(__name__)


def is_clear(key: str) -> bool:
    """Whether ``key`` is stored in clear (a record with no data value), not encrypted."""
    name = key.rsplit("/", 1)[-1]
    return (name in CLEAR_NAMES or name.endswith(".pending.json")
            or key.split("/", 1)[0] in CLEAR_AREAS
            or (key.startswith("postgres_wal/") and name.endswith(".json")))


def header_key(key: str) -> str:
    return key + HEADER_SUFFIX


@dataclass
class Crypto:
    """Who files are encrypted to and who may decrypt them (from the environment)."""

    recipients: list[Recipient] = field(default_factory=list)
    identities: list[Identity] = field(default_factory=list, repr=False)

    @property
    def keyset(self) -> str | None:
        return crypto.keyset_id(self.recipients) if self.recipients else None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Crypto | None:
        """``RAG_BACKUP_ENCRYPT_TO`` (public keys, or the path of a file of them) and
        ``RAG_BACKUP_IDENTITY`` (secret keys, or the path of an age identity file); ``None``
        when neither is set."""
        env = os.environ if environ is None else environ
        to = env.get(ENV_RECIPIENTS, "").strip()
        ident = env.get(ENV_IDENTITY, "").strip()
        if not to and not ident:
            return None
        recipients = crypto.parse_recipients(_text_or_file(to, ENV_RECIPIENTS)) if to else []
        identities = crypto.parse_identities(_text_or_file(ident, ENV_IDENTITY)) if ident else []
        if ident and not identities:
            raise IdentityError(f"{ENV_IDENTITY} holds no age secret key")
        return cls(recipients, identities)


def _text_or_file(value: str, name: str) -> str:
    if value.startswith(("age1", "AGE-SECRET-KEY-")):
        return value
    path = Path(value)
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidRequest(f"{name} is neither an age key nor a readable file: {path}: "
                             f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class KeyRecord:
    """``keys/encryption.json``: what writers encrypt to (public keys only)."""

    recipients: list[str]
    keyset: str
    since: str
    removed: list[dict[str, str]] = field(default_factory=list)
    format: str = "age-v1, header in <file>.age"

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> KeyRecord:
        try:
            doc = json.loads(data)
            return cls(list(doc["recipients"]), str(doc["keyset"]), str(doc["since"]),
                       list(doc.get("removed") or []), str(doc.get("format") or ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise DamagedBackup(f"key record {where} is unreadable: {exc}", file=where,
                                error=str(exc)) from exc

    @property
    def since_time(self) -> datetime:
        return datetime.fromisoformat(self.since)


class _EncryptingStream:
    def __init__(self, writer: EncryptingWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> int:
        return self._writer.write(data)

    def flush(self) -> None:
        pass


class SealedBackend:
    """A ``Backend`` that encrypts (to ``crypto.recipients``) every file ``is_clear`` does not
    exempt, and decrypts on reading (with ``crypto.identities``)."""

    def __init__(self, inner: Backend, keys: Crypto) -> None:
        self.inner, self.keys = inner, keys
        self._record: KeyRecord | None = None
        self._record_checked = False
        self._file_keys: dict[bytes, bytes] = {}  # header -> its (MAC-checked) file key

    def __getattr__(self, name: str) -> Any:  # bucket, client, root, endpoint, ...
        return getattr(self.inner, name)

    # -- the key record ---------------------------------------------------------------------
    def key_record(self, *, fresh: bool = False) -> KeyRecord | None:
        if fresh or not self._record_checked:
            raw = self.inner.read_bytes(KEY_RECORD)
            self._record = (KeyRecord.from_json(raw, self.inner.location(KEY_RECORD))
                            if raw is not None else None)
            self._record_checked = True
        return self._record

    def write_key_record(self, record: KeyRecord) -> None:
        self.inner.write_bytes(KEY_RECORD, record.to_json())
        self._record, self._record_checked = record, True

    def encrypting_to(self) -> list[Recipient] | None:
        """The recipients new files are encrypted to, or ``None`` when the repository is not
        encrypted (no recipients configured, no key record)."""
        if not self.keys.recipients and self.key_record() is None:
            return None
        return self.writing_recipients()

    def writing_recipients(self) -> list[Recipient]:
        """The recipients new files are encrypted to: ``RAG_BACKUP_ENCRYPT_TO``, else the key
        record's (a restore host that has only the identity). Refused when one of them was
        removed by a rotation; the key record follows the configured set."""
        record = self.key_record()
        if not self.keys.recipients:
            if record is None:
                raise IdentityError(
                    f"cannot write encrypted files to {self.inner.location('')}: set "
                    f"{ENV_RECIPIENTS} (the age public keys backups are encrypted to)")
            return [Recipient.parse(r) for r in record.recipients]
        removed = {r["recipient"]: r.get("removed_at", "") for r in (record.removed
                                                                     if record else [])}
        stale = [str(r) for r in self.keys.recipients if str(r) in removed]
        if stale:
            raise IdentityError(
                f"{ENV_RECIPIENTS} lists {', '.join(stale)}, removed from "
                f"{self.inner.location('')} by a key rotation on "
                f"{removed[stale[0]] or 'an earlier date'}; set it to the repository's "
                f"current recipients ({', '.join(record.recipients) if record else '?'})")
        keyset = self.keys.keyset
        if record is None or record.keyset != keyset:
            if record is not None:
                log.warning(f"{ENV_RECIPIENTS} differs from the recipients recorded in "
                            f"{self.inner.location(KEY_RECORD)}: new files are encrypted to "
                            f"{', '.join(map(str, self.keys.recipients))}; files written "
                            "before stay readable by their keys until `rag-backup keys "
                            "rotate` rewraps them")
            self.write_key_record(KeyRecord(
                sorted(str(r) for r in self.keys.recipients), keyset or "",
                record.since if record else utcnow().isoformat(),
                record.removed if record else []))
        return list(self.keys.recipients)

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, key: str, *, sync: bool = True) -> Iterator[BinaryIO]:
        if is_clear(key):
            with self.inner.open_write(key, sync=sync) as fh:
                yield fh
            return
        recipients = self.encrypting_to()
        if recipients is None:
            with self.inner.open_write(key, sync=sync) as fh:
                yield fh
            return
        file_key = crypto.new_file_key()
        self.inner.write_bytes(header_key(key), crypto.build_header(file_key, recipients),
                               sync=sync)
        with self.inner.open_write(key, sync=sync) as fh:
            writer = EncryptingWriter(fh, file_key)
            yield _EncryptingStream(writer)  # type: ignore[misc]
            writer.close()

    def write_bytes(self, key: str, data: bytes, *, sync: bool = True) -> None:
        if is_clear(key):
            self.inner.write_bytes(key, data, sync=sync)
            return
        with self.open_write(key, sync=sync) as fh:
            fh.write(data)

    def sync_pending(self) -> None:
        self.inner.sync_pending()

    def put_if(self, key: str, data: bytes, expected: bytes | None) -> bool:
        if not is_clear(key):
            raise InvalidRequest(f"conditional writes are for clear records, not {key}")
        return self.inner.put_if(key, data, expected)

    def delete_if(self, key: str, expected: bytes) -> bool:
        return self.inner.delete_if(key, expected)

    def rename(self, source: str, target: str) -> None:
        if not is_clear(source):
            header = self.inner.read_bytes(header_key(source))
            if header is not None:
                self.inner.write_bytes(header_key(target), header)
                self.inner.rename(source, target)
                self.inner.delete(header_key(source))
                return
        self.inner.rename(source, target)

    # -- reading ----------------------------------------------------------------------------
    def header(self, key: str) -> bytes | None:
        """``key``'s age header, ``None`` when it is stored in clear. A repository without a
        key record has never held an encrypted file: nothing to look up."""
        if is_clear(key) or (not self.keys.recipients and not self.keys.identities
                             and self.key_record() is None):
            return None
        return self.inner.read_bytes(header_key(key))

    def open_read(self, key: str) -> BinaryIO:
        header = self.header(key)
        if header is None:
            return self.inner.open_read(key)
        where = self.inner.location(key)
        file_key = self._file_keys.get(header)
        if file_key is None:  # unwrapping costs an X25519 exchange: a blob read twice (checked,
            # then restored) unwraps once
            file_key = crypto.parse_header(header, self.inner.location(header_key(key))
                                           ).file_key(self.keys.identities, where)
            if len(self._file_keys) >= FILE_KEY_CACHE:
                self._file_keys.pop(next(iter(self._file_keys)))
            self._file_keys[header] = file_key
        stream = self.inner.open_read(key)
        try:
            return DecryptingReader(stream, file_key, where)  # type: ignore[return-value]
        except BaseException:
            stream.close()
            raise

    def read_bytes(self, key: str) -> bytes | None:
        if is_clear(key):
            return self.inner.read_bytes(key)
        try:
            with self.open_read(key) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def location(self, key: str) -> str:
        return self.inner.location(key)

    def local_path(self, key: str) -> Path | None:
        """The file itself, when it is stored in clear on a local filesystem; else ``None``."""
        local = getattr(self.inner, "local_path", None)
        if local is None or self.header(key) is not None:
            return None
        return local(key)

    # -- listing and deleting ---------------------------------------------------------------
    def list_children(self, prefix: str) -> list[str]:
        return [n for n in self.inner.list_children(prefix) if not n.endswith(HEADER_SUFFIX)]

    def list_files(self, prefix: str, *, include_temporary: bool = False
                   ) -> Iterator[FileInfo]:
        """As the inner backend lists them, headers left out; an encrypted file's size is
        its plaintext's."""
        waiting: deque[FileInfo] = deque()
        encrypted: set[str] = set()

        def release(before: str | None) -> Iterator[FileInfo]:
            while waiting and (before is None or waiting[0].key + HEADER_SUFFIX < before):
                info = waiting.popleft()
                if info.key in encrypted:
                    encrypted.discard(info.key)
                    info = replace(info, size=crypto.plain_size(info.size))
                yield info

        for info in self.inner.list_files(prefix, include_temporary=include_temporary):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(HEADER_SUFFIX):
                encrypted.add(info.key[:-len(HEADER_SUFFIX)])
                continue
            if HEADER_SUFFIX + ".tmp-" in name:  # a header being written
                if include_temporary:
                    yield info
                continue
            yield from release(info.key)
            waiting.append(info)
        yield from release(None)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        if not is_clear(key):
            self.inner.delete(header_key(key))

    def delete_many(self, keys: Iterable[str]) -> None:
        def both() -> Iterator[str]:
            for key in keys:
                yield key
                if not is_clear(key) and ".tmp-" not in key.rsplit("/", 1)[-1]:
                    yield header_key(key)
        self.inner.delete_many(both())

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def list_incomplete_uploads(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.inner.list_incomplete_uploads(prefix)

    def abort_incomplete_upload(self, upload: Any) -> None:
        self.inner.abort_incomplete_upload(upload)


# -- manifests -----------------------------------------------------------------------------------
def seal_manifest(manifest: Manifest, recipients: Sequence[Recipient]) -> Manifest:
    """The manifest as stored in an encrypted repository: its fingerprint (names and counts of
    the store's contents) encrypted into ``sealed``, with the sha256 of every clear field, so a
    reader with the identity refuses a manifest whose clear fields were changed."""
    secret = json.dumps({"fingerprint": manifest.fingerprint,
                         "manifest_sha256": clear_digest(manifest)},
                        sort_keys=True, ensure_ascii=False).encode()
    return replace(manifest, fingerprint={},
                   encryption={"format": "age", "keyset": crypto.keyset_id(recipients)},
                   sealed=base64.b64encode(crypto.encrypt_bytes(secret, recipients)).decode())


def clear_digest(manifest: Manifest) -> str:
    """The sha256 of a manifest's clear fields: all but the fingerprint, the sealed part and
    the keyset it is sealed for (a key rotation changes that one)."""
    clear = replace(manifest, fingerprint={}, sealed=None, encryption=None)
    return hashlib.sha256(clear.to_json()).hexdigest()


def unseal_manifest(manifest: Manifest, identities: Sequence[Identity], where: str) -> Manifest:
    """The manifest with its fingerprint; ``DamagedBackup`` when its clear fields or its sealed
    part were changed; ``IdentityError`` without a matching identity."""
    if manifest.sealed is None:
        return manifest
    try:
        sealed = base64.b64decode(manifest.sealed, validate=True)
        doc = json.loads(crypto.decrypt_bytes(sealed, identities, f"the sealed part of {where}"))
        fingerprint, digest = doc["fingerprint"], doc["manifest_sha256"]
    except IdentityError:
        raise
    except (DecryptionError, ValueError, KeyError, TypeError) as exc:
        error = f"its sealed part is invalid ({exc}): tampered or corrupt"
        raise DamagedBackup(f"manifest {where}: {error}", file=where, error=error) from exc
    if clear_digest(manifest) != digest:
        error = ("its clear fields do not match the digest sealed in it: modified after the "
                 "backup wrote it (tampered)")
        raise DamagedBackup(f"manifest {where}: {error}", file=where, error=error)
    return replace(manifest, fingerprint=dict(fingerprint))
