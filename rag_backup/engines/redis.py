"""Redis: the RDB taken as a replica receives it, verified, and restored two ways.

Backup: ``redis-cli --rdb`` asks the server for a full synchronisation (``REPLCONF rdb-only``),
so no access to the server's disk is needed and the file is the server's state at one fork. The
fingerprint (keys and expiring keys per db) is read from that file by loading it into a private,
temporary ``redis-server`` configured as a replica of nothing: a replica keeps keys whose TTL has
passed, so the counts are those of the file, and ``redis-check-rdb`` (the official parser) agrees
with them at verification.

Restore: (1) replay into a running server: keys are read from a temporary server holding the
backup and copied with DUMP / RESTORE ... ABSTTL, pipelined, keeping absolute expiry times;
(2) file mode for a stopped server: the RDB is placed atomically into its data directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import redis

from rag_backup import progress, repository
from rag_backup.engines.zstream import compress_into, decompress_artifact
from rag_backup.errors import (
    ConfirmationRequired,
    CredentialsRejected,
    IntegrityError,
    InvalidRequest,
    RagBackupError,
    StoreUnreachable,
    ToolError,
)
from rag_backup.proc import StreamingProcess, run, tail
from rag_backup.repository import BackupRecord, BackupRepository, PendingBackup

STORE = "redis"
RDB_ARTIFACT = "dump.rdb.zst"
PIPELINE_BATCH = 1000
KEYS = "keys"  # the unit of a replay's progress
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class RedisServer:
    """How to reach a Redis server. The password travels in the environment or the protocol."""

    host: str
    port: int
    password: str = field(repr=False, default="")
    username: str | None = None
    timeout_s: float = 30

    def describe(self, db: int | None = None) -> str:
        where = f"{self.host}:{self.port}"
        return f"Redis {where}" if db is None else f"Redis {where}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, username=self.username,
                           password=self.password or None, socket_timeout=self.timeout_s,
                           socket_connect_timeout=min(self.timeout_s, 10))

    def check(self) -> dict[str, Any]:
        """``INFO server`` if the server answers and accepts our credentials, else a clear error."""
        try:
            return self.client().info("server")
        except redis.AuthenticationError as exc:
            raise CredentialsRejected(f"{self.describe()} refused the login: {exc}; check "
                                      "RAG_REDIS_PASSWORD") from exc
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise CredentialsRejected(f"{self.describe()} refused the login: {exc}; check "
                                          "RAG_REDIS_PASSWORD") from exc
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnreachable(f"{self.describe()} is unreachable: {exc}") from exc

    def cli_args(self) -> list[str]:
        args = ["-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        return args + (["--user", self.username] if self.username else [])

    def cli_env(self) -> dict[str, str]:
        return {"REDISCLI_AUTH": self.password} if self.password else {}


def _binary(name: str, override: str | None = None) -> str:
    found = override or shutil.which(name)
    if not found:
        raise ToolError(f"{name} is not installed (Debian packages redis-server / redis-tools)")
    return found


@dataclass(frozen=True)
class DbCounts:
    """Keys, and keys with a TTL, of one Redis database."""

    keys: int
    expires: int


@dataclass(frozen=True)
class RedisFingerprint:
    """What a Redis backup holds, read from its RDB: keys and expiring keys per database, and
    the RDB's size. ``to_dict`` is what the manifest stores (``{"dbs": {"<db>": {"keys",
    "expires"}}, "keys", "expires", "rdb_bytes"}``)."""

    dbs: dict[int, DbCounts]
    rdb_bytes: int | None = None  # the uncompressed RDB (None: not recorded)

    @property
    def keys(self) -> int:
        return sum(d.keys for d in self.dbs.values())

    @property
    def expires(self) -> int:
        return sum(d.expires for d in self.dbs.values())

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "dbs": {str(db): {"keys": c.keys, "expires": c.expires}
                    for db, c in sorted(self.dbs.items())},
            "keys": self.keys, "expires": self.expires}
        if self.rdb_bytes is not None:
            doc["rdb_bytes"] = self.rdb_bytes
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RedisFingerprint:
        """The dict form back; ``ValueError`` saying what is wrong if it is not one."""
        if not isinstance(doc, dict) or not isinstance(doc.get("dbs"), dict):
            raise ValueError("it has no 'dbs' object")
        dbs = {}
        for db, counts in doc["dbs"].items():
            if not (isinstance(db, str) and db.isdigit() and isinstance(counts, dict)):
                raise ValueError(f"db entry {db!r}: {counts!r} is not a db number with counts")
            dbs[int(db)] = DbCounts(_count(counts, "keys", f"db {db}"),
                                    _count(counts, "expires", f"db {db}"))
        found = cls(dbs, _count(doc, "rdb_bytes", "the RDB") if "rdb_bytes" in doc else None)
        for total in ("keys", "expires"):
            if total in doc:
                _count(doc, total, "the total")
        repository.check_totals(doc, found, ("keys", "expires"), "dbs")
        return found


def _count(doc: dict[str, Any], name: str, what: str) -> int:
    value = doc.get(name)
    if type(value) is not int or value < 0:
        raise ValueError(f"{what}: {name} is {value!r}, not a count")
    return value


def fingerprint_of(source: BackupRecord | repository.Manifest | repository.BackupOutcome
                   ) -> RedisFingerprint:
    """The typed fingerprint of a backup (its record or manifest) or of a backup's outcome;
    an invalid one raises ``DamagedBackup`` naming the backup."""
    return repository.typed_fingerprint(source, STORE, RedisFingerprint.from_dict)


@dataclass(frozen=True)
class BackupOutcome(repository.BackupOutcome):
    @property
    def keys(self) -> int:
        return fingerprint_of(self).keys


# -- a private, temporary redis-server holding an RDB -------------------------------------

@contextmanager
def _private_server(conf: str, rdb: Path | None, *, binary: str | None,
                    timeout_s: float, password: str | None = None) -> Iterator[Path]:
    """A redis-server in a private 0700 directory (its config 0600), optionally loaded with
    ``rdb``; yields its unix socket once the data is loaded. Killed and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="rag-backup-redis-"))
    os.chmod(workdir, 0o700)
    if rdb is not None:
        try:
            os.link(rdb, workdir / "dump.rdb")
        except OSError:
            shutil.copyfile(rdb, workdir / "dump.rdb")
    sock = workdir / "redis.sock"
    config = workdir / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(
        f"unixsocket {sock}\nunixsocketperm 700\n"
        f"dir {workdir}\ndbfilename dump.rdb\n"
        'save ""\nappendonly no\ndaemonize no\n'
        "databases 256\nlogfile redis.log\n" + conf)
    proc = subprocess.Popen([_binary("redis-server", binary), str(config)],
                            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    client = redis.Redis(unix_socket_path=str(sock), password=password, socket_timeout=timeout_s)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log = workdir / "redis.log"
                raise IntegrityError(
                    "private redis-server stopped"
                    + (f" loading {rdb.name}" if rdb else "") + ": "
                    f"{tail(log.read_text(errors='replace') if log.exists() else '')}"
                    f"{tail(proc.stderr.read() if proc.stderr else b'')}")
            try:
                if sock.exists() and client.info("persistence").get("loading") == 0:
                    break
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise ToolError(f"private redis-server not ready within {timeout_s:.0f} s")
            time.sleep(0.05)
        yield sock
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def scratch_server(rdb: Path, *, binary: str | None = None,
                   timeout_s: float = 600) -> Iterator[Path]:
    """A private redis-server on a unix socket loaded with ``rdb``; yields the socket's path
    (connect with ``unix_client``).

    It is a replica of a port nobody listens on, so it keeps keys whose TTL has passed (a
    master drops them on load) and never expires anything while we read it."""
    conf = f"port 0\nreplicaof 127.0.0.1 {_closed_port()}\nreplica-read-only yes\n"
    with _private_server(conf, rdb, binary=binary, timeout_s=timeout_s) as sock:
        yield sock


@contextmanager
def scratch_target(*, binary: str | None = None, timeout_s: float = 600
                   ) -> Iterator[RedisServer]:
    """An empty private redis-server on a loopback port with a generated password: a scratch
    target for restore drills."""
    password, port = secrets.token_urlsafe(24), _closed_port()
    conf = f"port {port}\nbind 127.0.0.1\nrequirepass {password}\n"
    with _private_server(conf, None, binary=binary, timeout_s=timeout_s, password=password):
        yield RedisServer("127.0.0.1", port, password)


def unix_client(sock: Path, db: int, timeout_s: float) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(sock), db=db, socket_timeout=timeout_s)


