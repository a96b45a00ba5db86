"""A TCP proxy on 127.0.0.1 that forwards bytes to a server until it sees the `after`-th request naming
`pattern` (HTTP is plaintext: the request line and headers name the object), then cuts every connection
and refuses new ones: a network that fails in the middle of a conversation, no client library mocked."""
from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading


class CutProxy:
    def __init__(self, upstream: str, pattern: str, after: int = 1):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.pattern, self.after = re.compile(pattern.encode(), re.IGNORECASE), after
        self.seen: list[str] = []  # the first line of every request forwarded (or the one that tripped it)
        self.matched = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed: the cut
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        # the upstream connection is opened at the first request bytes: the emulator serves one connection at
        # a time, so an idle client connection must not hold it
        try:
            first = client.recv(65536)
            if not first or self._inspect(first):
                return _close(client)
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets.append(server)
            server.sendall(first)
        except OSError:
            return _close(client)
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self._pump(client, server, True)

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and self._inspect(data):
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)

    def _inspect(self, data: bytes) -> bool:
        """Record the request lines in `data`; True once the proxy has cut (this chunk is not forwarded)."""
        lines = [m.group(0).decode("latin-1") for m in re.finditer(rb"(GET|PUT|POST|PATCH|DELETE|HEAD) \S+", data)]
        with self._lock:
            self.seen += lines
            if self.cut.is_set():
                return True
            if self.pattern.search(data):
                self.matched += 1
                if self.matched >= self.after:
                    self._cut()
                    return True
        return False

    def _cut(self) -> None:
        # closing the listener refuses new connections; an RST (linger 0) cuts each open one
        self.cut.set()
        _close(self._listener)
        for s in self._sockets:
            _close(s, abort=True)

    def close(self) -> None:
        with self._lock:
            self._cut()


def _close(s: socket.socket, abort: bool = False) -> None:
    # shutdown() first: close() alone would not wake a thread blocked in recv() or accept() on `s`, and the
    # kernel would keep the connection (or the listening socket) open for as long as it waits
    if abort:  # an RST, not a FIN: the connection is cut
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
