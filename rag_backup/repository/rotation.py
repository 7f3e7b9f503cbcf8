"""Key rotation: every encrypted file's key rewrapped for a new set of recipients, payloads
untouched.

An encrypted file ``K`` keeps its random file key wrapped to each recipient in its header
``K.age`` (``sealed.py``); a manifest keeps its sealed fingerprint as a small age file inside
it. Rotation reads each header, unwraps the file key with an identity that opens it, writes a
new header for the new recipients (same file key, new MAC) and leaves the payload as it is.
Each header names its keyset, so a rotation that was interrupted (killed, a store busy) is run
again and skips what is already rewrapped; a final pass verifies that every header is for the
new keyset, opens with the new identity when one is given, and no longer opens with a removed
one.

The key record (``keys/encryption.json``) is updated first: from then on writers encrypt to the
new recipients and a writer still configured with a removed key is refused, so nothing new is
written for a key being retired.
"""

from __future__ import annotations

import base64
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rag_backup.errors import InvalidRequest
from rag_backup.repository import crypto
from rag_backup.repository.backends import SHARED_AREAS, TMP_MARKER
from rag_backup.repository.crypto import Identity, IdentityError, Recipient
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.sealed import HEADER_SUFFIX, KeyRecord

SKIPPED_AREAS = frozenset({"leases", "keys", "offsite"})
NO_LEASE_AREAS = frozenset({"postgres_wal"})  # its receiver writes continuously; see below


@dataclass
class RotationReport:
    """What a rotation did and found (``ok`` when every encrypted file is for ``keyset``)."""

    keyset: str
    recipients: list[str]
    removed: list[str]
    files_rewrapped: int = 0
    files_already_rewrapped: int = 0
    manifests_rewrapped: int = 0
    backups_rewrapped: int = 0
    payload_bytes_not_rewritten: int = 0
    header_bytes_written: int = 0
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def plan_recipients(record: KeyRecord | None, configured: Sequence[Recipient],
                    add: Sequence[Recipient], remove: Sequence[Recipient]) -> list[Recipient]:
    """The recipients after rotation: the repository's (its key record, else the configured
    ones) plus ``add`` minus ``remove``; never empty."""
    current = ([Recipient.parse(r) for r in record.recipients] if record is not None
               else list(configured))
    if not current and not add:
        raise InvalidRequest("the repository is not encrypted and no recipient is added: "
                             "nothing to rotate")
    removed = {str(r) for r in remove}
    unknown = removed - {str(r) for r in current}
    if unknown:
        raise InvalidRequest(f"cannot remove {', '.join(sorted(unknown))}: not a recipient of "
                             f"the repository ({', '.join(map(str, current)) or 'none'})")
    target = {str(r): r for r in [*current, *add] if str(r) not in removed}
    if not target:
        raise InvalidRequest("the rotation would leave no recipient: add one")
    return [target[k] for k in sorted(target)]


def rotate(repo, *, add: Sequence[Recipient] = (), remove: Sequence[Recipient] = (),
           identities: Sequence[Identity], holder: str = "key rotation",
           log: Callable[[str], None] = print, every_s: float = 30.0) -> RotationReport:
    """Rewrap every encrypted file of ``repo`` (a ``BackupRepository``) for the recipients
    after adding ``add`` and removing ``remove``; then verify. ``identities`` must open the
    files (the current key); add the new one too to have the verification open every file
    with it."""
    started = time.monotonic()
    sealed, storage = repo.sealed, repo.storage
    record = sealed.key_record(fresh=True)
    target = plan_recipients(record, repo.crypto.recipients, add, remove)
    keyset = crypto.keyset_id(target)
    now = utcnow().isoformat()
    removed = [*(record.removed if record else []),
               *({"recipient": str(r), "removed_at": now} for r in remove)]
    sealed.write_key_record(KeyRecord([str(r) for r in target], keyset,
                                      record.since if record else now, removed))
    report = RotationReport(keyset, [str(r) for r in target], [str(r) for r in remove])
    log(f"rotating the keys of {storage.location('')} to {len(target)} recipient(s) "
        f"(keyset {keyset}); removing {', '.join(map(str, remove)) or 'none'}")
    last = [time.monotonic()]

    def tick(area: str) -> None:
        if time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            log(f"{area}: {report.files_rewrapped} file(s) rewrapped, "
                f"{report.files_already_rewrapped} already, "
                f"{crypto_bytes(report.payload_bytes_not_rewritten)} of payload left as is")

    for area in storage.list_children(""):
        if area in SKIPPED_AREAS:
            continue
        store = SHARED_AREAS.get(area, area)
        if area in NO_LEASE_AREAS:
            _rotate_area(repo, area, target, keyset, identities, report, tick)
        else:
            with repo.lease(store, holder, "a key rotation"):
                _rotate_area(repo, area, target, keyset, identities, report, tick)
    _verify(repo, keyset, [i for i in identities if str(i.recipient) in report.recipients],
            [i for i in identities if str(i.recipient) in report.removed], report)
    report.duration_s = round(time.monotonic() - started, 3)
    log(f"rotation {'done' if report.ok else 'INCOMPLETE'}: {report.files_rewrapped} file(s) "
        f"and {report.manifests_rewrapped} manifest(s) rewrapped in "
        f"{report.backups_rewrapped} backup(s), {report.files_already_rewrapped} already, "
        f"{crypto_bytes(report.payload_bytes_not_rewritten)} of payload not rewritten"
        + (f"; {len(report.problems)} problem(s): {report.problems[0]}" if report.problems
           else ""))
    return report


