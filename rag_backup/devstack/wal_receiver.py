"""The WAL receiver (``python -m rag_backup wal-receiver``) as a service of the local stack: it
streams the stack's PostgreSQL WAL into the stack's repository, so point-in-time recovery
works on the embedded stack as it does in production.

It has no port of its own and starts after PostgreSQL (``depends_on``); the stack's
PostgreSQL is configured for it (``wal_level = replica``, the default, and
``max_slot_wal_keep_size`` so a stopped receiver cannot fill the disk).
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime
from pathlib import Path

from rag_backup.devstack.base import Launch, Service, base_env
from rag_backup.devstack.postgres_server import PostgresService

SWITCH_AFTER_S = 60


class WalReceiverService(Service):
    name = "walreceiver"
    port_names: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ("postgres",)
    startup_timeout_s = 60.0
    stop_signal = signal.SIGTERM  # the receiver archives what it completed, then exits
    stop_grace_s = 30.0

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @property
    def spool(self) -> Path:
        return self.dir / "spool"

    def prepare(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)

    def configure(self, ports: dict[str, int]) -> None:
        pass

    def launch(self) -> Launch:
        env = base_env()
        pg = PostgresService(self.root, self.state).env()
        env.update({name: value for name, value in pg.items() if name.startswith("RAG_PG_")})
        env.update({"RAG_BACKUP_REPOSITORY": str(self.repository),
                    "RAG_PG_WAL_DIR": str(self.spool),
                    "RAG_PG_WAL_SWITCH_AFTER_S": str(SWITCH_AFTER_S)})
        return Launch(argv=[sys.executable, "-m", "rag_backup", "wal-receiver"], env=env,
                      cwd=self.dir)

    def probe(self) -> bool:
        """Ready once this process has reported to the repository (it reached the server)."""
        record = self.svc_state.process
        status = self.repository / "postgres_wal" / "status.json"
        if record is None or not status.exists():
            return False
        doc = json.loads(status.read_text(encoding="utf-8"))
        return doc.get("receiver", "").endswith(f"pid {record.pid}") and \
            datetime.fromisoformat(doc["updated_at"]).timestamp() > 0

    def env(self) -> dict[str, str]:
        return {"RAG_PG_WAL_DIR": str(self.spool)}

    def describe(self) -> str:
        return f"streaming the stack's PostgreSQL WAL into {self.repository}/postgres_wal"