def _closed_port() -> int:
    """A loopback port with nothing listening (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keyspace(client: redis.Redis) -> dict[int, DbCounts]:
    """Keys and expiring keys from INFO keyspace, for every non-empty db."""
    return {int(name[2:]): DbCounts(int(v["keys"]), int(v["expires"]))
            for name, v in client.info("keyspace").items() if name.startswith("db")}


def fingerprint_rdb(rdb: Path, *, binary: str | None = None,
                    timeout_s: float = 600) -> RedisFingerprint:
    """Keys and expiring keys per db of ``rdb`` (loaded into a private replica), and its size."""
    with scratch_server(rdb, binary=binary, timeout_s=timeout_s) as sock:
        client = unix_client(sock, 0, timeout_s)
        try:
            dbs = keyspace(client)
        finally:
            client.close()
    return RedisFingerprint(dbs, rdb.stat().st_size)


# -- backup --------------------------------------------------------------------------------

# redis-cli's words for a server that went away during the transfer (restart, killed link):
# transient, so the backup is retried; anything else (a refused login, a full disk) is not.
REDIS_CLI_TRANSIENT = (
    "Error reading bulk length while SYNCing", "I/O error", "Connection reset by peer",
    "Server closed the connection", "Could not connect to Redis", "Connection refused",
    "Error reading RDB", "Broken pipe",
)


def fetch_rdb(server: RedisServer, dest: Path, *, timeout_s: float) -> None:
    """``redis-cli --rdb``: the server's RDB as a replica receives it, into ``dest`` (its growth
    advances the current progress tracker). A transfer cut by the server is ``StoreWentAway``
    (retried)."""
    proc = StreamingProcess([_binary("redis-cli"), *server.cli_args(), "--rdb", str(dest)],
                            what=f"redis-cli --rdb from {server.describe()}",
                            timeout=timeout_s, env=server.cli_env(), stdout=False,
                            transient=REDIS_CLI_TRANSIENT)
    try:
        progress.follow(proc.proc, lambda: dest.stat().st_size if dest.exists() else 0)
        proc.wait()
    except BaseException:
        proc.abort()
        raise


def estimate_rdb_bytes(server: RedisServer, repo: BackupRepository) -> int | None:
    """About the size of the server's RDB, for progress: the newest backup's, else the dataset
    in the server's memory (an RDB is usually smaller). None if neither can be read."""
    try:
        for key in sorted(repo.partitions(STORE), reverse=True)[:3]:
            record = repo.get(STORE, key)
            size = fingerprint_of(record).rdb_bytes if record is not None else None
            if size:
                return size
        client = server.client()
        try:
            return int(client.info("memory").get("used_memory_dataset", 0)) or None
        finally:
            client.close()
    except (RagBackupError, redis.RedisError, ValueError):
        return None


