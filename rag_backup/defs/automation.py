"""Automation that tells operators what they need to know: catch-up, RPO, damaged backups and
failure alerts.

Every sensor reads the backup repository, the source of truth for what exists, not Dagster's
materialization history. A DAMAGED partition (unreadable manifest or verification record)
counts as missing for catch-up (it is taken again while in the window), never as the newest
verified backup for the RPO, and is alerted once per damaged file. One store's failure never
stops the RPO sensor checking the others.
"""

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

import dagster as dg

from rag_backup import errors
from rag_backup.alerts import Alert, AlertDeliveryError
from rag_backup.defs.common import StorePolicy
from rag_backup.defs.partitions import SENSOR_STATUS
from rag_backup.defs.resources import AlertResource, AutomationResource, BackupRepositoryResource
from rag_backup.repository.manifest import utcnow

CATCHUP_INTERVAL_S = 300
RPO_INTERVAL_S = 120
MAX_CATCHUP_ATTEMPTS = 3
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
             dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


# -- catch-up ------------------------------------------------------------------------------

def due_partitions(policy: StorePolicy, now: datetime, window: timedelta,
                   since: datetime | None = None) -> list[str]:
    """Partition keys whose scheduled backup should have happened by ``now``: within ``window``
    (and the retention window) before ``now``, and due at or after ``since`` (when catch-up
    started watching), except the latest due one, which is always included."""
    horizon = now - min(window, policy.retention - timedelta(hours=1))
    keys = policy.partitions_def.get_partition_keys(current_time=now)
    due = []
    for key in reversed(keys):
        start = policy.partitions_def.time_window_for_partition_key(key).start
        if start < horizon:
            break
        due_at = start + policy.due_after
        if due_at <= now and (not due or since is None or due_at >= since):
            due.append(key)
    return sorted(due)


def partitions_in_flight(instance: dg.DagsterInstance, job_name: str) -> set[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT))
    return {r.tags["dagster/partition"] for r in runs if "dagster/partition" in r.tags}


def build_catchup_sensor(policy: StorePolicy) -> dg.SensorDefinition:
    @dg.sensor(name=f"{policy.store}_catchup_sensor", job=policy.job,
               minimum_interval_seconds=CATCHUP_INTERVAL_S, default_status=SENSOR_STATUS,
               description=f"Requests {policy.store} backups for due partitions that have none "
                           "in the repository (the daemon was down, the store was unreachable, "
                           f"a run failed), at most {MAX_CATCHUP_ATTEMPTS} times each, within "
                           "the catch-up window, never beyond retention, and never for "
                           "partitions due before the sensor first ran (except the latest).")
    def catchup(context: dg.SensorEvaluationContext, repository: BackupRepositoryResource,
                automation: AutomationResource):
        now = utcnow()
        state = json.loads(context.cursor) if context.cursor else {"since": now.isoformat()}
        attempts: dict[str, int] = state.get("attempts", {})
        listing = repository.open().scan(policy.store)
        present = {r.partition_key for r in listing.backups}  # healthy only: damaged re-taken
        damaged = {d.partition_key: d for d in listing.damaged}
        window = timedelta(hours=automation.catchup_window_hours)
        missing = [k for k in due_partitions(policy, now, window,
                                             datetime.fromisoformat(state["since"]))
                   if k not in present]
        running = partitions_in_flight(context.instance, policy.job.name)
        requests, exhausted = [], []
        for key in missing:
            if key in running:
                continue
            tries = attempts.get(key, 0)
            if tries >= MAX_CATCHUP_ATTEMPTS:
                exhausted.append(key)
                continue
            attempts[key] = tries + 1
            tags = {"rag_backup/trigger": "catchup"}
            if key in damaged:
                tags["rag_backup/retake"] = f"damaged {damaged[key].kind}"
                context.log.warning(damaged[key].describe() + " Requesting a new backup.")
            requests.append(dg.RunRequest(
                partition_key=key, run_key=f"{policy.store}-catchup-{key}-{tries}",
                tags=tags))
        state["attempts"] = {k: v for k, v in attempts.items() if k in missing}
        context.update_cursor(json.dumps(state))
        if requests:
            return requests
        reason = (f"{len(missing)} partition(s) without a backup: "
                  f"{len(missing) - len(exhausted)} running, {len(exhausted)} given up after "
                  f"{MAX_CATCHUP_ATTEMPTS} attempts ({', '.join(exhausted[:5])})"
                  if missing else "every due partition in the catch-up window has a backup")
        in_window_damaged = sorted(k for k in missing if k in damaged)
        if in_window_damaged:
            reason += f"; DAMAGED: {', '.join(in_window_damaged[:5])}"
        return dg.SkipReason(reason)

    return catchup


# -- RPO and damaged backups -----------------------------------------------------------

def damage_alert(damage) -> Alert:
    return Alert("backup_damaged", f"{damage.store}: backup {damage.partition_key} is DAMAGED",
                 damage.describe(), damage.store,
                 {"store": damage.store, "partition": damage.partition_key,
                  "record": damage.kind, "file": damage.file, "error": damage.error})


