"""The shape every devstack service has; ``stack.DevStack`` drives them through it."""

from __future__ import annotations

import abc
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from rag_backup.devstack.procs import free_ports, port_is_free
from rag_backup.devstack.state import ServiceState, StackState


@dataclass(frozen=True)
class Launch:
    """How to start a service's server process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    user: str | None = None


def base_env() -> dict[str, str]:
    """A minimal environment for servers: nothing of ours (no secrets, no AWS_* or RAG_* variables)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    for name in ("TZ", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class Service(abc.ABC):
    """One server process of the stack.

    Lifecycle, driven by the stack: ``prepare`` (one-time setup such as ``initdb``), then per
    start attempt ``configure(ports)`` and ``launch()``, then ``probe()`` until it answers, then
    ``after_start()`` (idempotent provisioning: roles, buckets). ``env()`` is the service's part
    of the environment-variable contract.
    """

    name: str = ""
    port_names: tuple[str, ...] = ("port",)
    startup_timeout_s: float = 60.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_grace_s: float = 15.0
    # False if the server keeps its data in memory only: a fresh start loses the seed.
    persistent: bool = True

    def __init__(self, root: Path, state: StackState) -> None:
        self.root = root
        self.state = state
        self.dir = root / self.name
        self.log_path = root / "logs" / f"{self.name}.log"

    @property
    def svc_state(self) -> ServiceState:
        return self.state.service(self.name)

    @property
    def ports(self) -> dict[str, int]:
        return self.svc_state.ports

    @property
    def port(self) -> int:
        return self.ports["port"]

    def choose_ports(self, *, fresh: bool) -> dict[str, int]:
        """Reuse the recorded ports if they are all still free, otherwise ask the kernel for new ones."""
        recorded = self.ports
        if (
            not fresh
            and set(recorded) == set(self.port_names)
            and all(port_is_free(p) for p in recorded.values())
        ):
            return dict(recorded)
        return dict(zip(self.port_names, free_ports(len(self.port_names)), strict=True))

    def prepare(self) -> None:
        """One-time setup before the first start (data directories, ``initdb``, binaries)."""

    def cleanup_after_death(self) -> None:
        """Remove leftovers of a process that died without shutting down (stale lock files)."""

    @abc.abstractmethod
    def configure(self, ports: dict[str, int]) -> None:
        """Write the configuration for a start on ``ports``."""

    @abc.abstractmethod
    def launch(self) -> Launch:
        """The command that starts the server (secrets never on argv)."""

    @abc.abstractmethod
    def probe(self) -> bool:
        """True once the server answers requests with the stack's credentials."""

    def after_start(self) -> None:
        """Idempotent provisioning once the server answers."""

    @abc.abstractmethod
    def env(self) -> dict[str, str]:
        """This service's connection settings (the environment-variable contract)."""

    def describe(self) -> str:
        """Non-secret description for ``status``."""
        return f"port {self.port}"


def write_private(
    path: Path, text: str, *, owner: tuple[int, int] | None = None
) -> None:
    """Write ``text`` to a file that is 0600 from its creation (it may hold a secret)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
