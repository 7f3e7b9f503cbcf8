"""A TCP forwarder on 127.0.0.1 that a test can cut, to take a server "away" without stopping
it (the stack's S3 server keeps its data in memory and must not be restarted).

    with TcpProxy("127.0.0.1", 9000) as proxy:      # clients use proxy.url
        proxy.cut_after(7 * 2**20)                    # cut once 7 MiB went upstream
        ...                                           # or proxy.cut() at any time
        proxy.heal()                                  # accept and forward again
        proxy.corrupt_once(b"MARK", b"MARX")          # alter the next upload carrying MARK

While cut, every open connection is closed and new ones are accepted and closed at once, so a
client sees its connection reset or closed (never a hang).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import suppress

BUFFER = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._limit: int | None = None
        self.bytes_up = 0  # client -> server, forwarded
        self._corrupt: tuple[bytes, bytes] | None = None
        self.corrupted = 0  # uploads altered on the way
        self.connections = 0
        self.cuts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tcpproxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Close every connection; refuse new ones until ``heal``."""
        with self._lock:
            self._cut = True
            self._limit = None
            self.cuts += 1
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)

    def cut_after(self, upstream_bytes: int) -> None:
        """Cut once ``upstream_bytes`` more bytes went from clients to the server."""
        with self._lock:
            self._limit = self.bytes_up + upstream_bytes

    def corrupt_once(self, marker: bytes, replacement: bytes) -> None:
        """Replace the first ``marker`` that goes upstream (in one read of up to 64 KiB) by
        ``replacement`` of the same length: damage on the way that no TCP checksum catches."""
        assert len(marker) == len(replacement)
        with self._lock:
            self._corrupt = (marker, replacement)

    def heal(self) -> None:
        with self._lock:
            self._cut = False
            self._limit = None

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(timeout=5)
        _close(self._listener)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            for data in _chunks(source):
                if up:
                    data, cut_now = self._account(data)
                    if data:
                        sink.sendall(data)
                    if cut_now:
                        self.cut()
                        return
                else:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)

    def _account(self, data: bytes) -> tuple[bytes, bool]:
        with self._lock:
            if self._cut:
                return b"", True
            if self._corrupt is not None and self._corrupt[0] in data:
                data = data.replace(self._corrupt[0], self._corrupt[1], 1)
                self._corrupt = None
                self.corrupted += 1
            if self._limit is not None and self.bytes_up + len(data) >= self._limit:
                data = data[: max(0, self._limit - self.bytes_up)]
                self.bytes_up += len(data)
                return data, True
            self.bytes_up += len(data)
            return data, False


def _chunks(sock: socket.socket) -> Iterator[bytes]:
    while True:
        data = sock.recv(BUFFER)
        if not data:
            return
        yield data


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()
