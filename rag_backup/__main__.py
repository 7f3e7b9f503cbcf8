"""``python -m rag_backup <command>``: the long-running services and tools that work without
Dagster, on the ``RAG_*`` environment.

- ``wal-receiver``: stream PostgreSQL's WAL into the repository (runs until SIGTERM);
- ``wal-status``: the WAL archive's status and lag, as JSON (exit 1 past the threshold).
"""

from __future__ import annotations

import argparse
import sys

from rag_backup.errors import RagBackupError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag_backup")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wal-receiver", help="stream PostgreSQL's WAL into the repository")
    status = sub.add_parser("wal-status", help="the WAL archive's status and lag (JSON)")
    status.add_argument("--max-lag-s", type=float, default=900.0,
                        help="exit 1 when the lag is above this (default 900)")
    args = parser.parse_args(argv)
    try:
        if args.command == "wal-receiver":
            from rag_backup.engines.postgres.pitr.receiver import serve
            return serve()
        from rag_backup.engines.postgres.pitr.lag import print_status
        return print_status(args.max_lag_s)
    except RagBackupError as exc:
        print(f"rag_backup {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
