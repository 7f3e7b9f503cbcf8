"""``restore-all`` and ``drill``: every store back to one point in time, and the restore
drill, run by ``rag_backup.recovery`` with the store table the jobs build
(``defs.recovery.store_recoveries``), and reported as the jobs report them."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import click

from rag_backup.cli import environment, output
from rag_backup.cli.options import build_config, config_options
from rag_backup.cli.restores import json_param

ALL_STORES = ("postgres", "redis", "minio", "milvus")


def restored_doc(r: Any) -> dict[str, Any]:
    """One store's restore (a ``recovery.Restored``) for JSON."""
    return {"partition": r.partition_key, "backup_id": r.backup_id,
            "recovery_point": r.recovery_point.isoformat(), "target": r.target,
            "seconds": round(r.seconds, 3), "matches_manifest": r.matches_manifest,
            "comparison": r.comparison.to_dict(), **r.counts}


def restored_table(title: str, results: list[Any]):
    return output.table(title, ("store", "partition", "backup id", "target", "restore time",
                                "matches backup", "counts"), (
        (r.store, r.partition_key, r.backup_id, r.target, output.duration(r.seconds),
         output.state_text("yes" if r.matches_manifest else "FAILED"),
         ", ".join(f"{k} {v}" for k, v in r.counts.items()))
        for r in results))


def print_differences(results: list[Any]) -> None:
    for r in results:
        if not r.matches_manifest:
            output.print_line(f"{r.store}: {r.comparison.summary()}", style="red")


def store_table(config: Any, point: Any) -> list[Any]:
    """The jobs' table of store recoveries, with the four resources from the environment."""
    from rag_backup.defs.recovery import store_recoveries

    postgres, redis, minio, milvus = (environment.resource(s) for s in ALL_STORES)
    if config is None:
        return store_recoveries(postgres, redis, minio, milvus)
    return store_recoveries(postgres, redis, minio, milvus,
                            databases=config.postgres_databases, scratch_dir=config.scratch_dir,
                            point=point)


def run_restore_all(config: Any, as_json: bool) -> int:
    """``restore_all_stores`` without Dagster: choose, report, restore (holding each store's
    lease when restoring over production), report every comparison."""
    from rag_backup import recovery

    from rag_backup.defs.offsite_settings import pick_repository

    choice = pick_repository(environment.Repositories(), config.repository,
                             lambda r: recovery.plan(r, config.stores, config.point_in_time),
                             output.log)
    repo = choice.repo
    plan = recovery.plan(repo, config.stores, config.point_in_time)
    doc: dict[str, Any] = {
        "repository": choice.name, "repository_reason": choice.reason,
        "point_in_time": plan.point.isoformat(), "spread_s": plan.spread_s,
        "chosen": {s: {"partition": r.partition_key, "backup_id": r.backup_id,
                       "recovery_point": r.manifest.started_at.isoformat()}
                   for s, r in plan.chosen.items()}}
    if not as_json:
        output.print_table(output.table(
            f"backups chosen for {output.when(plan.point)} UTC (spread "
            f"{output.duration(plan.spread_s)})",
            ("store", "partition", "backup id", "recovery point (UTC)"),
            ((s, r.partition_key, r.backup_id, output.when(r.manifest.started_at))
             for s, r in plan.chosen.items())))
    if config.dry_run:
        if as_json:
            output.print_json(doc)
        return 0
    entries = store_table(config, plan.point if config.point_in_time and config.postgres_pitr
                          else None)
    started = time.monotonic()
    with ExitStack() as held:
        held.enter_context(output.progress_display())
        if config.into_production:
            for store in plan.chosen:
                held.enter_context(repo.lease(store, environment.holder("restore-all"),
                                                "a restore of every store into production"))
        results = recovery.restore_all(
            repo, entries, plan.chosen, production=config.into_production,
            confirm={"postgres": config.postgres_confirm, "redis": config.redis_confirm,
                     "minio": config.minio_confirm, "milvus": config.milvus_confirm},
            accept_differences=config.accept_differences,
            concurrent=not config.one_store_at_a_time, log=output.log)
    doc["restore_wall_s"] = round(time.monotonic() - started, 3)
    doc["restored"] = {r.store: restored_doc(r) for r in results}
    if as_json:
        output.print_json(doc)
    else:
        output.print_table(restored_table(
            f"restored (in {output.duration(doc['restore_wall_s'])})", results))
        print_differences(results)
    differing = [r.store for r in results if not r.matches_manifest]
    if differing:
        output.error(f"restored store(s) {', '.join(differing)} differ from their backups")
        return 1
    return 0


