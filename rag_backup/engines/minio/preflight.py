"""The pre-flight of a MinIO restore, which changes nothing.

Every restore starts with a pre-flight (``_preflight``): the snapshot is read to its end
against the manifest, objects already identical on the target are found by reading only (HEAD,
a GET when etags differ; their blobs are not needed), and every blob the restore will write is
checked by size and sha256 (each distinct blob once, streamed, in the worker pool). A missing
or damaged blob refuses the restore with ``IntegrityError`` naming the blobs and the keys that
need them, before any bucket is created or any object written, tagged or removed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rag_backup import progress
from rag_backup.engines.minio.client import _bucket_exists
from rag_backup.engines.minio.common import MAX_QUEUED, OBJECTS, STORE, Log
from rag_backup.engines.minio.objects import _list_bucket, _merge
from rag_backup.engines.minio.snapshot import ObjectEntry, read_snapshot
from rag_backup.errors import IntegrityError

if TYPE_CHECKING:
    from rag_backup.engines.minio.restore import _Restorer

PREFLIGHT_EXAMPLES = 10            # missing or damaged blobs a refused restore names (then a count)
PREFLIGHT_KEYS = 3                 # keys named per such blob


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
                progress.advance(1, unit=OBJECTS)  # ahead of its check by MAX_QUEUED at most
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
        future = self.pool.submit(self.restorer.repo.blobs.check, sha, entry.size)
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
        lines = [f"{self.restorer.repo.blobs.location(sha)}: {problem} (needed by "
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