def crypto_bytes(n: int) -> str:
    from rag_backup.progress import format_bytes

    return format_bytes(n)


def _backup_of(key: str) -> str | None:
    """``<store>/<partition>`` of a key inside a backup, else ``None`` (blobs, WAL)."""
    parts = key.split("/")
    return "/".join(parts[:2]) if len(parts) >= 3 and parts[0] not in SHARED_AREAS \
        and parts[0] != "postgres_wal" else None


def _rotate_area(repo, area: str, target: Sequence[Recipient], keyset: str,
                 identities: Sequence[Identity], report: RotationReport,
                 tick: Callable[[str], None]) -> None:
    storage = repo.storage
    sizes: deque[tuple[str, int]] = deque(maxlen=64)  # payloads just listed (before headers)
    backups: set[str] = set()
    for info in storage.list_files(area):
        name = info.key.rsplit("/", 1)[-1]
        if TMP_MARKER in name:
            continue
        if name == "manifest.json":
            if _rotate_manifest(storage, info.key, target, keyset, identities, report):
                backups.add(_backup_of(info.key) or info.key)
            continue
        if not name.endswith(HEADER_SUFFIX):
            sizes.append((info.key, info.size))
            continue
        payload_key = info.key[:-len(HEADER_SUFFIX)]
        payload = next((size for key, size in sizes if key == payload_key), None)
        if payload is None:  # an orphan header (its write died before the payload)
            continue
        header = storage.read_bytes(info.key)
        if header is None:
            continue
        where = storage.location(info.key)
        if crypto.parse_header(header, where).keyset == keyset:
            report.files_already_rewrapped += 1
            continue
        new = crypto.rewrap(header, identities, target, where)
        storage.write_bytes(info.key, new)
        report.files_rewrapped += 1
        report.header_bytes_written += len(new)
        report.payload_bytes_not_rewritten += payload
        owner = _backup_of(info.key)
        if owner:
            backups.add(owner)
        tick(area)
    report.backups_rewrapped += len(backups)


def _rotate_manifest(storage, key: str, target: Sequence[Recipient], keyset: str,
                     identities: Sequence[Identity], report: RotationReport) -> bool:
    raw = storage.read_bytes(key)
    if raw is None:
        return False
    try:
        doc = json.loads(raw)
    except ValueError:
        report.problems.append(f"{storage.location(key)}: unreadable manifest, not rewrapped")
        return False
    if not doc.get("sealed"):
        return False
    if (doc.get("encryption") or {}).get("keyset") == keyset:
        report.files_already_rewrapped += 1
        return False
    where = f"the sealed part of {storage.location(key)}"
    header, payload = crypto.split_age(base64.b64decode(doc["sealed"]), where)
    new_header = crypto.rewrap(header, identities, target, where)
    doc["sealed"] = base64.b64encode(new_header + payload).decode()
    doc["encryption"] = {**(doc.get("encryption") or {}), "keyset": keyset}
    data = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode()
    storage.write_bytes(key, data)
    report.manifests_rewrapped += 1
    report.header_bytes_written += len(new_header)
    return True


def _verify(repo, keyset: str, new: Sequence[Identity], old: Sequence[Identity],
            report: RotationReport) -> None:
    """Every header is for ``keyset``; opens with ``new`` (if given); not with ``old``."""
    storage = repo.storage
    for info in storage.list_files(""):
        name = info.key.rsplit("/", 1)[-1]
        if TMP_MARKER in name or info.key.split("/", 1)[0] in SKIPPED_AREAS:
            continue
        if name.endswith(HEADER_SUFFIX):
            header = storage.read_bytes(info.key)
        elif name == "manifest.json":
            doc = json.loads(storage.read_bytes(info.key) or b"{}")
            if not doc.get("sealed"):
                continue
            header = crypto.split_age(base64.b64decode(doc["sealed"]), info.key)[0]
        else:
            continue
        if header is None:
            continue
        where = storage.location(info.key)
        report.files_checked += 1
        parsed = crypto.parse_header(header, where)
        if parsed.keyset != keyset:
            report.problems.append(f"{where} is still for keyset {parsed.keyset} (written "
                                   "during the rotation? run it again)")
            continue
        if new:
            try:
                parsed.file_key(new, where)
            except IdentityError as exc:
                report.problems.append(str(exc))
        for identity in old:
            if any(identity.unwrap(s) is not None for s in parsed.stanzas):
                report.problems.append(f"{where} still opens with the removed key "
                                       f"{identity.recipient}")
        if len(report.problems) > 100:
            report.problems.append("... (stopped listing problems after 100)")
            return


__all__ = ["RotationReport", "plan_recipients", "rotate"]