def backup(server: RedisServer, pending: PendingBackup, *, timeout_s: float = 3600,
           zstd_level: int = 3, workdir: str | None = None,
           redis_server_bin: str | None = None, log: Log = _quiet) -> BackupOutcome:
    """Fetch the RDB, fingerprint it, and store it zstd-compressed in ``pending``."""
    info = server.check()
    with tempfile.TemporaryDirectory(prefix="rag-backup-redis-", dir=workdir) as tmp:
        rdb = Path(tmp) / "dump.rdb"
        started = time.monotonic()
        with progress.tracking(f"redis-cli --rdb from {server.describe()}",
                               estimate_rdb_bytes(server, pending.repo), estimated=True):
            fetch_rdb(server, rdb, timeout_s=timeout_s)
        log(f"RDB received from {server.describe()}: {rdb.stat().st_size} bytes in "
            f"{time.monotonic() - started:.1f} s")
        fingerprint = fingerprint_rdb(rdb, binary=redis_server_bin, timeout_s=timeout_s)
        with open(rdb, "rb") as source, progress.tracking(
                f"compressing the RDB of {server.describe()}", rdb.stat().st_size):
            compress_into(pending, RDB_ARTIFACT, source, zstd_level)
    versions = {"redis-cli": run([_binary("redis-cli"), "--version"], what="redis-cli --version",
                                 timeout=30).stdout.decode().strip()}
    return BackupOutcome(fingerprint.to_dict(), versions,
                         str(info.get("redis_version", "unknown")))


