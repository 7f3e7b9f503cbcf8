"""redis-server with a password, bound to 127.0.0.1, data under ``<root>/redis/data``.

The configuration (which holds ``requirepass``) is a 0600 file; the password is never on argv.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rag_backup.devstack.base import Launch, Service, base_env, write_private
from rag_backup.devstack.procs import DevStackError

HOST = "127.0.0.1"


def find_redis_server() -> Path:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise DevStackError(
            "redis: redis-server not found on PATH; install the Debian package redis-server"
        )
    return Path(found)


class RedisService(Service):
    name = "redis"
    startup_timeout_s = 30.0

    def __init__(self, root: Path, state) -> None:
        super().__init__(root, state)
        self.binary = find_redis_server()
        self.data_dir = self.dir / "data"
        self.conf_path = self.dir / "redis.conf"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)

    def configure(self, ports: dict[str, int]) -> None:
        text = (
            "# Written by rag_backup.devstack on every start (0600: it holds the password).\n"
            f"bind {HOST}\n"
            "protected-mode yes\n"
            f"port {ports['port']}\n"
            f"requirepass {self.state.secret('redis_password')}\n"
            f"dir {self.data_dir}\n"
            "dbfilename dump.rdb\n"
            "daemonize no\n"
            'logfile ""\n'
            # Backups take the RDB stream as a replica would (`redis-cli --rdb`); the server waits
            # repl-diskless-sync-delay seconds (5 by default) for more replicas before it starts the
            # transfer. The devstack has no other replicas, so 0 spares every backup and test 5 s.
            "repl-diskless-sync-delay 0\n"
        )
        write_private(self.conf_path, text)

    def launch(self) -> Launch:
        return Launch(
            argv=[str(self.binary), str(self.conf_path)], env=base_env(), cwd=self.dir
        )

    def probe(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One short attempt: while we wait, the process may die, or something else may hold the port
        # (and accept connections without ever answering us); redis-py's default retries would hide both.
        client = redis.Redis(
            host=HOST,
            port=self.port,
            password=self.state.secret("redis_password"),
            socket_timeout=2,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        finally:
            client.close()

    def env(self) -> dict[str, str]:
        return {
            "RAG_REDIS_HOST": HOST,
            "RAG_REDIS_PORT": str(self.port),
            "RAG_REDIS_PASSWORD": self.state.secret("redis_password"),
        }

    def describe(self) -> str:
        return f"port {self.port}, data {self.data_dir}"
