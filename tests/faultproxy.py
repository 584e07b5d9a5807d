"""A fault-injecting TCP proxy for tests: 127.0.0.1 in front of the loopback S3 server, able to cut every
connection and refuse new ones for N seconds (an outage), optionally once a number of response bytes has passed
(so the outage lands in the middle of a read).

    proxy = FaultProxy(upstream_port)
    proxy.outage(12.0, after_bytes=2 << 20)     # armed: starts once 2 MiB went to clients
    ...                                         # point storage.endpoint_url at proxy.endpoint
    proxy.close()
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.parse


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = self._srv.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._down_until = 0.0
        self._arm: tuple[float, int] | None = None  # (seconds, after_bytes)
        self.bytes_down = 0      # response bytes relayed to clients
        self.refused = 0         # connections closed at once during an outage
        self.cut = 0             # live connections cut when an outage started
        self.outage_started: float | None = None
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -------------------------------------------------------------------------------------------- control
    def outage(self, seconds: float, after_bytes: int = 0) -> None:
        """Cut everything for `seconds`, now or once `after_bytes` more response bytes have been relayed."""
        with self._lock:
            self._arm = (seconds, self.bytes_down + after_bytes)
        self._maybe_start()

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def close(self) -> None:
        self._closed = True
        self._srv.close()
        self._cut_all()

    # ------------------------------------------------------------------------------------------ internals
    def _observe(self, src: socket.socket, dst: socket.socket, downstream: bool, data: bytes) -> None:
        """Called with every chunk before it is relayed (CountingProxy counts them)."""

    def _maybe_start(self) -> None:
        with self._lock:
            if self._arm is None or self.bytes_down < self._arm[1]:
                return
            seconds, self._arm = self._arm[0], None
            self._down_until = time.monotonic() + seconds
            self.outage_started = time.time()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
            self.cut += len(conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or self.down:
                    break
                self._observe(src, dst, downstream, data)
                dst.sendall(data)
                if downstream:
                    with self._lock:
                        self.bytes_down += len(data)
                    self._maybe_start()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


class CountingProxy(FaultProxy):
    """A FaultProxy that counts, per (HTTP method, object path), the response bytes relayed to clients (headers
    included) and the requests: what the server sent for each object, measured on the wire.

        proxy = CountingProxy(upstream_port)
        ...                                          # point storage.endpoint_url at proxy.endpoint
        proxy.bytes_of("GET", "part-00000.parquet")  # response bytes of GETs whose path ends so
    """

    _REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.current: dict[socket.socket, tuple[str, str]] = {}  # upstream socket -> request it is answering
        self.bytes: dict[tuple[str, str], int] = {}
        self.requests: dict[tuple[str, str], int] = {}
        super().__init__(upstream_port, upstream_host)

    def _observe(self, src, dst, downstream, data):
        with self._lock:
            if not downstream:  # client -> server: a new request on this connection (no pipelining in HTTP/1.1 clients)
                for m in self._REQUEST.finditer(data):
                    key = (m.group(1).decode(), urllib.parse.unquote(m.group(2).decode().split("?", 1)[0]))
                    self.current[dst] = key
                    self.requests[key] = self.requests.get(key, 0) + 1
            elif src in self.current:
                key = self.current[src]
                self.bytes[key] = self.bytes.get(key, 0) + len(data)

    def bytes_of(self, method: str, suffix: str) -> int:
        with self._lock:
            return sum(n for (m, path), n in self.bytes.items() if m == method and path.endswith(suffix))

    def requests_of(self, method: str, suffix: str) -> int:
        with self._lock:
            return sum(n for (m, path), n in self.requests.items() if m == method and path.endswith(suffix))
