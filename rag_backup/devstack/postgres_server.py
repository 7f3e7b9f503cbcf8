"""PostgreSQL from the Debian server binaries, run as the ``postgres`` OS user when we are root.

Layout under ``<root>/postgres`` (owned by the server's OS user, 0700): ``data/`` (the cluster),
``run/`` (the unix socket). Authentication:

- TCP on 127.0.0.1 only, ``scram-sha-256`` for every role: a wrong password fails.
- The unix socket (0700, inside the root) uses ``peer`` authentication with an ident map that
  lets the OS users ``root``, ``postgres`` and the invoking user log in as ``rag_admin``; the
  stack uses it to set the passwords, so no password ever reaches ``initdb`` or a command line.

Passwords are sent as SCRAM verifiers computed here, so not even the server log can show them.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import hmac
import os
import pwd
import re
import shutil
import signal
import stat
from pathlib import Path

from rag_backup.devstack.base import Launch, Service, base_env, write_private
from rag_backup.devstack.procs import DevStackError, run_tool
from rag_backup.engines.postgres.pitr.instance import socket_dir_for
from rag_backup.devstack.settings import (
    DAGSTER_DB,
    DAGSTER_USER,
    PG_ADMIN_USER,
    RAGQA_DB,
    RAGQA_USER,
)

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
INITDB_TIMEOUT_S = 120.0
HOST = "127.0.0.1"

# (role, secret name, database owned by the role)
APP_ROLES = (
    (DAGSTER_USER, "pg_dagster_password", DAGSTER_DB),
    (RAGQA_USER, "pg_ragqa_password", RAGQA_DB),
)


def find_pg_bindir(explicit: Path | None = None) -> Path:
    """The newest installed server: Debian's ``/usr/lib/postgresql/<ver>/bin``, else ``initdb`` on PATH."""
    if explicit is not None:
        return explicit
    versions = []
    if DEBIAN_PG_ROOT.is_dir():
        for child in DEBIAN_PG_ROOT.iterdir():
            if child.name.isdigit() and (child / "bin" / "postgres").exists():
                versions.append((int(child.name), child / "bin"))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise DevStackError(
        "postgres: no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH); "
        "install the Debian package postgresql (or postgresql-15)"
    )


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def ensure_traversable(path: Path, uid: int, gids: set[int]) -> list[Path]:
    """Give ``uid`` search (x) permission on every ancestor of ``path`` that lacks it.

    Needed when we are root and the server runs as ``postgres`` under a 0700 directory (pytest's
    temporary directories are). Adds only the execute bit (others can traverse, not list).
    Returns the directories that were changed.
    """
    changed = []
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            needed = stat.S_IXUSR
        elif st.st_gid in gids:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not st.st_mode & needed:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | needed)
            changed.append(directory)
    return changed