def restore_all_command() -> click.Command:
    from rag_backup.defs.recovery import RestoreAllConfig, restore_all_job

    def run(as_json: bool, **values: Any) -> int:
        if values["point_in_time"].strip().lower() == "now":
            values["point_in_time"] = ""
        return run_restore_all(build_config(RestoreAllConfig, values), as_json)

    params = config_options(RestoreAllConfig, names={"point_in_time": ["--at",
                                                                      "--point-in-time"]},
                            required=["point_in_time"])
    for param in params:
        if param.name == "point_in_time":
            param.help = ("ISO 8601 time (e.g. 2026-11-24T09:30:00Z; without an offset: UTC), "
                          "or 'now'. Each store gets its newest verified backup taken at or "
                          "before it.")
            param.metavar = "TIME"
    return click.Command(
        "restore-all", callback=run, params=[*params, json_param()],
        help=f"{restore_all_job.description}\n\nOptions are the fields of RestoreAllConfig "
             "(the launchpad of restore_all_job). Exit 1 if a restored store differs from "
             "its backup.",
        short_help="Restore every store to one point in time.")


@click.command("drill")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--repository", "which", type=click.Choice(["primary", "offsite", "auto"]),
              default="auto", show_default=True,
              help="Drill from the primary, the offsite copy, or auto (the primary, else the "
                   "offsite when the primary is unreachable or lacks a verified backup).")
@click.option("--one-store-at-a-time", is_flag=True,
              help="Restore the stores one after the other instead of all at once; for stores "
                   "that share one host's CPU or disks.")
def drill_command(as_json: bool, which: str, one_store_at_a_time: bool) -> int:
    """The restore drill: the newest verified backup of every store restored into scratch
    targets, compared with its backup, checked with the consistency rules
    (RAG_DRILL_RULES_FILE; default: the RAG service's), and removed. Exit 1 if it found
    problems."""
    from rag_backup import consistency, recovery

    from rag_backup.defs.offsite_settings import pick_repository

    choice = pick_repository(environment.Repositories(), which, lambda r: recovery.choose(
        r, list(recovery.STORES), recovery.utcnow()), output.log)
    repo = choice.repo
    rules, source = consistency.rules_from_environment()
    entries = store_table(None, None)
    with output.progress_display():
        result = recovery.drill(repo, entries, rules, concurrent=not one_store_at_a_time,
                                log=output.log, log_error=output.log)
    results = list(result.restored.values())
    doc = {"repository": choice.name, "consistent": result.consistent,
           "spread_s": result.spread_s,
           "total_restore_s": round(result.total_restore_s, 3),
           "restore_wall_s": round(result.wall_s, 3), "rules_source": source,
           "stores": {r.store: {**restored_doc(r), "error": result.errors.get(r.store)}
                      for r in results},
           "rules": [r.to_dict() for r in result.rules], "problems": result.problems}
    if as_json:
        output.print_json(doc)
    else:
        output.print_table(restored_table(
            f"restore drill (restored in {output.duration(result.wall_s)}; the stores' restore "
            f"times add up to {output.duration(result.total_restore_s)})",
            results))
        output.print_table(output.table(
            f"consistency rules ({source})",
            ("rule", "status", "checked", "violations", "examples / reason"),
            ((r.name, output.state_text(r.status),
              ", ".join(f"{n} {what}" for what, n in r.checked.items()),
              "" if r.status == consistency.NOT_RUN else r.violations,
              r.reason if r.status == consistency.NOT_RUN else ", ".join(r.examples))
             for r in result.rules)))
        for problem in result.problems:
            output.print_line(f"problem: {problem}", style="red")
    if result.problems:
        output.error(f"the restore drill found {len(result.problems)} problem(s): "
                     + "; ".join(result.problems))
        return 1
    return 0
