"""A TCP proxy on 127.0.0.1 that a test can cut and restore (a server going away and back)."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class Proxy:
    """A TCP proxy on 127.0.0.1 to one server, that the test can cut and restore.

    While cut, every connection through it is closed and new ones are accepted and closed at
    once (counted in :attr:`refused`): the client sees its server go away.
    """

    def __init__(self, host: str, port: int, *, cut_off: bool = False) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cut_off = cut_off  # cut from the start: the server is away when the test begins
        self.refused = 0
        self.trigger: tuple[bytes, ...] = ()  # bytes that, all in one chunk, cut the proxy
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        """The Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones until restored."""
        with self._lock:
            self.cut_off = True
            sockets, self._open = self._open, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Let connections through again (and disarm the trigger)."""
        with self._lock:
            self.cut_off = False
            self.trigger = ()

    def cut_at(self, *needles: bytes) -> None:
        """Cut, dropping the chunk, when a client sends a chunk holding every one of needles."""
        self.trigger = needles

    def close(self) -> None:
        """Stop the proxy and close everything."""
        self._closed = True
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self.cut_off:
                    self.refused += 1
                    client.close()
                    continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            for source, sink, outgoing in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, outgoing), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, outgoing: bool) -> None:
        try:
            while data := source.recv(65536):
                trigger = self.trigger
                if outgoing and trigger and all(needle in data for needle in trigger):
                    self.cut()  # the chunk never reaches the server
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
