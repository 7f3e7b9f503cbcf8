"""The offsite copy in Dagster: per store, ``<store>_offsite`` (the partition's verified backup
copied to the offsite repository, checked by sha256) and ``<store>_offsite_retention`` (the
offsite's own, longer window), both in the store's group, so the store's nightly (hourly)
backup job copies offsite too; and ``offsite_lag_sensor``, which alerts when the newest
verified backup of a store is not offsite within its RPO. The work is done by
``rag_backup.repository.offsite``.

An offsite failure never touches the primary backup: the copy is its own step after
``<store>_backup_verified``; when it fails the run fails after the backup and its
verification were committed, and ``run_failure_alert_sensor`` alerts (kind
``offsite_failed``). Unset ``RAG_BACKUP_OFFSITE``: both steps are skipped (no
materialization) and say "not configured".
"""

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup import errors
from rag_backup.alerts import Alert, AlertDeliveryError
from rag_backup.defs.common import StorePolicy
from rag_backup.defs.partitions import SENSOR_STATUS
from rag_backup.defs.resources import AlertResource, AutomationResource, BackupRepositoryResource
from rag_backup.repository.manifest import utcnow
from rag_backup.repository.offsite import (
    apply_offsite_retention,
    copy_backup,
    not_offsite,
    offsite_window,
)

POOL = "offsite"
CATCH_UP = 5  # earlier verified partitions not yet offsite, copied by each run as well
LAG_INTERVAL_S = 300
NOT_CONFIGURED = ("offsite copy NOT CONFIGURED: RAG_BACKUP_OFFSITE is unset, so this backup "
                  "exists at one site only; skipped (not passed)")


class OffsiteRetentionConfig(dg.Config):
    dry_run: bool = Field(default=False, description="Report what would be deleted offsite; "
                                                     "delete nothing.")


def _copy_metadata(report, offsite_location: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "backup_id": dg.MetadataValue.text(report.backup_id),
        "offsite": (dg.MetadataValue.url(offsite_location) if offsite_location.startswith("s3")
                    else dg.MetadataValue.path(offsite_location)),
        "object_lock": dg.MetadataValue.bool(report.locked),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    }
    metadata.update({k: dg.MetadataValue.int(v) for k, v in report.counts().items()})
    return metadata


def build_offsite_assets(policy: StorePolicy) -> list[dg.AssetsDefinition]:
    store = policy.store
    verified = dg.AssetKey(f"{store}_backup_verified")
    window = offsite_window(store)

    @dg.asset(name=f"{store}_offsite", deps=[verified], partitions_def=policy.partitions_def,
              group_name=store, kinds={store}, pool=POOL, owners=["team:platform"],
              output_required=False,
              description=f"The partition's verified {store} backup copied to the offsite "
                          "repository (RAG_BACKUP_OFFSITE) as stored (never decrypted), what is "
                          "missing only, every file checked where it landed (S3: the ETag is the "
                          "MD5 of the bytes sent; else read back, sha256), the "
                          "manifest last; also up to "
                          f"{CATCH_UP} earlier verified partitions not yet offsite. Skipped "
                          "when no offsite is configured.")
    def offsite_copy(context: dg.AssetExecutionContext, repository: BackupRepositoryResource):
        if not repository.offsite_configured:
            context.log.warning(f"{store} {context.partition_key}: {NOT_CONFIGURED}")
            return
        key = context.partition_key
        primary, offsite = repository.open(), repository.open_offsite()
        report = copy_backup(primary, offsite, store, key, log_line=context.log.info)
        caught_up, behind = [], []
        for record in not_offsite(primary, offsite, store)[-CATCH_UP:]:
            if record.partition_key == key:
                continue
            try:
                copy_backup(primary, offsite, store, record.partition_key,
                            log_line=context.log.info)
                caught_up.append(record.partition_key)
            except errors.RagBackupError as exc:
                behind.append(record.partition_key)
                context.log.warning(f"{store} {record.partition_key}: catch-up copy offsite "
                                    f"failed: {exc}")
        metadata = _copy_metadata(report, offsite.root_location)
        metadata["partitions_caught_up"] = dg.MetadataValue.int(len(caught_up))
        if caught_up:
            metadata["caught_up"] = dg.MetadataValue.text(", ".join(caught_up))
        if behind:
            metadata["still_behind"] = dg.MetadataValue.text(", ".join(behind))
        yield dg.MaterializeResult(metadata=metadata)

    @dg.asset(name=f"{store}_offsite_retention", deps=[offsite_copy],
              partitions_def=policy.partitions_def, group_name=store, kinds={store}, pool=POOL,
              owners=["team:platform"], output_required=False,
              description=f"Deletes offsite {store} backups older than the offsite window "
                          f"(RAG_OFFSITE_RETENTION_DAYS; default {window.days} days, twice the "
                          "primary's), never the newest verified one; on an Object-Lock bucket "
                          "only once every object's lock has passed (a locked one is reported "
                          "and kept). Skipped when no offsite is configured.")
    def offsite_retention(context: dg.AssetExecutionContext, config: OffsiteRetentionConfig,
                          repository: BackupRepositoryResource):
        if not repository.offsite_configured:
            context.log.warning(f"{store} offsite retention: {NOT_CONFIGURED}")
            return
        offsite = repository.open_offsite()
        days = repository.offsite_retention_days or None
        decisions = apply_offsite_retention(offsite, store, now=utcnow(),
                                            window=offsite_window(store, days),
                                            dry_run=config.dry_run)
        for d in decisions:
            verb = ("deleted" if d.deleted else "would delete" if config.dry_run
                    else "KEPT (locked)" if d.delete else "kept")
            (context.log.warning if d.delete and not d.deleted and not config.dry_run
             else context.log.info)(f"offsite {store} {d.partition_key} ({d.backup_id}): "
                                    f"{verb}: {d.reason}")
        yield dg.MaterializeResult(metadata={
            "dry_run": dg.MetadataValue.bool(config.dry_run),
            "backups_kept": dg.MetadataValue.int(sum(not d.deleted for d in decisions)),
            "backups_deleted": dg.MetadataValue.int(sum(d.deleted for d in decisions)),
            "backups_expired": dg.MetadataValue.int(sum(d.delete for d in decisions)),
            "backups_locked": dg.MetadataValue.int(sum(
                d.delete and d.locked_until is not None for d in decisions)),
            "decisions": dg.MetadataValue.md(
                "| partition | backup | action | reason |\n|---|---|---|---|\n" + "\n".join(
                    f"| {d.partition_key} | {d.backup_id} | "
                    f"{'deleted' if d.deleted else 'expired, kept' if d.delete else 'keep'} "
                    f"| {d.reason} |" for d in decisions)),
        })

    return [offsite_copy, offsite_retention]


