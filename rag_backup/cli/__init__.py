"""``rag-backup``: the backup repository and its restores from a shell, without the Dagster UI.

In the worst disaster the UI is gone too (in production Dagster's storage may share a server
with the stores being restored), so this command line needs only the ``RAG_*`` environment
(README, "Configuration"), no Dagster instance, and runs the same engines, repository code
and restore functions as the jobs. Writers (``backup``, restores that replace something)
hold the store's lease, as the jobs do, so the two never write one store at once.

Exit codes (``rag_backup.cli.errors``): 0 success; 1 a check failed or something unexpected
happened; 2 bad input or a refusal. An error is one line on stderr, ``rag-backup: <message>``;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import click

from rag_backup.cli import output
from rag_backup.cli.errors import exit_code, message
from rag_backup.cli.lazy import LazyGroup, attribute, built

COMMANDS = {
    "list": attribute("rag_backup.cli.catalog", "list_command"),
    "show": attribute("rag_backup.cli.catalog", "show_command"),
    "verify": attribute("rag_backup.cli.catalog", "verify_command"),
    "backup": attribute("rag_backup.cli.catalog", "backup_command"),
    "restore": attribute("rag_backup.cli.restores", "restore_group"),
    "restore-pitr": built("rag_backup.cli.restores", "restore_pitr_command"),
    "restore-all": built("rag_backup.cli.all_stores", "restore_all_command"),
    "drill": attribute("rag_backup.cli.all_stores", "drill_command"),
    "wal-status": attribute("rag_backup.cli.restores", "wal_status_command"),
    "keys": attribute("rag_backup.cli.keys", "keys_group"),
}


@click.group("rag-backup", cls=LazyGroup, factories=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.option("-v", "--verbose", is_flag=True,
              help="Print the engines' log lines on stderr (shown anyway on a terminal).")
def cli(debug: bool, verbose: bool) -> None:
    """Back up, list, verify and restore the RAG service's stores (PostgreSQL, Redis, MinIO,
    Milvus) without the Dagster UI, from the RAG_* environment (see README, 'Command line')."""
    output.set_verbose(verbose)


def _usage_line(exc: click.ClickException) -> str:
    text = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Every error becomes one line on stderr (and, with
    ``--debug``, its traceback first)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = cli.main(args=args, prog_name=output.PROG, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # bad usage: 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # no command given: the help
            exc.show()
        else:
            output.error(_usage_line(exc))
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        output.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is reported in one line
        if debug:
            traceback.print_exc()
        output.error(message(exc))
        return exit_code(exc)
    return result if isinstance(result, int) else 0


def main() -> None:
    """The ``rag-backup`` console script."""
    sys.exit(run())
