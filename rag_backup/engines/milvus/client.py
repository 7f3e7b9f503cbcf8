"""The Milvus server: how to reach it (``MilvusServer``, sessions), pymilvus/gRPC
failures as our errors (``translate``, ``calls``), version, listing, counts, load state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from rag_backup.errors import (
    CredentialsRejected,
    InvalidRequest,
    RagBackupError,
    StoreUnreachable,
    ToolError,
)


@dataclass(frozen=True)
class MilvusServer:
    """How to reach a Milvus server. The token travels in gRPC metadata only, never in a message.

    ``storage_root`` is where the server keeps its binlogs, as the server sees it (see the
    docstring of ``auto_id``); only restores of auto_id collections in ``import`` mode need it.
    """

    uri: str
    token: str = field(repr=False, default="")
    db_name: str = "default"
    timeout_s: float = 120.0
    long_timeout_s: float = 3600.0
    storage_root: str = ""

    def describe(self) -> str:
        parts = urlsplit(self.uri)
        netloc = parts.hostname or parts.netloc.rpartition("@")[2]
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        shown = urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else netloc
        return f"Milvus {shown} (database {self.db_name!r})"

    @contextmanager
    def session(self) -> Iterator[MilvusClient]:
        """A client of its own (not shared with other callers), closed afterwards."""
        with calls(self, "connecting"):
            client = MilvusClient(uri=self.uri, token=self.token, db_name=self.db_name,
                                  timeout=self.timeout_s, dedicated=True)
        try:
            yield client
        finally:
            with suppress(Exception):
                client.close()


UNREACHABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def translate(server: MilvusServer, what: str, exc: BaseException) -> RagBackupError:
    """A pymilvus/gRPC failure as one of our errors, naming the server and what we did."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    message = getattr(exc, "message", None) or (exc.details() if isinstance(exc, grpc.RpcError)
                                                else str(exc)) or type(exc).__name__
    text = f"{server.describe()}: {what}: {message}"
    lowered = message.lower()
    if code in UNREACHABLE_CODES or code == 2 and "fail connecting" in lowered or \
            "unavailable" in lowered or "retry timeout" in lowered:
        return StoreUnreachable(f"{text} (is the server up and RAG_MILVUS_URI right?)")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, 1800) or \
            "auth" in lowered and ("fail" in lowered or "denied" in lowered):
        return CredentialsRejected(f"{text}; check RAG_MILVUS_TOKEN")
    if code == 800 or "database not found" in lowered:
        return InvalidRequest(f"{server.describe()} has no database {server.db_name!r} "
                              f"({message}); check RAG_MILVUS_DB_NAME")
    if code == 100 or "collection not found" in lowered:
        return InvalidRequest(text)
    return ToolError(text)


@contextmanager
def calls(server: MilvusServer, what: str) -> Iterator[None]:
    """Translate failures of the Milvus calls in the block; our own errors pass through."""
    try:
        yield
    except RagBackupError:
        raise
    except (MilvusException, grpc.RpcError) as exc:
        raise translate(server, what, exc) from exc


def server_version(client: MilvusClient, server: MilvusServer) -> str:
    with calls(server, "reading the server version"):
        return str(client.get_server_version(timeout=server.timeout_s))


def list_collections(client: MilvusClient, server: MilvusServer) -> list[str]:
    with calls(server, "listing collections"):
        return sorted(client.list_collections(timeout=server.timeout_s))


def count_rows(client: MilvusClient, server: MilvusServer, name: str,
               partition: str | None = None) -> int:
    """Exact ``count(*)`` (Strong consistency) of a loaded collection or one of its partitions."""
    where = f"counting rows of {name!r}" + (f" partition {partition!r}" if partition else "")
    with calls(server, where):
        result = client.query(name, filter="", output_fields=["count(*)"],
                              partition_names=[partition] if partition else None,
                              consistency_level="Strong", timeout=server.long_timeout_s)
    return int(result[0]["count(*)"])


def _state(client: MilvusClient, server: MilvusServer, name: str) -> str:
    with calls(server, f"reading the load state of {name!r}"):
        state = client.get_load_state(name, timeout=server.timeout_s).get("state")
    return str(getattr(state, "name", state))


def check_connection(server: MilvusServer) -> str:
    """The server version of a reachable server that accepts our token, else a clear error."""
    with server.session() as client:
        list_collections(client, server)
        return server_version(client, server)
