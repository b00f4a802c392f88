"""A local HTTP server for remote-shard tests and benchmarks: serves a directory on 127.0.0.1 from a
thread of the test process (no external network), counts requests and injects faults on demand."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# fault(name, nth request of that name starting at 1) -> None (serve) | "drop" | "corrupt" | "503"
Fault = Callable[[str, int], str | None]


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        with self.server.lock:
            self.server.requests[name] += 1
            nth = self.server.requests[name]
        action = self.server.fault(name, nth) if self.server.fault else None
        path = Path(self.directory) / name
        if action is None or not path.is_file():
            return super().do_GET()
        if action == "503":
            return self.send_error(503, "try again")
        blob = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        if action == "corrupt":
            middle = len(blob) // 2
            self.wfile.write(blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1 :])
            return None
        self.wfile.write(blob[: len(blob) // 2])  # "drop": the connection dies mid-body
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # concurrent HEAD checks: a backlog of 5 drops SYNs (1 s retransmits)
    requests: Counter
    lock: threading.Lock
    fault: Fault | None


class ShardServer:
    """``with ShardServer(root) as server:`` serves ``root``; ``server.url`` is its base URL."""

    def __init__(self, root: Path, fault: Fault | None = None):
        self.httpd = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.requests, self.httpd.lock, self.httpd.fault = Counter(), threading.Lock(), fault
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def requests(self) -> Counter:
        """GET requests per path (relative to the root)."""
        return self.httpd.requests

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