def check_store(policy: StorePolicy, repo, state: dict, now: datetime, grace: timedelta,
                notifier) -> str:
    """One store's RPO and damaged backups; updates ``state`` (this store's cursor entry) and
    sends what changed. Returns the summary line."""
    listing = repo.scan(policy.store)
    alerted: list[str] = state.get("damaged", [])
    current = {d.identity: d for d in listing.damaged}
    for identity, damage in current.items():
        if identity not in alerted:
            notifier.send(damage_alert(damage))
            alerted.append(identity)
    state["damaged"] = [i for i in alerted if i in current]
    verified = [r for r in listing.backups if r.verified]
    latest = max(verified, key=lambda r: r.manifest.started_at, default=None)
    point = latest.manifest.started_at if latest else None
    age = now - point if point else None
    breached = age is None or age > policy.rpo + grace
    was = state.get("breached", False)
    details = {"store": policy.store, "rpo": str(policy.rpo), "grace": str(grace),
               "newest_verified_partition": latest.partition_key if latest else "none",
               "recovery_point": point.isoformat() if point else "none",
               "age": str(age).split(".")[0] if age else "no verified backup"}
    if listing.damaged:
        details["damaged_partitions"] = ", ".join(d.partition_key for d in listing.damaged)
    if breached and not was:
        notifier.send(Alert(
            "rpo_breached", f"{policy.store}: RPO breached",
            f"The newest verified {policy.store} backup is "
            f"{details['age']} old, beyond the RPO of {policy.rpo} (+{grace} grace). "
            f"Check the {policy.job.name} runs and the catch-up sensor.",
            policy.store, details))
    elif was and not breached:
        notifier.send(Alert(
            "rpo_recovered", f"{policy.store}: RPO met again",
            f"A verified {policy.store} backup from {details['recovery_point']} is "
            f"within the RPO of {policy.rpo} again.", policy.store, details))
    state["since"] = (now.isoformat() if breached != was
                      else state.get("since", now.isoformat()))
    state["breached"] = breached
    state["check_failed"] = None
    damaged = f", {len(listing.damaged)} DAMAGED" if listing.damaged else ""
    return f"{policy.store}: {'BREACHED' if breached else 'ok'} ({details['age']}{damaged})"


def build_rpo_sensor(policies: Sequence[StorePolicy]) -> dg.SensorDefinition:
    @dg.sensor(name="rpo_sensor", minimum_interval_seconds=RPO_INTERVAL_S,
               default_status=SENSOR_STATUS,
               description="Alerts once when the newest verified backup of a store is older than "
                           "its RPO plus a grace (Redis 1 h, daily stores 24 h), and once more "
                           "when it recovers; once per DAMAGED backup (unreadable manifest or "
                           "verification record); and once when a store cannot be checked. "
                           "Every store is checked whatever happens to the others.")
    def rpo(context: dg.SensorEvaluationContext, repository: BackupRepositoryResource,
            automation: AutomationResource, alerts: AlertResource):
        state: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
        notifier, now = alerts.notifier(), utcnow()
        grace = timedelta(minutes=automation.rpo_grace_minutes)
        summary = []
        repo, open_error = None, None
        try:
            repo = repository.open()
        except errors.RagBackupError as exc:
            open_error = exc
        for policy in policies:
            entry = state.setdefault(policy.store, {})
            try:
                if open_error is not None:
                    raise open_error
                summary.append(check_store(policy, repo, entry, now, grace, notifier))
            except AlertDeliveryError:
                context.update_cursor(json.dumps(state))
                raise
            except Exception as exc:  # noqa: BLE001 - one store never stops the others
                text = f"{type(exc).__name__}: {exc}"
                context.log.error(f"RPO check of {policy.store} failed: {text}")
                if not entry.get("check_failed"):
                    notifier.send(Alert(
                        "rpo_check_failed", f"{policy.store}: RPO NOT CHECKED",
                        f"The RPO sensor could not check {policy.store}: {text}. The other "
                        "stores are still checked. Fix the cause (repository reachable? "
                        "records readable?); the sensor retries every tick.",
                        policy.store, {"store": policy.store, "error": text[:2000]}))
                entry["check_failed"] = text[:500]
                summary.append(f"{policy.store}: NOT CHECKED ({text[:200]})")
        context.update_cursor(json.dumps(state))
        return dg.SkipReason("; ".join(summary))

    return rpo


# -- run failures ------------------------------------------------------------------------

def _own_error_names() -> set[str]:
    names, todo = set(), [errors.RagBackupError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def root_message(error) -> str:
    """What failed, not Dagster's wrapper around it: the innermost of this project's own errors
    in the chain (which names the store, partition and location and carries the backend's text),
    else the innermost error's own message."""
    if error is None:
        return ""
    ours, names = None, _own_error_names()
    while True:
        if error.cls_name in names:
            ours = error
        if error.cause is None:
            break
        error = error.cause
    return (ours or error).message.strip()


@dg.run_failure_sensor(name="run_failure_alert_sensor", default_status=SENSOR_STATUS,
                       description="Alerts on every failed run: job, partition, step and error.")
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertResource):
    run = context.dagster_run
    steps = context.get_step_failure_events()
    failed = [{"step": e.step_key, "error": root_message(e.step_failure_data.error)}
              for e in steps]
    details = {"job": run.job_name, "run_id": run.run_id,
               "partition": run.tags.get("dagster/partition", "-"),
               "steps": ", ".join(f["step"] for f in failed) or "-"}
    for f in failed:
        details[f"error in {f['step']}"] = f["error"][:2000]
    if not failed:
        details["error"] = (context.failure_event.message or "")[:2000]
    offsite_only = bool(failed) and all("_offsite" in f["step"] for f in failed)
    alerts.notifier().send(Alert(
        "offsite_failed" if offsite_only else
        "backup_failed" if "backup" in run.job_name else "run_failed",
        f"{run.job_name} failed" + (f" for {details['partition']}"
                                    if details["partition"] != "-" else ""),
        f"Run {run.run_id} of {run.job_name} failed in step(s) {details['steps']}.",
        run.tags.get("store"), details))


def build_defs(policies: Sequence[StorePolicy]) -> dg.Definitions:
    return dg.Definitions(sensors=[*(build_catchup_sensor(p) for p in policies),
                                   build_rpo_sensor(policies), run_failure_alert_sensor])
