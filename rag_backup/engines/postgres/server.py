"""The PostgreSQL server: how to reach it (``PostgresServer``: connection string, password in
the environment, the newest installed client tool), how a refused login and a server that went
away read, and what it has (versions, databases).
"""

from __future__ import annotations

import glob
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.extensions

from rag_backup.errors import (
    CredentialsRejected,
    InvalidRequest,
    StoreUnreachable,
    ToolError,
)
from rag_backup.proc import run, tail

AUTH_FAILURES = ("password authentication failed", "no password supplied",
                 "no pg_hba.conf entry", "role \"")
# libpq's and the server's words for a server that went away during a dump (restart, failover,
# a terminated backend, a cut connection): transient, so the backup is retried. A refused login,
# a permission error or a damaged table is not.
SERVER_WENT_AWAY = (
    "server closed the connection unexpectedly", "terminating connection due to",
    "could not connect to server", "Connection refused", "the database system is shutting down",
    "the database system is starting up", "the database system is in recovery mode",
    "could not receive data from server", "no connection to the server",
    "SSL connection has been closed unexpectedly", "lost synchronization with server",
    "Connection reset by peer", "connection timed out", "server conn crashed",
)


@dataclass(frozen=True)
class PostgresServer:
    """How to reach a PostgreSQL server. The password travels only in the environment."""

    host: str
    port: int
    user: str
    password: str = field(repr=False, default="")
    connect_timeout_s: int = 10
    bin_dir: str | None = None

    def describe(self) -> str:
        return f"PostgreSQL {self.user}@{self.host}:{self.port}"

    def dsn(self, database: str) -> str:
        """A libpq connection string without the password."""
        return psycopg2.extensions.make_dsn(
            host=self.host, port=self.port, user=self.user, dbname=database,
            connect_timeout=self.connect_timeout_s, application_name="rag-backup")

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}

    def tool(self, name: str) -> str:
        """The newest installed client binary (Debian keeps one per major version)."""
        if self.bin_dir:
            return str(Path(self.bin_dir) / name)
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                            key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                            else 0)
        found = candidates[-1] if candidates else shutil.which(name)
        if not found:
            raise ToolError(f"{name} is not installed (Debian package postgresql-client)")
        return found

    def connect(self, database: str) -> psycopg2.extensions.connection:
        try:
            return psycopg2.connect(self.dsn(database), password=self.password or None)
        except psycopg2.OperationalError as exc:
            text = tail(str(exc))
            if any(marker in text for marker in AUTH_FAILURES):
                raise CredentialsRejected(
                    f"{self.describe()} refused the login to database {database!r}: {text}; "
                    "check RAG_PG_USER / RAG_PG_PASSWORD") from exc
            if f'database "{database}" does not exist' in text:
                raise InvalidRequest(f"{self.describe()} has no database {database!r}") from exc
            raise StoreUnreachable(f"{self.describe()}, database {database!r}: {text}") from exc


def list_databases(server: PostgresServer) -> list[str]:
    """Every database that accepts connections, except templates."""
    conn = server.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE NOT datistemplate "
                        "AND datallowconn ORDER BY datname")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def server_version(server: PostgresServer) -> str:
    conn = server.connect("postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return cur.fetchone()[0]
    finally:
        conn.close()


def tool_version(server: PostgresServer, name: str) -> str:
    return run([server.tool(name), "--version"], what=f"{name} --version",
               timeout=30).stdout.decode().strip()


def _database_exists(admin, name: str) -> bool:
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None


def check_credentials(server: PostgresServer) -> None:
    """Fail early with a clear error when the server is unreachable or refuses the login."""
    server.connect("postgres").close()