# -- verify --------------------------------------------------------------------------------

CHECK_RE = {name: re.compile(rf"\[info\] (\d+) {name}") for name in
            ("keys read", "expires", "already expired")}


def unpack(repo: BackupRepository, record: BackupRecord, dest: Path) -> Path:
    """The backup's RDB, checked against the manifest and decompressed to ``dest``."""
    artifact = next((a for a in record.manifest.artifacts if a.path == RDB_ARTIFACT), None)
    if artifact is None:
        raise IntegrityError(f"redis backup {record.partition_key}: manifest has no "
                             f"{RDB_ARTIFACT}")
    with open(dest, "wb") as out, progress.tracking(
            f"unpacking redis backup {record.partition_key}", artifact.size):
        decompress_artifact(repo, record, artifact, out=out)
    return dest


def check_rdb(rdb: Path, *, timeout_s: float = 3600) -> dict[str, int]:
    """``redis-check-rdb``'s verdict and counts; ``IntegrityError`` with its output if it fails."""
    try:
        proc = run([_binary("redis-check-rdb"), str(rdb)], what="redis-check-rdb",
                   timeout=timeout_s)
    except ToolError as exc:
        raise IntegrityError(f"redis-check-rdb rejects the RDB: {exc}") from exc
    out = proc.stdout.decode(errors="replace")
    counts = {}
    for name, pattern in CHECK_RE.items():
        match = pattern.search(out)
        if match is None:
            raise IntegrityError(f"redis-check-rdb printed no '{name}' count: {tail(out)}")
        counts[name.replace(" ", "_")] = int(match.group(1))
    return counts


def verify(repo: BackupRepository, record: BackupRecord, *, timeout_s: float = 3600,
           workdir: str | None = None) -> dict[str, Any]:
    """sha256 and size against the manifest, ``redis-check-rdb``, and its key counts against
    the fingerprint."""
    fp = fingerprint_of(record)
    with tempfile.TemporaryDirectory(prefix="rag-backup-redis-", dir=workdir) as tmp:
        counts = check_rdb(unpack(repo, record, Path(tmp) / "dump.rdb"), timeout_s=timeout_s)
    if counts["keys_read"] != fp.keys or counts["expires"] != fp.expires:
        raise IntegrityError(
            f"redis backup {record.partition_key}: redis-check-rdb reads {counts['keys_read']} "
            f"keys ({counts['expires']} expiring), the manifest records {fp.keys} "
            f"({fp.expires})")
    return {"keys_checked": counts["keys_read"], "expires_checked": counts["expires"]}


# -- restore: replay into a running server -------------------------------------------------