# -- lag ------------------------------------------------------------------------------------

def check_lag(policy: StorePolicy, primary, offsite, state: dict, now, grace: timedelta,
              notifier) -> str:
    """One store: is its newest verified backup offsite, or verified less than its RPO (plus
    grace) ago? Alerts once on a breach and once on recovery; updates ``state``."""
    store = policy.store
    verified = [r for r in primary.scan(store).backups if r.verified]
    newest = max(verified, key=lambda r: r.manifest.started_at, default=None)
    pending = {r.partition_key for r in not_offsite(primary, offsite, store)}
    lag = None
    if newest is not None and newest.partition_key in pending:
        lag = now - newest.verification.verified_at
    breached = lag is not None and lag > policy.rpo + grace
    details = {"store": store, "rpo": str(policy.rpo), "grace": str(grace),
               "newest_verified_partition": newest.partition_key if newest else "none",
               "not_offsite": len(pending), "offsite": offsite.root_location,
               "lag": str(lag).split(".")[0] if lag is not None else "0"}
    was = state.get("breached", False)
    if breached and not was:
        notifier.send(Alert(
            "offsite_lagging", f"{store}: offsite copy lagging",
            f"The newest verified {store} backup ({details['newest_verified_partition']}) was "
            f"verified {details['lag']} ago and is not in the offsite repository "
            f"{offsite.root_location}: beyond the RPO of {policy.rpo} (+{grace}). Check the "
            f"{store}_offsite runs and the offsite site.", store, details))
    elif was and not breached:
        notifier.send(Alert("offsite_recovered", f"{store}: offsite copy caught up",
                            f"The newest verified {store} backup is offsite again.", store,
                            details))
    state["breached"], state["check_failed"] = breached, None
    return (f"{store}: {'LAGGING' if breached else 'ok'} ({len(pending)} verified backup(s) not "
            f"offsite, lag {details['lag']})")


def build_lag_sensor(policies: Sequence[StorePolicy]) -> dg.SensorDefinition:
    @dg.sensor(name="offsite_lag_sensor", minimum_interval_seconds=LAG_INTERVAL_S,
               default_status=SENSOR_STATUS,
               description="Alerts once when the newest verified backup of a store is not in "
                           "the offsite repository longer than the store's RPO plus a grace, "
                           "once when it is again, and once when the offsite cannot be "
                           "checked (unreachable). Skips when no offsite is configured.")
    def offsite_lag(context: dg.SensorEvaluationContext, repository: BackupRepositoryResource,
                    automation: AutomationResource, alerts: AlertResource):
        if not repository.offsite_configured:
            return dg.SkipReason(NOT_CONFIGURED)
        state: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
        notifier, now = alerts.notifier(), utcnow()
        grace = timedelta(minutes=automation.rpo_grace_minutes)
        summary, opened, open_error = [], None, None
        try:
            opened = (repository.open(), repository.open_offsite())
        except errors.RagBackupError as exc:
            open_error = exc
        for policy in policies:
            entry = state.setdefault(policy.store, {})
            try:
                if open_error is not None:
                    raise open_error
                summary.append(check_lag(policy, *opened, entry, now, grace, notifier))
            except AlertDeliveryError:
                context.update_cursor(json.dumps(state))
                raise
            except Exception as exc:  # noqa: BLE001 - one store never stops the others
                text = f"{type(exc).__name__}: {exc}"
                if not entry.get("check_failed"):
                    notifier.send(Alert(
                        "offsite_check_failed", f"{policy.store}: offsite NOT CHECKED",
                        f"The offsite lag of {policy.store} could not be checked: {text}. "
                        "Is the offsite repository reachable?", policy.store,
                        {"store": policy.store, "error": text[:2000]}))
                entry["check_failed"] = text[:500]
                summary.append(f"{policy.store}: NOT CHECKED ({text[:200]})")
        context.update_cursor(json.dumps(state))
        return dg.SkipReason("; ".join(summary))

    return offsite_lag


def build_defs(policies: Sequence[StorePolicy]) -> dg.Definitions:
    return dg.Definitions(
        assets=[a for policy in policies for a in build_offsite_assets(policy)],
        sensors=[build_lag_sensor(policies)])
