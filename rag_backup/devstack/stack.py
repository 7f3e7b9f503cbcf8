"""``DevStack``: start, reuse, seed and stop the local PostgreSQL, Redis, S3 and Milvus servers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rag_backup.devstack.base import Service
from rag_backup.devstack.milvus_server import MilvusService
from rag_backup.devstack.postgres_server import PostgresService
from rag_backup.devstack.procs import (
    DevStackError,
    ServiceExited,
    is_running,
    rotate_log,
    spawn,
    stop_process_group,
    wait_ready,
)
from rag_backup.devstack.redis_server import RedisService
from rag_backup.devstack.s3_server import S3Service
from rag_backup.devstack.wal_receiver import WalReceiverService
from rag_backup.devstack.state import (
    SECRET_NAMES,
    StackState,
    load_state,
    save_state,
    stack_lock,
)

SERVICE_NAMES = ("postgres", "redis", "s3", "milvus", "walreceiver")
SERVICE_CLASSES: dict[str, type[Service]] = {
    "postgres": PostgresService,
    "redis": RedisService,
    "s3": S3Service,
    "milvus": MilvusService,
    "walreceiver": WalReceiverService,
}
SEEDED_SERVICES = ("postgres", "redis", "s3", "milvus")  # the stores; the receiver has no seed
START_ATTEMPTS = 3  # a new set of ports each time the server could not bind
REUSE_PROBE_TIMEOUT_S = 20.0


def default_root() -> Path:
    """``$RAG_DEVSTACK_ROOT``, else ``<project>/.devstack`` (the directory holding pyproject.toml)."""
    override = os.environ.get("RAG_DEVSTACK_ROOT")
    if override:
        return Path(override)
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").exists():
            return parent / ".devstack"
    return Path.cwd() / ".devstack"


def parse_services(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate service names (a sequence, or a comma-separated string); keep the canonical order."""
    if names is None:
        return SERVICE_NAMES
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    wanted = {n.strip() for n in names}
    unknown = wanted - set(SERVICE_NAMES)
    if unknown:
        raise DevStackError(
            f"unknown devstack service(s) {sorted(unknown)}; choose from {', '.join(SERVICE_NAMES)}"
        )
    return tuple(n for n in SERVICE_NAMES if n in wanted)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    port: int | None
    detail: str

    def __str__(self) -> str:
        if self.running:
            return f"running (pid {self.pid}, port {self.port})"
        return "stopped"


