"""``python -m rag_backup.devstack up|down|status|env``.

``eval "$(python -m rag_backup.devstack env)"`` exports the connection settings of the running
services into a shell. ``status`` never prints a secret; ``env`` is the only command that does.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from rag_backup.devstack.procs import DevStackError
from rag_backup.devstack.stack import SERVICE_NAMES, DevStack, parse_services


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rag_backup.devstack", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="state directory (default: <project>/.devstack)",
    )
    parser.add_argument(
        "--no-seed", action="store_true", help="up: do not load the sample data"
    )
    parser.add_argument(
        "--services",
        default=None,
        help=f"comma-separated subset of {','.join(SERVICE_NAMES)} (default: all for up; all recorded for down)",
    )
    return parser


def export_lines(env: dict[str, str]) -> str:
    return "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items())
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        services = parse_services(args.services)
        stack = DevStack(root=args.root, services=services)
        if args.command == "up":
            started = time.monotonic()
            stack.up(seed=not args.no_seed)
            for name, status in stack.status().items():
                print(f"{name:9} {status}")
            timings = ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items())
            print(
                f"ready in {time.monotonic() - started:.1f}s ({timings or 'all reused'}); state in {stack.root}"
            )
            root_arg = f" --root {shlex.quote(str(stack.root))}" if args.root else ""
            print(f'connect: eval "$(python -m rag_backup.devstack env{root_arg})"')
        elif args.command == "down":
            stopped = stack.down(services=args.services)
            print(
                f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}"
            )
        elif args.command == "status":
            for name, status in stack.status().items():
                print(f"{name:9} {status}")
        else:
            sys.stdout.write(export_lines(stack.env()))
    except DevStackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
