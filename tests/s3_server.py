"""A local S3 API server for tests: moto's server mode on 127.0.0.1, in a thread of the
test process, with real buckets and real HTTP requests (the client is not mocked), and faults
injected on demand by a WSGI layer in front of it (``503 SlowDown``, a corrupted body).

``with S3Server() as server:`` points the standard AWS environment variables at it (endpoint,
dummy credentials, region; no config files, no profile) for this process, and ``server.env`` holds
them for a subprocess: the code under test finds the server the way it finds a user's setup.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# fault(method, "bucket/key", nth request of that method and key, from 1) -> None (serve) | "503" | "corrupt"
Fault = Callable[[str, str, int], str | None]
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SECURITY_TOKEN")


class S3Server:
    """moto's S3 on a free port of 127.0.0.1; ``requests`` counts (method, "bucket/key")."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        outer = self

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:  # moto's, with the fault layer around its WSGI app
                from moto.moto_server.werkzeug_app import (
                    DomainDispatcherApplication,
                    MotoRequestHandler,
                    create_backend_app,
                )
                from werkzeug.serving import make_server

                app = DomainDispatcherApplication(create_backend_app)
                self._server = make_server(
                    self._ip_address, self._port, outer._wsgi(app), True, request_handler=MotoRequestHandler
                )
                self._server_ready_event.set()
                self._server.serve_forever()

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
        self.server = Server(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: Counter = Counter()
        self.fault: Fault | None = None
        self.lock = threading.Lock()
        self.env: dict[str, str] = {}
        self.saved: dict[str, str | None] = {}

    def _wsgi(self, app: Any) -> Callable:
        def faulty(environ: dict, start_response: Callable) -> Iterable[bytes]:
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").lstrip("/")
            with self.lock:
                self.requests[method, path] += 1
                nth = self.requests[method, path]
            action = self.fault(method, path, nth) if self.fault else None
            if action == "503":
                start_response("503 Slow Down", [("Content-Type", "application/xml")])
                return [] if method == "HEAD" else [SLOW_DOWN]
            if action == "corrupt":
                body = b"".join(app(environ, start_response))
                middle = len(body) // 2
                return [body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]]
            return app(environ, start_response)

        return faulty

    def __enter__(self) -> S3Server:
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        for name in (*self.env, *CLEARED):
            self.saved[name] = os.environ.pop(name, None)
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        self.server.stop()

    def subprocess_env(self) -> dict[str, str]:
        """This process's environment without a user's AWS setup, pointed at the server."""
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        return {**env, **self.env}

    @property
    def client(self) -> Any:
        import boto3

        return boto3.client("s3")

    def bucket(self, name: str) -> str:
        """A new empty bucket (moto's state is per process: each test module names its own)."""
        self.client.create_bucket(Bucket=name)
        return name

    def upload(self, directory: Path, url: str) -> str:
        """Every file of ``directory`` (not recursive) as objects under ``s3://bucket/prefix``; returns ``url``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self.client.put_object(
                    Bucket=bucket, Key=f"{prefix.strip('/')}/{path.name}".lstrip("/"), Body=path.read_bytes()
                )
        return url

    def keys(self, url: str) -> list[str]:
        """The keys under ``s3://bucket/prefix/``, relative to it."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
        return sorted(o["Key"][len(start) :] for page in pages for o in page.get("Contents", []))

    @contextmanager
    def faults(self, fault: Fault) -> Iterator[S3Server]:
        """Inject ``fault`` for the block; the request counts start from zero."""
        self.requests.clear()
        self.fault = fault
        try:
            yield self
        finally:
            self.fault = None