@dataclass(frozen=True)
class DbReport:
    db: int
    target_db: int
    in_backup: int
    restored: int
    skipped_existing: int
    skipped_expired: int
    skipped_pattern: bool


@dataclass(frozen=True)
class ReplayReport:
    target: str
    flushed: bool
    dbs: tuple[DbReport, ...]
    duration_s: float

    @property
    def restored(self) -> int:
        return sum(d.restored for d in self.dbs)

    @property
    def matches_manifest(self) -> bool:
        """Every key of the backup is accounted for (only meaningful without a key pattern)."""
        return all(d.restored + d.skipped_existing + d.skipped_expired == d.in_backup
                   for d in self.dbs if not d.skipped_pattern)


class _Wire:
    """A raw RESP connection: commands packed here, replies parsed by hiredis (C). A replay
    moves every key through Python once; redis-py's per-command packing and parsing made that
    the bottleneck (about 28x the server's own RDB load), this keeps it to bytes formatting."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock, self.where = sock, where
        self.reader = hiredis.Reader()

    @classmethod
    def unix(cls, path: Path, db: int, timeout_s: float) -> _Wire:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        wire = cls(sock, "the private redis-server")
        wire.call(b"SELECT", str(db).encode())
        return wire

    @classmethod
    def tcp(cls, server: RedisServer, db: int, timeout_s: float) -> _Wire:
        try:
            sock = socket.create_connection((server.host, server.port),
                                            timeout=min(timeout_s, 10))
        except OSError as exc:
            raise StoreUnreachable(f"{server.describe()} is unreachable: {exc}") from exc
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire = cls(sock, server.describe(db))
        try:
            if server.password:
                who = [server.username.encode()] if server.username else []
                wire.call(b"AUTH", *who, server.password.encode())
            wire.call(b"SELECT", str(db).encode())
        except ToolError as exc:
            wire.close()
            if "WRONGPASS" in str(exc) or "NOAUTH" in str(exc) or "AUTH" in str(exc):
                raise CredentialsRejected(f"{server.describe()} refused the login: {exc}; "
                                          "check RAG_REDIS_PASSWORD") from exc
            raise
        return wire

    def call(self, *args: bytes) -> Any:
        self.send(_command(*args))
        [reply] = self.replies(1)
        if isinstance(reply, hiredis.ReplyError):
            raise ToolError(f"{self.where}: {args[0].decode()} failed: {reply}")
        return reply

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise StoreUnreachable(f"{self.where} went away during the replay: {exc}") from exc

    def replies(self, n: int) -> list[Any]:
        out: list[Any] = []
        gets = self.reader.gets
        while len(out) < n:
            reply = gets()
            if reply is False:
                try:
                    data = self.sock.recv(1 << 20)
                except OSError as exc:
                    raise StoreUnreachable(f"{self.where} went away during the replay: "
                                           f"{exc}") from exc
                if not data:
                    raise StoreUnreachable(f"{self.where} closed the connection during the "
                                           "replay")
                self.reader.feed(data)
                continue
            out.append(reply)
        return out

    def close(self) -> None:
        self.sock.close()


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


def _copy_db(source: _Wire, target: _Wire, *, pattern: str, replace: bool
             ) -> tuple[int, int, int]:
    """SCAN ``source`` (a batch at a time); DUMP and PEXPIRETIME each key there; RESTORE it on
    ``target`` with its absolute expiry (ABSTTL). Three stages overlap: the source reads the
    next batch (and scans on) while this process turns the last one into RESTOREs and the
    target restores the one before. The target's replies are counted per key (OK, or BUSYKEY:
    an existing key kept)."""
    restored = existing = expired = 0
    flags = (b"$7\r\nREPLACE\r\n" if replace else b"") + b"$6\r\nABSTTL\r\n"
    arity = b"*%d\r\n$7\r\nRESTORE\r\n" % (6 if replace else 5)
    scan = b"*6\r\n$4\r\nSCAN\r\n$%%d\r\n%%b\r\n$5\r\nMATCH\r\n%b$5\r\nCOUNT\r\n%b" % (
        b"$%d\r\n%b\r\n" % (len(pattern.encode()), pattern.encode()),
        b"$%d\r\n%d\r\n" % (len(str(PIPELINE_BATCH)), PIPELINE_BATCH))
    in_flight = 0

    def count(replies: list[Any]) -> None:
        nonlocal restored, existing
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("BUSYKEY"):
                    existing += 1
                    continue
                raise ToolError(f"{target.where}: RESTORE failed: {reply}")
            restored += 1

    def read_batch(keys: list[bytes], cursor: bytes) -> bytes:
        """Ask for the keys' payloads and expiries, and for the next SCAN page (unless done)."""
        request = b"".join(
            b"*2\r\n$4\r\nDUMP\r\n$%d\r\n%b\r\n*2\r\n$11\r\nPEXPIRETIME\r\n"
            b"$%d\r\n%b\r\n" % (len(k), k, len(k), k) for k in keys)
        if cursor != b"0":
            request += scan % (len(cursor), cursor)
        source.send(request)
        return cursor

    source.send(scan % (1, b"0"))
    [[cursor, keys]] = source.replies(1)
    read_batch(keys, cursor)
    while True:
        values = source.replies(2 * len(keys) + (cursor != b"0"))
        batch = keys
        if cursor != b"0":  # the next page arrived behind the payloads: ask for its payloads
            cursor, keys = values.pop()
            read_batch(keys, cursor)
            done = False
        else:
            done = True
        now_ms = int(time.time() * 1000)
        out = []
        for key, payload, expire_at in zip(batch, values[0::2], values[1::2]):
            if payload is None or expire_at == -2 or 0 < expire_at <= now_ms:
                expired += 1
                continue
            at = b"%d" % (expire_at if expire_at > 0 else 0)
            out.append(arity + b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (
                len(key), key, len(at), at, len(payload), payload, flags))
        if out:
            target.send(b"".join(out))
        if in_flight:
            count(target.replies(in_flight))
        in_flight = len(out)
        progress.advance(len(batch), unit=KEYS)
        if done:
            break
    if in_flight:
        count(target.replies(in_flight))
    return restored, existing, expired


