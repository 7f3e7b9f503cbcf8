"""The devstack's state file: ports, generated secrets, started processes, seeding.

``<root>/state.json`` is written atomically with mode 0600 (it holds the generated secrets).
``<root>/.lock`` serialises ``up``/``down`` between processes (``fcntl.flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rag_backup.devstack.procs import DevStackError, ProcessRecord

STATE_FORMAT_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 600.0

# Every secret the stack uses; generated on first use, then read from the state file.
SECRET_NAMES = (
    "pg_admin_password",
    "pg_dagster_password",
    "pg_ragqa_password",
    "redis_password",
    "s3_access_key",
    "s3_secret_key",
)


@dataclass
class ServiceState:
    """One service: its ports (kept across restarts when still free) and its running process."""

    ports: dict[str, int] = field(default_factory=dict)
    process: ProcessRecord | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "ports": dict(self.ports),
            "process": self.process.to_json() if self.process else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ServiceState:
        process = data.get("process")
        ports = data.get("ports") or {}
        return cls(
            ports={str(k): int(v) for k, v in ports.items()},  # type: ignore[union-attr]
            process=ProcessRecord.from_json(process)
            if isinstance(process, dict)
            else None,
        )


@dataclass
class StackState:
    """Everything the devstack remembers between invocations."""

    secrets: dict[str, str] = field(default_factory=dict)
    services: dict[str, ServiceState] = field(default_factory=dict)
    seeded: dict[str, bool] = field(default_factory=dict)

    def secret(self, name: str) -> str:
        """The named secret, generated (``secrets.token_urlsafe``) on first use."""
        if name not in SECRET_NAMES:
            raise KeyError(f"unknown devstack secret {name!r}")
        if name not in self.secrets:
            # Access keys look like access keys (upper-case alphanumerics); the rest are opaque.
            if name == "s3_access_key":
                self.secrets[name] = "RAG" + secrets.token_hex(8).upper()
            else:
                self.secrets[name] = secrets.token_urlsafe(24)
        return self.secrets[name]

    def service(self, name: str) -> ServiceState:
        return self.services.setdefault(name, ServiceState())

    def to_json(self) -> dict[str, object]:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "secrets": dict(self.secrets),
            "services": {name: svc.to_json() for name, svc in self.services.items()},
            "seeded": dict(self.seeded),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StackState:
        version = data.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise DevStackError(
                f"devstack state file has format_version {version!r}, expected {STATE_FORMAT_VERSION}"
            )
        services = data.get("services") or {}
        return cls(
            secrets={str(k): str(v) for k, v in (data.get("secrets") or {}).items()},  # type: ignore[union-attr]
            services={str(k): ServiceState.from_json(v) for k, v in services.items()},  # type: ignore[union-attr]
            seeded={str(k): bool(v) for k, v in (data.get("seeded") or {}).items()},  # type: ignore[union-attr]
        )


def load_state(root: Path) -> StackState:
    path = root / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return StackState()
    try:
        return StackState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise DevStackError(
            f"devstack state file {path} is unreadable ({exc}); remove it after `down`"
        ) from exc


def save_state(root: Path, state: StackState) -> None:
    """Write the state atomically; the file is created 0600 before any secret is written to it."""
    path = root / STATE_FILE
    tmp = path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state.to_json(), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def stack_lock(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``<root>/.lock`` exclusively (between processes) for the duration of the block."""
    import time

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"another devstack command holds {root / LOCK_FILE} for more than {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)
