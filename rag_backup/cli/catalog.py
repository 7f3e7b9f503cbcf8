"""``list``, ``show``, ``verify`` and ``backup``: the repository's backups, read and written by
the same code as the assets (listing, verification records, the commit protocol), each
writer holding the store's lease."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import click

from rag_backup.cli import environment, output
from rag_backup.cli.stores import STORES
from rag_backup.errors import BackupNotFound, InvalidRequest
from rag_backup.repository import (
    LATEST,
    BackupRecord,
    BackupRepository,
    DamagedRecord,
    Verification,
)
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.crypto import IdentityError

REPOSITORY = "primary"  # the only repository so far; an offsite copy would be another
STORE_CHOICE = click.Choice(STORES)
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON instead of a table.")


def state_of(record: BackupRecord) -> str:
    """A backup's verification state: yes, no (never verified), FAILED or DAMAGED (its
    verification record cannot be read)."""
    if record.damage is not None:
        return "DAMAGED"
    if record.verification is None:
        return "no"
    return "yes" if record.verification.ok else "FAILED"


def row_of(store: str, record: BackupRecord) -> dict[str, Any]:
    manifest, verification = record.manifest, record.verification
    return {"store": store, "partition": record.partition_key, "backup_id": record.backup_id,
            "started_at": manifest.started_at.isoformat(),
            "ended_at": manifest.ended_at.isoformat(),
            "duration_s": round(manifest.duration_s, 3), "size_bytes": manifest.size_bytes,
            "verified": state_of(record),
            "verified_at": verification.verified_at.isoformat() if verification else None,
            "repository": REPOSITORY, "location": record.location,
            "damage": record.damage.describe() if record.damage else None}


def damaged_row(store: str, damage: DamagedRecord) -> dict[str, Any]:
    return {"store": store, "partition": damage.partition_key, "backup_id": damage.backup_id,
            "started_at": None, "ended_at": None, "duration_s": None, "size_bytes": None,
            "verified": "DAMAGED", "verified_at": None, "repository": REPOSITORY,
            "location": damage.file, "damage": damage.describe()}


def listing(repo: BackupRepository, store: str) -> list[dict[str, Any]]:
    """Every partition of ``store``: healthy backups and DAMAGED ones (a damaged verification
    record still shows its backup's manifest), in partition order."""
    found = repo.scan(store)
    rows = [row_of(store, record) for record in found.backups]
    for damage in found.damaged:
        record = repo.get(store, damage.partition_key) if damage.kind != "manifest" else None
        rows.append(row_of(store, record) if record is not None
                    else damaged_row(store, damage))
    return sorted(rows, key=lambda r: r["partition"])


@click.command("list")
@click.argument("store", metavar="STORE", type=STORE_CHOICE, required=False)
@click.option("--repository", "which", type=click.Choice(["primary", "offsite"]),
              default="primary", show_default=True,
              help="List the primary repository or the offsite copy (RAG_BACKUP_OFFSITE).")
@json_option
def list_command(store: str | None, which: str, as_json: bool) -> int:
    """Every backup in the repository (of STORE, or of all stores): partition, backup id,
    when it was taken, how long it took, its size and whether it is verified."""
    if which == "offsite":
        repo = environment.offsite_repository()
        if repo is None:
            raise InvalidRequest("the offsite repository is not configured: set "
                                 "RAG_BACKUP_OFFSITE (and RAG_OFFSITE_S3_*)")
    else:
        repo = environment.repository()
    rows = [{**row, "repository": which}
            for name in ([store] if store else STORES) for row in listing(repo, name)]
    if as_json:
        output.print_json(rows)
        return 0
    if not rows:
        output.print_line(f"no backups in {repo.root_location}")
        return 0
    output.print_table(output.table(
        f"backups in {repo.root_location}",
        ("store", "partition", "backup id", "taken (UTC)", "duration", "size", "verified",
         "repository"),
        ([r["store"], r["partition"], r["backup_id"] or "?",
          output.when(_time(r["started_at"])), output.duration(r["duration_s"]),
          output.size(r["size_bytes"]), output.state_text(r["verified"]), r["repository"]]
         for r in rows)))
    for r in rows:
        if r["damage"]:
            output.print_line(r["damage"], style="red")
    return 0


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def find(repo: BackupRepository, store: str, partition: str) -> BackupRecord:
    """The backup of ``partition`` (verified or not), or for ``latest`` the newest backup
    taken; an error saying why there is none (deleted by retention, DAMAGED, unknown)."""
    if partition != LATEST:
        return repo.resolve(store, partition, require_verified=False)
    records = repo.list_backups(store)
    if not records:
        raise BackupNotFound(f"{store}: no backup in the repository {repo.root_location}")
    return max(records, key=lambda r: r.manifest.started_at)


def fingerprint_summary(fingerprint: dict[str, Any]) -> list[tuple[str, str]]:
    """The fingerprint's totals, one row each: a part of named records (databases, buckets,
    collections) as its size and first names, a part of numbers as ``name value`` pairs."""
    rows = []
    for key, value in sorted(fingerprint.items()):
        if isinstance(value, dict) and value and all(
                not isinstance(v, (dict, list)) for v in value.values()):
            rows.append((key, ", ".join(f"{k} {output.scalar(v)}" for k, v in value.items())))
        elif isinstance(value, dict):
            names = ", ".join(list(map(str, value))[:5]) + (", ..." if len(value) > 5 else "")
            rows.append((key, f"{len(value)}: {names}" if value else "0"))
        elif isinstance(value, list):
            rows.append((key, f"{len(value)} item(s)"))
        else:
            rows.append((key, output.scalar(value)))
    return rows


def show_doc(store: str, record: BackupRecord) -> dict[str, Any]:
    return {"store": store, "partition": record.partition_key, "backup_id": record.backup_id,
            "location": record.location, "repository": REPOSITORY,
            "verified": state_of(record), "manifest": json.loads(record.manifest.to_json()),
            "verification": (json.loads(record.verification.to_json())
                             if record.verification else None),
            "damage": record.damage.describe() if record.damage else None}


def print_record(store: str, record: BackupRecord) -> None:
    m = record.manifest
    window = m.partition_window
    output.print_table(output.key_values(f"{store} backup {record.partition_key}", [
        ("backup id", record.backup_id), ("run id", m.run_id), ("location", record.location),
        ("started (UTC)", output.when(m.started_at)), ("ended (UTC)", output.when(m.ended_at)),
        ("duration", output.duration(m.duration_s)), ("size", output.size(m.size_bytes)),
        ("partition window", f"{window.start.isoformat()} .. {window.end.isoformat()}"
         if window else "not recorded"),
        ("format version", m.format_version), ("server version", m.server_version),
        *((f"tool {name}", version) for name, version in sorted(m.tool_versions.items())),
        ("verified", output.state_text(state_of(record))),
    ]))
    output.print_table(output.table("artifacts", ("path", "size", "bytes", "sha256"), (
        (a.path, output.size(a.size), a.size, a.sha256) for a in m.artifacts)))
    v = record.verification
    if record.damage is not None:
        output.print_line(record.damage.describe(), style="red")
    elif v is not None:
        output.print_table(output.key_values("verification", [
            ("ok", v.ok), ("verified at (UTC)", output.when(v.verified_at)), ("run id", v.run_id),
            *((f"check {k}", val) for k, val in sorted(v.checks.items())),
            *([("error", v.error)] if v.error else [])]))
    output.print_table(output.key_values("fingerprint", fingerprint_summary(m.fingerprint)))
    if m.recovery_point:
        output.print_table(output.key_values("recovery point",
                                             sorted(m.recovery_point.items())))


@click.command("show")
@click.argument("store", metavar="STORE", type=STORE_CHOICE)
@click.argument("partition")
@json_option
def show_command(store: str, partition: str, as_json: bool) -> int:
    """One backup of STORE: its manifest (times, tools, artifacts with sizes and sha256), its
    verification record, its fingerprint and recovery point. PARTITION may be 'latest'."""
    record = find(environment.repository(), store, partition)
    if as_json:
        output.print_json(show_doc(store, record))
    else:
        print_record(store, record)
    return 0


# -- writing: verification and backups -----------------------------------------------------

def verify_record(repo: BackupRepository, store: str, record: BackupRecord,
                  run_id: str) -> tuple[dict[str, Any] | None, Exception | None, float]:
    """Run the store's verification of ``record`` and record the outcome in the repository,
    failed or not, as ``<store>_backup_verified`` does: (checks, error, seconds)."""
    from rag_backup.cli.stores import store_ops

    ops = store_ops(store)
    connection = environment.resource(ops.resource)
    started = time.monotonic()
    try:
        with output.progress_display():
            checks = ops.verify(connection, repo, record, output.log)
    except IdentityError:  # no key to read the backup with: not run, nothing recorded
        raise
    except Exception as exc:  # noqa: BLE001 - recorded as failed, then reported
        repo.record_verification(store, record.partition_key, Verification(
            record.backup_id, False, utcnow(), run_id, error=str(exc)))
        return None, exc, time.monotonic() - started
    repo.record_verification(store, record.partition_key, Verification(
        record.backup_id, True, utcnow(), run_id, checks=checks))
    return checks, None, time.monotonic() - started


def verification_failed(store: str, record: BackupRecord, exc: Exception) -> int:
    """The failure in one line; exit 1 when the backup failed its checks, or the refusal's
    own code (e.g. 2 for a bad request)."""
    from rag_backup.cli.errors import exit_code

    output.error(f"verification of {store} partition {record.partition_key} (backup "
                 f"{record.backup_id}) FAILED: {exc}")
    return max(exit_code(exc), 1)


@click.command("verify")
@click.argument("store", metavar="STORE", type=STORE_CHOICE)
@click.argument("partition")
@json_option
def verify_command(store: str, partition: str, as_json: bool) -> int:
    """Verify a backup of STORE (PARTITION, or 'latest': the newest backup taken) as the
    <store>_backup_verified asset does, and record the result in the repository. Exit 1 if
    it fails."""
    repo = environment.repository()
    record = find(repo, store, partition)
    checks, exc, seconds = verify_record(repo, store, record, environment.run_id())
    if exc is not None:
        if as_json:
            output.print_json({"store": store, "partition": record.partition_key,
                               "backup_id": record.backup_id, "ok": False, "error": str(exc)})
        return verification_failed(store, record, exc)
    doc = {"store": store, "partition": record.partition_key, "backup_id": record.backup_id,
           "ok": True, "duration_s": round(seconds, 3),
           "bytes_checked": record.manifest.size_bytes, "checks": checks}
    if as_json:
        output.print_json(doc)
    else:
        output.print_table(output.key_values(
            f"{store} backup {record.partition_key} verified", [
                ("backup id", record.backup_id), ("verified", output.state_text("yes")),
                ("bytes checked", output.size(record.manifest.size_bytes)),
                ("duration", output.duration(seconds)),
                *((f"check {k}", v) for k, v in sorted((checks or {}).items()))]))
    return 0


def take(repo: BackupRepository, store: str, key: str, run_id: str) -> BackupRecord:
    """Back up ``store`` for partition ``key`` as ``<store>_backup`` does: refused outside the
    retention window, under the store's lease, committed through the repository."""
    from rag_backup.cli.stores import store_ops, window
    from rag_backup.repository.retention import ensure_within_window

    ops = store_ops(store)
    part = window(store, key)
    ensure_within_window(store, key, start=part.start, now=utcnow(), window=ops.retention)
    connection = environment.resource(ops.resource)

    def backup(pending):
        output.log(f"{store} partition {key}: backup {pending.backup_id} started")
        with output.progress_display():
            return ops.take(connection, repo, pending, part, output.log)

    return repo.take(store, key, run_id, environment.holder("backup"), backup, window=part)[1]


@click.command("backup")
@click.argument("store", metavar="STORE", type=STORE_CHOICE)
@click.option("--partition", "partition", default="", metavar="KEY",
              help="The partition to back up (YYYY-MM-DD; Redis YYYY-MM-DD-HH:00); default: "
                   "the current one.")
@click.option("--verify", "verify", is_flag=True, help="Verify the backup right after.")
@json_option
def backup_command(store: str, partition: str, verify: bool, as_json: bool) -> int:
    """Take a backup of STORE now, for the current partition or --partition, holding the
    store's lease (refused with exit 2 while another writer holds it)."""
    from rag_backup.cli.stores import current_partition

    repo = environment.repository()
    key = partition or current_partition(store)
    run_id = environment.run_id()
    record = take(repo, store, key, run_id)
    doc = show_doc(store, record)
    exc = None
    if verify:
        checks, exc, seconds = verify_record(repo, store, record, run_id)
        doc["verification"] = {"ok": exc is None, "checks": checks, "duration_s": seconds,
                               "error": str(exc) if exc else None}
        doc["verified"] = "yes" if exc is None else "FAILED"
    if as_json:
        output.print_json(doc)
    else:
        m = record.manifest
        output.print_table(output.key_values(f"{store} backup {key} committed", [
            ("backup id", record.backup_id), ("location", record.location),
            ("size", output.size(m.size_bytes)), ("duration", output.duration(m.duration_s)),
            ("verified", output.state_text(doc["verified"])),
            *fingerprint_summary(m.fingerprint),
            *((f"recovery point {k}", v) for k, v in sorted((m.recovery_point or {}).items())),
        ]))
    return verification_failed(store, record, exc) if exc is not None else 0