def replay(repo: BackupRepository, record: BackupRecord, target: RedisServer, *,
           dbs: Sequence[int] | None = None, target_db: int | None = None,
           pattern: str = "*", flush: bool = False, replace: bool = False,
           confirm: str = "", workdir: str | None = None, timeout_s: float = 3600,
           redis_server_bin: str | None = None, log: Log = _quiet) -> ReplayReport:
    """Copy keys of a backup into a running server, keeping absolute expiry times.

    ``dbs``: which databases of the backup (default: all); ``target_db`` sends a single source
    db into another db. Existing keys are left alone unless ``replace``; ``flush`` empties each
    target db first. Both are destructive and need ``confirm`` equal to ``host:port/db`` of the
    target (``host:port`` when several dbs are restored).
    """
    started = time.monotonic()
    in_backup = {db: c.keys for db, c in fingerprint_of(record).dbs.items()}
    chosen = sorted(in_backup) if dbs is None else sorted(set(dbs))
    unknown = [d for d in chosen if d not in in_backup]
    if unknown:
        raise InvalidRequest(f"redis backup {record.partition_key} has no keys in db(s) "
                             f"{unknown}; it has dbs {sorted(in_backup)}")
    if target_db is not None and len(chosen) != 1:
        raise InvalidRequest("target_db needs exactly one source db (set dbs to one db)")
    mapping = {db: (target_db if target_db is not None else db) for db in chosen}
    name = (f"{target.host}:{target.port}/{mapping[chosen[0]]}" if len(chosen) == 1
            else f"{target.host}:{target.port}")
    if (flush or replace) and confirm != name:
        raise ConfirmationRequired(
            f"{'flushing' if flush else 'replacing existing keys of'} {target.describe()} is "
            f"destructive: set confirm to {name!r} to proceed")
    target.check()
    reports = []
    with tempfile.TemporaryDirectory(prefix="rag-backup-redis-", dir=workdir) as tmp:
        rdb = unpack(repo, record, Path(tmp) / "dump.rdb")
        with scratch_server(rdb, binary=redis_server_bin, timeout_s=timeout_s) as sock, \
                progress.tracking(f"replaying redis backup {record.partition_key} into {name}",
                                  sum(in_backup[db] for db in chosen) if pattern == "*" else None,
                                  KEYS):
            for db, tdb in mapping.items():
                if flush:
                    with contextlib.closing(target.client(tdb)) as dst:
                        dst.flushdb()
                src = _Wire.unix(sock, db, timeout_s)
                dst = _Wire.tcp(target, tdb, timeout_s)
                try:
                    restored, existing, expired = _copy_db(src, dst, pattern=pattern,
                                                           replace=replace)
                    if pattern == "*":  # SCAN on a replica hides keys whose TTL has passed
                        expired += src.call(b"DBSIZE") - (restored + existing + expired)
                finally:
                    src.close()
                    dst.close()
                log(f"db {db} -> {target.describe(tdb)}: {restored} restored, {existing} "
                    f"existing kept, {expired} expired skipped")
                reports.append(DbReport(db, tdb, in_backup[db], restored, existing, expired,
                                        pattern != "*"))
    return ReplayReport(name, flush, tuple(reports), time.monotonic() - started)