class PostgresService(Service):
    name = "postgres"
    startup_timeout_s = 60.0
    # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect;
    # SIGINT is the "fast" shutdown (roll back open transactions, then exit cleanly).
    stop_signal = signal.SIGINT
    stop_grace_s = 20.0

    def __init__(self, root: Path, state, bindir: Path | None = None) -> None:
        super().__init__(root, state)
        self.bindir = find_pg_bindir(bindir)
        self.data_dir = self.dir / "data"
        # run/ beside the data, or a short directory under /tmp when that path is too long for a
        # unix socket (deep pytest work directories are)
        self.socket_dir = socket_dir_for(self.data_dir)
        self.run_as = "postgres" if os.geteuid() == 0 else None

    # -- identity of the server's OS user ---------------------------------------------------------
    def _owner(self) -> tuple[int, int] | None:
        if self.run_as is None:
            return None
        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError as exc:
            raise DevStackError(
                "postgres: running as root needs the OS user 'postgres' to run the server "
                "(install the Debian package postgresql, or `useradd --system postgres`)"
            ) from exc
        return entry.pw_uid, entry.pw_gid

    def _make_owned_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        owner = self._owner()
        if owner is not None:
            os.chown(path, *owner)

    # -- lifecycle --------------------------------------------------------------------------------
    def prepare(self) -> None:
        owner = self._owner()
        self._make_owned_dir(self.dir)
        self._make_owned_dir(self.socket_dir)
        if owner is not None:
            gids = {owner[1], *os.getgrouplist(self.run_as, owner[1])}  # type: ignore[arg-type]
            ensure_traversable(self.dir, owner[0], gids)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        if self.data_dir.exists():  # an interrupted initdb: start over
            shutil.rmtree(self.data_dir)
        run_tool(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                PG_ADMIN_USER,
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
            ],
            service="postgres",
            timeout_s=INITDB_TIMEOUT_S,
            env=base_env(),
            cwd=self.dir,
            user=self.run_as,
        )
        owner = self._owner()
        write_private(self.data_dir / "pg_hba.conf", self._hba(), owner=owner)
        write_private(self.data_dir / "pg_ident.conf", self._ident(), owner=owner)
        conf = self.data_dir / "postgresql.conf"
        with open(conf, "a", encoding="utf-8") as handle:
            handle.write(
                "\n# rag_backup.devstack: ports, sockets and auth are rewritten on every start\n"
            )
            handle.write("include_if_exists = 'devstack.conf'\n")

    @staticmethod
    def _hba() -> str:
        return (
            "# Written by rag_backup.devstack.\n"
            "# TYPE  DATABASE     USER  ADDRESS        METHOD\n"
            "local   all          all                  peer map=devstack\n"
            "local   replication  all                  peer map=devstack\n"
            f"host    all          all   {HOST}/32   scram-sha-256\n"
            f"host    replication  all   {HOST}/32   scram-sha-256\n"
        )

    def _ident(self) -> str:
        users = {"root", "postgres", getpass.getuser()}
        lines = [
            "# Written by rag_backup.devstack: OS users that may use the socket as rag_admin."
        ]
        lines += [f"devstack  {user}  {PG_ADMIN_USER}" for user in sorted(users)]
        return "\n".join(lines) + "\n"

    def cleanup_after_death(self) -> None:
        # Our recorded postmaster is gone; its lock file would only confuse the next start.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()

    def configure(self, ports: dict[str, int]) -> None:
        text = (
            "# Written by rag_backup.devstack on every start.\n"
            f"listen_addresses = '{HOST}'\n"
            f"port = {ports['port']}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "unix_socket_permissions = 0700\n"
            "password_encryption = 'scram-sha-256'\n"
            "log_line_prefix = '%m [%p] %q%u@%d '\n"
            "log_timezone = 'UTC'\n"
            "timezone = 'UTC'\n"
            "# The WAL receiver streams through a replication slot (wal_level replica is the\n"
            "# default); a slot whose receiver is away may hold this much WAL, no more.\n"
            "max_slot_wal_keep_size = '2GB'\n"
        )
        write_private(self.data_dir / "devstack.conf", text, owner=self._owner())

    def launch(self) -> Launch:
        return Launch(
            argv=[str(self.bindir / "postgres"), "-D", str(self.data_dir)],
            env=base_env(),
            cwd=self.data_dir,
            user=self.run_as,
        )

    def _socket_connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=PG_ADMIN_USER,
            dbname=dbname,
            connect_timeout=3,
            application_name="rag_backup.devstack",
        )

    def probe(self) -> bool:
        with contextlib.closing(self._socket_connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)

    def after_start(self) -> None:
        """Set every password (as SCRAM verifiers) and create the application roles and databases."""
        with contextlib.closing(self._socket_connect()) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    f"ALTER ROLE {PG_ADMIN_USER} WITH PASSWORD %s",
                    (scram_sha256_verifier(self.state.secret("pg_admin_password")),),
                )
                for role, secret_name, database in APP_ROLES:
                    _ensure_role(
                        cur, role, scram_sha256_verifier(self.state.secret(secret_name))
                    )
                    _ensure_database(cur, database, role)
        self._check_password_login()

    def _check_password_login(self) -> None:
        import psycopg2

        try:
            with contextlib.closing(
                psycopg2.connect(
                    host=HOST,
                    port=self.port,
                    user=PG_ADMIN_USER,
                    password=self.state.secret("pg_admin_password"),
                    dbname="postgres",
                    connect_timeout=5,
                )
            ):
                pass
        except psycopg2.Error as exc:
            raise DevStackError(
                f"postgres: password login over TCP on {HOST}:{self.port} failed: {exc}"
            ) from exc

    def env(self) -> dict[str, str]:
        return {
            "RAG_PG_HOST": HOST,
            "RAG_PG_PORT": str(self.port),
            "RAG_PG_USER": PG_ADMIN_USER,
            "RAG_PG_PASSWORD": self.state.secret("pg_admin_password"),
            "DAGSTER_PG_HOST": HOST,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": DAGSTER_USER,
            "DAGSTER_PG_PASSWORD": self.state.secret("pg_dagster_password"),
            "DAGSTER_PG_DB": DAGSTER_DB,
        }

    def describe(self) -> str:
        version = (
            (self.data_dir / "PG_VERSION").read_text(encoding="utf-8").strip()
            if self.data_dir.exists()
            else "?"
        )
        return f"port {self.port}, PostgreSQL {version} from {self.bindir}"


_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def _quote_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"unexpected identifier {name!r}")
    return name


def _ensure_role(cur, role: str, verifier: str) -> None:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    verb = "ALTER" if cur.fetchone() else "CREATE"
    cur.execute(
        f"{verb} ROLE {_quote_ident(role)} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %s",
        (verifier,),
    )


def _ensure_database(cur, database: str, owner: str) -> None:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
    if not cur.fetchone():
        cur.execute(
            f"CREATE DATABASE {_quote_ident(database)} OWNER {_quote_ident(owner)} "
            "ENCODING 'UTF8' TEMPLATE template0"
        )
        # Only the owner (and superusers) may connect to an application's database.
        cur.execute(
            f"REVOKE CONNECT, TEMPORARY ON DATABASE {_quote_ident(database)} FROM PUBLIC"
        )
