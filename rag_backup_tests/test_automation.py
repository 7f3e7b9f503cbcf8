"""Schedules, catch-up, RPO and failure alerts, with alerts delivered to real local receivers."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from rag_backup.alerts import Alert, AlertDeliveryError, Notifier, SmtpChannel, WebhookChannel
from rag_backup.defs import automation
from rag_backup.defs import postgres as pg_defs
from rag_backup.defs import redis as redis_defs
from rag_backup.defs.resources import (
    AlertResource,
    AutomationResource,
    BackupRepositoryResource,
    PostgresResource,
)
from rag_backup.repository import BackupOutcome, BackupRepository, Verification
from rag_backup.repository.manifest import utcnow
from rag_backup_tests.receivers import free_port, smtp_server, webhook_server

STACK_SERVICES = ("postgres",)  # only the failed-run test starts a store
POLICIES = [pg_defs.POLICY, redis_defs.POLICY]


@pytest.fixture
def receivers():
    with smtp_server() as (smtp_port, mails), webhook_server() as (url, hooks):
        resource = AlertResource(webhook_url=url, webhook_token="hook-token",
                                 smtp_host="127.0.0.1", smtp_port=smtp_port,
                                 smtp_to="ops@example.org, oncall@example.org")
        yield resource, mails, hooks


def fake_backup(repo: BackupRepository, store: str, partition: str, verified: bool = True):
    """A committed backup record (the sensors read only the repository)."""
    with repo.begin(store, partition, "t") as pending:
        with pending.artifact("data") as out:
            out.write(b"x")
        manifest = pending.commit(BackupOutcome({}, {}, "x"))
    if verified:
        repo.record_verification(store, partition,
                                 Verification(manifest.backup_id, True, utcnow(), "t"))


def rpo_context(repo_dir, receivers_resource, cursor=None, instance=None):
    return dg.build_sensor_context(
        cursor=cursor, instance=instance or dg.DagsterInstance.ephemeral(),
        resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                   "automation": AutomationResource(), "alerts": receivers_resource})


def test_rpo_alerts_once_per_breach_and_once_on_recovery(repo, repo_dir, receivers):
    resource, mails, hooks = receivers
    sensor = automation.build_rpo_sensor(POLICIES)

    context = rpo_context(repo_dir, resource)
    result = sensor(context)
    assert isinstance(result, dg.SkipReason) and "postgres: BREACHED" in result.skip_message
    assert sorted(h["json"]["title"] for h in hooks) == [
        "postgres: RPO breached", "redis: RPO breached"]
    assert hooks[0]["auth"] == "Bearer hook-token"
    assert hooks[0]["json"]["details"]["age"] == "no verified backup"
    assert len(mails) == 2 and mails[0]["To"] == "ops@example.org, oncall@example.org"
    assert mails[0]["Subject"].startswith("[rag-backup] ")

    sensor(rpo_context(repo_dir, resource, cursor=context.cursor))  # still breached: silent
    assert len(hooks) == 2 and len(mails) == 2

    fake_backup(repo, "redis", utcnow().strftime("%Y-%m-%d-%H:00"))
    context2 = rpo_context(repo_dir, resource, cursor=context.cursor)
    sensor(context2)
    assert [h["json"]["kind"] for h in hooks[2:]] == ["rpo_recovered"]
    assert hooks[2]["json"]["store"] == "redis"
    assert json.loads(context2.cursor)["postgres"]["breached"] is True


def test_an_old_verified_backup_is_a_breach(repo, repo_dir, receivers):
    resource, _, hooks = receivers
    fake_backup(repo, "postgres", "2026-11-01")
    fake_backup(repo, "redis", utcnow().strftime("%Y-%m-%d-%H:00"))
    record = repo.get("postgres", "2026-11-01")
    # age the postgres backup: rewrite its manifest's start time two days back
    doc = json.loads(record.manifest.to_json())
    doc["started_at"] = (utcnow() - timedelta(days=2)).isoformat()
    repo.backend.write_bytes("postgres/2026-11-01/manifest.json", json.dumps(doc).encode())
    automation.build_rpo_sensor(POLICIES)(rpo_context(repo_dir, resource))
    assert [h["json"]["store"] for h in hooks] == ["postgres"]
    assert hooks[0]["json"]["details"]["age"].startswith("2 days")


def test_catchup_requests_missing_due_partitions_with_idempotent_run_keys(repo, repo_dir):
    now = utcnow()
    hours = [(now - timedelta(hours=n)).strftime("%Y-%m-%d-%H:00") for n in range(0, 6)]
    for key in hours[2:4]:
        fake_backup(repo, "redis", key)
    sensor = automation.build_catchup_sensor(redis_defs.POLICY)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"repository": BackupRepositoryResource(location=str(repo_dir)),
                 "automation": AutomationResource(catchup_window_hours=6)}
    watching = json.dumps({"since": (now - timedelta(hours=7)).isoformat()})
    context = dg.build_sensor_context(instance=instance, resources=resources, cursor=watching)
    requests = sensor(context)
    keys = sorted(r.partition_key for r in requests)
    due_now = now.minute >= 5  # the current hour's backup is due 5 minutes past the hour
    expected = sorted({hours[1], hours[4], hours[5]} | ({hours[0]} if due_now else set()))
    assert keys == expected
    assert len({r.run_key for r in requests}) == len(requests)
    assert all(r.tags["rag_backup/trigger"] == "catchup" for r in requests)

    # the same partitions again: new run keys (attempt 2), up to three attempts, then a reason
    for attempt in (1, 2):
        context = dg.build_sensor_context(instance=instance, resources=resources,
                                          cursor=context.cursor)
        again = sensor(context)
        assert sorted(r.partition_key for r in again) == expected
        assert all(r.run_key.endswith(f"-{attempt}") for r in again)
    context = dg.build_sensor_context(instance=instance, resources=resources,
                                      cursor=context.cursor)
    final = sensor(context)
    assert isinstance(final, dg.SkipReason) and "given up after 3 attempts" in final.skip_message


def test_a_new_catchup_sensor_backs_up_the_latest_due_partition_not_the_past(repo_dir):
    now = utcnow()
    sensor = automation.build_catchup_sensor(redis_defs.POLICY)
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                   "automation": AutomationResource()})
    [request] = sensor(context)
    latest_due = now - timedelta(minutes=5)
    assert request.partition_key == latest_due.strftime("%Y-%m-%d-%H:00")
    assert json.loads(context.cursor)["since"] <= utcnow().isoformat()


def test_catchup_never_reaches_beyond_retention():
    now = utcnow()
    due = automation.due_partitions(redis_defs.POLICY, now, timedelta(days=30))
    assert len(due) <= 24
    assert min(due) > (now - timedelta(days=1)).strftime("%Y-%m-%d-%H:00")


def test_catchup_takes_partition_times_from_the_partitions_definition():
    # daily partitions of a timezone 14 hours ahead of UTC: at 23:00 UTC its 2026-11-25 started
    # 13 hours ago and its 02:00 backup is due, although the key names a later UTC day
    ahead = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_offset=1,
                                         timezone="Pacific/Kiritimati")
    policy = dataclasses.replace(pg_defs.POLICY, partitions_def=ahead)
    now = datetime(2026, 11, 24, 23, tzinfo=timezone.utc)
    assert automation.due_partitions(policy, now, timedelta(days=2)) == ["2026-11-24",
                                                                        "2026-11-25"]
    earlier = datetime(2026, 11, 24, 11, 59, tzinfo=timezone.utc)  # 01:59 there: not yet due
    assert automation.due_partitions(policy, earlier, timedelta(days=2))[-1] == "2026-11-24"


def test_a_failed_run_alerts_with_job_partition_step_and_error(pg, repo_dir, receivers):
    resource, mails, hooks = receivers
    instance = dg.DagsterInstance.ephemeral()
    result = pg_defs.restore_postgres_job.execute_in_process(
        run_config=dg.RunConfig(ops={"restore_postgres": pg_defs.RestorePostgresConfig(
            partition_key="2026-02-30")}),
        resources={"repository": BackupRepositoryResource(location=str(repo_dir)),
                   "postgres": PostgresResource(host=pg.host, port=pg.port, user=pg.user,
                                                password=pg.password)},
        instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    context = dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert_sensor", dagster_event=failure,
        dagster_instance=instance, dagster_run=result.dagster_run,
        resources={"alerts": resource}).for_run_failure()
    automation.run_failure_alert_sensor(context)
    [hook] = hooks
    assert hook["json"]["title"] == "restore_postgres_job failed"
    assert hook["json"]["details"]["steps"] == "restore_postgres"
    assert "no backup for partition '2026-02-30'" in hook["json"]["details"][
        "error in restore_postgres"]
    [mail] = mails
    assert "no backup for partition '2026-02-30'" in mail.get_payload(decode=True).decode()


def test_a_dead_channel_does_not_silence_the_other():
    with webhook_server() as (good_url, received):
        notifier = Notifier(webhook=WebhookChannel(good_url))
        assert notifier.send(Alert("rpo_breached", "t", "x")) == 1
        assert received[0]["json"]["title"] == "t"
    with smtp_server() as (smtp_port, mails):
        half_broken = Notifier(
            smtp=SmtpChannel("127.0.0.1", smtp_port, "rb@localhost", ("ops@example.org",)),
            webhook=WebhookChannel(f"http://127.0.0.1:{free_port()}/none"))
        with pytest.raises(AlertDeliveryError, match="webhook: .*Connection refused"):
            half_broken.send(Alert("rpo_breached", "still sent by mail", "x"))
        assert [m["Subject"] for m in mails] == ["[rag-backup] still sent by mail"]


def test_schedules_name_their_partitions_and_run_by_default():
    from rag_backup.definitions import defs

    redis_schedule = defs.resolve_schedule_def("redis_backup_job_schedule")
    assert redis_schedule.cron_schedule == "5 * * * *"
    assert redis_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    context = dg.build_schedule_context(
        scheduled_execution_time=utcnow().replace(minute=5, second=0, microsecond=0))
    [request] = list(redis_schedule.evaluate_tick(context).run_requests)
    assert request.partition_key == utcnow().strftime("%Y-%m-%d-%H:00")
    sensors = {s.name for s in defs.sensors}
    assert {"postgres_catchup_sensor", "redis_catchup_sensor", "minio_catchup_sensor",
            "rpo_sensor", "run_failure_alert_sensor"} <= sensors