class DevStack:
    """The embedded local stack: real servers on free loopback ports, all state under ``root``.

    >>> stack = DevStack(root=Path(".devstack"), services=("postgres", "redis", "s3", "milvus"))
    >>> env = stack.up(seed=True)   # idempotent
    >>> stack.down()                # stops exactly what the stack started
    """

    def __init__(
        self,
        root: Path | str | None = None,
        services: Sequence[str] | str | None = SERVICE_NAMES,
        *,
        pg_bindir: Path | None = None,
        cache_dir: Path | None = None,
        corpus_documents: int = 2000,
    ) -> None:
        self.root = (
            Path(root).resolve() if root is not None else default_root().resolve()
        )
        self.services = parse_services(services)
        self.pg_bindir = pg_bindir
        self.cache_dir = cache_dir
        # The sample data's size: documents, with 1.5 conversations and 0.5 feedback each (the
        # demo's 2,000; the test session seeds fewer: its drills copy every object).
        self.corpus_documents = corpus_documents
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self._state_lock = threading.Lock()
        # Seconds each start and each seeding took in the last `up` (empty: all reused).
        self.timings: dict[str, float] = {}

    # -- paths ------------------------------------------------------------------------------------
    @property
    def repository_dir(self) -> Path:
        return self.root / "repository"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    def _prepare_root(self) -> None:
        fresh = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.root.chmod(0o700)
        (self.root / "logs").mkdir(mode=0o700, exist_ok=True)
        self.repository_dir.mkdir(exist_ok=True)
        self.dagster_home.mkdir(exist_ok=True)

    def _service(self, name: str, state: StackState) -> Service:
        if name == "postgres":
            return PostgresService(self.root, state, bindir=self.pg_bindir)
        if name == "milvus":
            return MilvusService(self.root, state, cache_dir=self.cache_dir)
        return SERVICE_CLASSES[name](self.root, state)

    def _save(self, state: StackState) -> None:
        with self._state_lock:
            save_state(self.root, state)

    # -- up ---------------------------------------------------------------------------------------
    def up(self, seed: bool = True) -> dict[str, str]:
        """Start (or reuse) every service, seed the ones not seeded yet, return the environment.

        Services start in parallel and each is seeded as soon as it answers. If anything fails,
        the services this call started are stopped again (running ones it reused are kept).
        """
        self._prepare_root()
        self.timings = {}
        with stack_lock(self.root):
            state = load_state(self.root)
            # Generate secrets and entries before the worker threads share the state.
            for secret in SECRET_NAMES:
                state.secret(secret)
            for name in self.services:
                state.service(name)
            self._save(state)
            services = {name: self._service(name, state) for name in self.services}
            outcomes: dict[str, str] = {}
            errors: list[BaseException] = []

            def bring_up(svc: Service) -> None:
                outcomes[svc.name] = self._ensure_running(svc, state)
                if seed and not state.seeded.get(svc.name) and svc.name in SEEDED_SERVICES:
                    self._seed_one(svc, state)

            # Services that need another one (the WAL receiver needs PostgreSQL) start after
            # the others answer.
            first = [s for s in services.values() if not getattr(s, "depends_on", ())]
            then = [s for s in services.values() if getattr(s, "depends_on", ())]
            for wave in (first, then):
                if not wave or errors:
                    continue
                with ThreadPoolExecutor(
                    max_workers=len(wave), thread_name_prefix="devstack-up"
                ) as pool:
                    futures = [pool.submit(bring_up, svc) for svc in wave]
                    for future in futures:
                        try:
                            future.result()
                        except BaseException as exc:  # noqa: BLE001 - collected, re-raised
                            errors.append(exc)
            if errors:
                started = [n for n, outcome in outcomes.items() if outcome == "started"]
                self._stop(state, started)
                raise _combine(errors)
            return self._env(state, services.values())

    def _ensure_running(self, svc: Service, state: StackState) -> str:
        """Reuse the recorded process if it answers, else (re)start it. Returns "reused" or "started"."""
        record = svc.svc_state.process
        if record is not None:
            if is_running(record):
                try:
                    wait_ready(
                        service=svc.name,
                        probe=svc.probe,
                        popen=self._popens.get(svc.name),
                        record=record,
                        timeout_s=min(REUSE_PROBE_TIMEOUT_S, svc.startup_timeout_s),
                    )
                    return "reused"
                except DevStackError:
                    pass  # alive but not answering: replace it
            self._stop_one(svc.name, state)
            svc.cleanup_after_death()
        started = time.monotonic()
        svc.prepare()
        for attempt in range(START_ATTEMPTS):
            ports = svc.choose_ports(fresh=attempt > 0)
            with self._state_lock:
                svc.svc_state.ports = ports
            svc.configure(ports)
            launch = svc.launch()
            rotate_log(svc.log_path)
            popen, record = spawn(
                launch.argv,
                log_path=svc.log_path,
                env=launch.env,
                cwd=launch.cwd,
                user=launch.user,
            )
            self._popens[svc.name] = popen
            with self._state_lock:
                svc.svc_state.process = record
                if not svc.persistent:  # a fresh in-memory server has lost the seed
                    state.seeded[svc.name] = False
                save_state(self.root, state)
            try:
                wait_ready(
                    service=svc.name,
                    probe=svc.probe,
                    popen=popen,
                    record=record,
                    timeout_s=svc.startup_timeout_s,
                )
                svc.after_start()
            except ServiceExited as exc:
                self._stop_one(svc.name, state)
                if exc.bind_failure and attempt + 1 < START_ATTEMPTS:
                    continue  # somebody took one of our ports between choosing and binding
                raise
            except BaseException:
                self._stop_one(svc.name, state)
                raise
            self.timings[svc.name] = round(time.monotonic() - started, 2)
            return "started"
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _seed_one(self, svc: Service, state: StackState) -> None:
        from rag_backup.devstack import seed as seed_module

        started = time.monotonic()
        try:
            corpus = seed_module.build_corpus(
                n_documents=self.corpus_documents,
                n_conversations=self.corpus_documents * 3 // 2,
                n_feedback=self.corpus_documents // 2)
            seed_module.SEEDERS[svc.name](svc.env(), corpus)
        except Exception as exc:
            raise DevStackError(
                f"{svc.name}: seeding failed: {exc}; server log: {svc.log_path}"
            ) from exc
        with self._state_lock:
            state.seeded[svc.name] = True
            save_state(self.root, state)
        self.timings[f"seed_{svc.name}"] = round(time.monotonic() - started, 2)

    # -- down -------------------------------------------------------------------------------------
    def down(self, services: Sequence[str] | str | None = None) -> list[str]:
        """Stop the recorded processes (all, or the named services). Returns the names stopped."""
        if not (self.root / "state.json").exists():
            return []
        with stack_lock(self.root):
            state = load_state(self.root)
            names = (
                parse_services(services)
                if services is not None
                else tuple(n for n in SERVICE_NAMES if n in state.services)
            )
            return self._stop(state, names)

    def _stop(self, state: StackState, names: Iterable[str]) -> list[str]:
        names = [
            n
            for n in names
            if n in state.services and state.services[n].process is not None
        ]
        if not names:
            return []
        # What depends on another service stops first (the receiver before PostgreSQL).
        dependents = [n for n in names if getattr(SERVICE_CLASSES[n], "depends_on", ())]
        for wave in (dependents, [n for n in names if n not in dependents]):
            if not wave:
                continue
            with ThreadPoolExecutor(
                max_workers=len(wave), thread_name_prefix="devstack-down"
            ) as pool:
                for future in [pool.submit(self._stop_one, name, state) for name in wave]:
                    future.result()
        return names

    def _stop_one(self, name: str, state: StackState) -> None:
        svc_state = state.services[name]
        record = svc_state.process
        if record is None:
            return
        cls = SERVICE_CLASSES[name]
        stop_process_group(
            record,
            first_signal=cls.stop_signal,
            grace_s=cls.stop_grace_s,
            popen=self._popens.pop(name, None),
        )
        with self._state_lock:
            svc_state.process = None
            if not cls.persistent:
                state.seeded[name] = False
            save_state(self.root, state)

    # -- status / env -----------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """``service -> "running (pid N, port P)"`` or ``"stopped"``; never a secret."""
        return {name: str(s) for name, s in self.service_status().items()}

    def service_status(self) -> dict[str, ServiceStatus]:
        state = load_state(self.root)
        names = [n for n in SERVICE_NAMES if n in self.services or n in state.services]
        result = {}
        for name in names:
            svc_state = state.services.get(name)
            record = svc_state.process if svc_state else None
            running = record is not None and is_running(record)
            port = svc_state.ports.get("port") if svc_state else None
            detail = self._service(name, state).describe() if running else "stopped"
            result[name] = ServiceStatus(
                name, running, record.pid if running and record else None, port, detail
            )
        return result

    def env(self) -> dict[str, str]:
        """Connection settings of the running services (plus the repository and DAGSTER_HOME)."""
        state = load_state(self.root)
        running = [
            self._service(name, state)
            for name in SERVICE_NAMES
            if name in state.services
            and state.services[name].process is not None
            and is_running(state.services[name].process)  # type: ignore[arg-type]
        ]
        return self._env(state, running)

    def _env(self, state: StackState, services: Iterable[Service]) -> dict[str, str]:
        env = {
            "RAG_BACKUP_REPOSITORY": str(self.repository_dir),
            "DAGSTER_HOME": str(self.dagster_home),
        }
        for svc in services:
            env.update(svc.env())
        return env

    def pids(self) -> dict[str, int]:
        """Pid of each running service's leader process."""
        return {
            name: s.pid
            for name, s in self.service_status().items()
            if s.running and s.pid is not None
        }

    def ports(self) -> dict[str, dict[str, int]]:
        """Every port recorded for each service (Milvus has a dozen)."""
        state = load_state(self.root)
        return {name: dict(s.ports) for name, s in state.services.items()}


def _combine(errors: list[BaseException]) -> BaseException:
    if len(errors) == 1:
        return errors[0]
    return DevStackError(
        "several devstack services failed:\n\n" + "\n\n".join(str(e) for e in errors)
    )
