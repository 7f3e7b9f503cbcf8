"""``restore <store>``, ``restore-pitr`` and ``wal-status``.

A restore command's options are the restore job's ``Config`` fields (``options``), and it runs
the job's own restore function (``defs.<store>.run_restore``): the same resolution of the
backup, the same confirmations (the engines enforce them), the same lease for restores that
replace something, the same comparison. It prints the summary the job returns as its output.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

import click

from rag_backup.cli import environment, output
from rag_backup.cli.lazy import LazyGroup
from rag_backup.cli.options import build_config, config_options



def json_param() -> click.Option:
    return click.Option(["--json", "as_json"], is_flag=True, help="Print JSON instead of a table.")

# store -> (defs module, its restore Config class, its restore job, the resource it needs)
RESTORES = {
    "postgres": ("rag_backup.defs.postgres", "RestorePostgresConfig", "restore_postgres_job"),
    "redis": ("rag_backup.defs.redis", "RestoreRedisConfig", "restore_redis_job"),
    "minio": ("rag_backup.defs.minio", "RestoreMinioConfig", "restore_minio_job"),
    "milvus": ("rag_backup.defs.milvus", "RestoreMilvusConfig", "restore_milvus_job"),
}


def report(title: str, summary: dict[str, Any], as_json: bool) -> int:
    """Print a restore's summary; exit 1 when its comparison found a difference (the data
    was written: ``accept_differences``), else 0."""
    if as_json:
        output.print_json(summary)
    else:
        output.print_table(output.key_values(title, output.flatten(summary)))
    if output.differing(summary):
        output.error(f"{title}: the restored data differ from the backup (see the "
                     "comparison above)")
        return 1
    return 0


def config_command(name: str, module_name: str, config_name: str, job_name: str,
                   resource: str, title: str, short_help: str) -> click.Command:
    """A command running ``<module>.run_restore`` with a config made from its options."""
    module = import_module(module_name)
    config_cls = getattr(module, config_name)

    def run(as_json: bool, **values: Any) -> int:
        config = build_config(config_cls, values)
        from rag_backup.defs.offsite_settings import restore_repository

        choice = restore_repository(environment.Repositories(), config, resource, output.log)
        connection = environment.resource(resource)
        with output.progress_display():
            summary, _metadata = module.run_restore(config, choice.repo, connection, output.log,
                                                    environment.holder("restore"))
        return report(title, {**summary, "repository": choice.name,
                              "repository_reason": choice.reason}, as_json)

    job = getattr(module, job_name)
    return click.Command(name, callback=run, params=[*config_options(config_cls), json_param()],
                         help=f"{job.description}\n\nOptions are the fields of {config_name} "
                              f"(the launchpad of {job_name}).",
                         short_help=short_help)


def restore_factory(store: str) -> Callable[[], click.Command]:
    module_name, config_name, job_name = RESTORES[store]
    return lambda: config_command(store, module_name, config_name, job_name, store,
                                  f"{store} restore", f"Restore a {store} backup.")


restore_group = LazyGroup(
    "restore", factories={store: restore_factory(store) for store in RESTORES},
    help="Restore one store from a backup: the options of its restore job, the same "
         "confirmations. Run 'rag-backup restore STORE --help' for a store's options.")


def restore_pitr_command() -> click.Command:
    return config_command("restore-pitr", "rag_backup.defs.pitr", "RestorePostgresPitrConfig",
                          "restore_postgres_pitr_job", "postgres",
                          "point-in-time recovery of postgres",
                          "Restore PostgreSQL to a point in time (base backup and WAL).")


@click.command("wal-status")
@click.option("--max-lag-s", type=float, default=900.0, show_default=True,
              help="Exit 1 when the archive lags the server by more than this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def wal_status_command(max_lag_s: float, as_json: bool) -> int:
    """The PostgreSQL WAL archive's lag behind the server (the PostgreSQL RPO) and what
    threatens it; exit 1 past --max-lag-s, when it cannot be measured, or on a problem."""
    from rag_backup.defs.pitr import WAL_SLOT
    from rag_backup.engines.postgres.pitr import current_lag

    lag = current_lag(environment.repository(), environment.resource("postgres").server(),
                      slot=WAL_SLOT)
    healthy = lag.seconds is not None and lag.seconds <= max_lag_s and not lag.problems
    doc = {**lag.to_dict(), "max_lag_s": max_lag_s, "healthy": healthy}
    if as_json:
        output.print_json(doc)
    else:
        rows = [(k, v) for k, v in output.flatten(doc) if not k.startswith("problems")]
        output.print_table(output.key_values("WAL archive", rows))
        for problem in lag.problems:
            output.print_line(f"problem: {problem}", style="red")
    if not healthy:
        said = f"{lag.seconds:.0f} s" if lag.seconds is not None else "unknown"
        output.error(f"the WAL archive is unhealthy: lag {said} (max {max_lag_s:.0f} s)"
                     + "".join(f"; {p}" for p in lag.problems))
        return 1
    return 0