# -- restore: file mode for a stopped server -----------------------------------------------

def servers_using(directory: Path) -> list[int]:
    """Pids of running redis-server processes whose working directory is ``directory``."""
    directory = directory.resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm.startswith("redis-server") and Path(os.readlink(entry / "cwd")) == directory:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@dataclass(frozen=True)
class PlaceReport:
    path: str
    bytes: int
    keys: int
    moved_aside: tuple[str, ...]


def place_rdb(repo: BackupRepository, record: BackupRecord, data_dir: str, *,
              filename: str = "dump.rdb", confirm: str = "", timeout_s: float = 3600
              ) -> PlaceReport:
    """Put the backup's RDB into a stopped server's data directory, atomically.

    Refused while a redis-server runs in that directory. An existing RDB, or an AOF (which Redis
    would load instead of the RDB), is moved aside, not deleted, and only with ``confirm`` equal
    to the directory's path."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise InvalidRequest(f"{data_dir} is not a directory")
    if "/" in filename or filename in ("", ".", ".."):
        raise InvalidRequest(f"unsafe RDB file name {filename!r}")
    running = servers_using(directory)
    if running:
        raise ConfirmationRequired(
            f"redis-server (pid {', '.join(map(str, running))}) is running in {data_dir}: it "
            "would overwrite or ignore the restored file; stop it first, or restore in replay "
            "mode")
    final = directory / filename
    in_the_way = [p for p in (final, directory / "appendonlydir", directory / "appendonly.aof")
                  if p.exists()]
    if in_the_way and confirm != str(directory):
        raise ConfirmationRequired(
            f"{', '.join(p.name for p in in_the_way)} exist(s) in {data_dir} (Redis loads an "
            f"AOF instead of the RDB): set confirm to {str(directory)!r} to move them aside")
    tmp = directory / f".{filename}.restore-{os.getpid()}"
    try:
        unpack(repo, record, tmp)
        counts = check_rdb(tmp, timeout_s=timeout_s)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        stat = directory.stat()
        if os.geteuid() == 0:
            os.chown(tmp, stat.st_uid, stat.st_gid)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for path in in_the_way:
            aside = path.with_name(f"{path.name}.before-restore-{stamp}")
            os.rename(path, aside)
            moved.append(aside.name)
        os.rename(tmp, final)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return PlaceReport(str(final), final.stat().st_size, counts["keys_read"], tuple(moved))
