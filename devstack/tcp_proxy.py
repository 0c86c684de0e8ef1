"""A TCP proxy that fault tests and benchmarks open and close to cut a real connection (e.g. to SQS),
or slow down, so work piles up in whatever waits on the other side."""

from __future__ import annotations

import socket
import threading
import time

from devstack.processes import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`. `cut()` drops every live connection and refuses new ones;
    `slow(seconds)` holds every read from the target that long before passing it on (a request/response
    protocol such as HTTP then takes that much longer per call), `slow(0)` ends it."""

    def __init__(self, target_port: int, port: int | None = None, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.latency_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> TcpProxy:
        with self._lock:
            if self._listener is not None:
                return self
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(256)
            self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accept_thread.start()
        return self

    def cut(self) -> None:
        """Close the listener and every connection through it (peers see resets / refusals)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)

    close = cut

    def slow(self, latency_s: float) -> TcpProxy:
        """Delay each read from the target by `latency_s` (applies to live connections at once)."""
        self.latency_s = max(0.0, latency_s)
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):  # forward each write at once: Nagle would add delayed-ACK stalls
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_target: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if from_target and self.latency_s:
                    time.sleep(self.latency_s)  # the latency itself, not a wait for anything
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
