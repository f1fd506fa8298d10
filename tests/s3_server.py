"""A real S3 endpoint on 127.0.0.1 for the tests: moto's server in a child process, and a proxy that fails on demand.

``S3Server`` starts ``python -m moto.server`` (moto's stand-alone S3-compatible
HTTP server) on a free local port and stops it; clients reach it over HTTP
exactly as they reach S3, with ``storage_options(endpoint)`` (s3fs's options).
``FlakyProxy`` forwards HTTP requests to it and answers the next ``n``
requests whose path contains a given text with ``500 InternalError`` (S3's
"We encountered an internal error. Please try again."), so retries are
exercised over the network, with no client code patched. (botocore retries
such answers itself unless ``config_kwargs={"retries": {"max_attempts": 1}}``;
the tests set that so that the data module's own retries are what is seen.)
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CREDENTIALS = {"key": "testing", "secret": "testing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def storage_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    """s3fs options for a local endpoint (what a user passes as ``storage_options=``)."""
    return {"endpoint_url": endpoint, **CREDENTIALS, **extra}


class S3Server:
    """moto's S3 server in a child process on ``127.0.0.1:<free port>``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}")
                time.sleep(0.1)

    @property
    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint)

    def filesystem(self) -> Any:
        """An s3fs filesystem on this server (for uploads and checks)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FlakyProxy:
    """An HTTP proxy in front of the server on ``target_port`` that can answer ``500 InternalError`` to chosen requests."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.failures: dict[str, int] = {}  # path text -> requests still to fail
        self.failed: dict[str, int] = {}  # path text -> requests failed so far
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._should_fail(self.path):
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                               b'<Message>We encountered an internal error. Please try again.</Message></Error>')
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length",
                                           "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                                       response.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, text: str, times: int) -> None:
        """Answer the next ``times`` requests whose path contains ``text`` with 500 InternalError."""
        with self.lock:
            self.failures[text] = times
            self.failed[text] = 0

    def _should_fail(self, path: str) -> bool:
        with self.lock:
            for text, left in self.failures.items():
                if text in path and left > 0:
                    self.failures[text] = left - 1
                    self.failed[text] += 1
                    return True
        return False

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
