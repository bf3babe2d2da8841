"""A fault-injecting HTTP proxy for S3 endpoints, on loopback.

Used by the storage tests (retries, resets, cut replies) and by `recipe-dist bench loader`
(an injected latency per request: moto on loopback is not a real network).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    """An HTTP proxy on loopback in front of an S3 endpoint that fails a share `rate` of requests.

    Each failing request gets one of: a 500 (InternalError), a 503 (SlowDown), a TCP reset
    before any reply, or (GETs) a reply whose body is cut off halfway. Draws come from a seeded
    generator in arrival order, so the number of failures over N requests is fixed by the seed.
    `latency_s` delays every request (a round trip loopback lacks), for measuring prefetch.
    """

    KINDS = ("500", "503", "reset", "cut")

    def __init__(self, upstream_port: int, rate: float = 0.0, seed: int = 0, latency_s: float = 0.0):
        self.upstream_port, self.rate, self.latency_s = upstream_port, rate, latency_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = dict.fromkeys(self.KINDS, 0)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _draw(self):
                with proxy.lock:
                    proxy.requests += 1
                    if proxy.rng.random() >= proxy.rate:
                        return None
                    kind = proxy.rng.choice(proxy.KINDS)
                    if kind == "cut" and self.command != "GET":
                        kind = "reset"  # nothing to cut in a HEAD reply
                    proxy.faults[kind] += 1
                    return kind

            def _reset(self):
                # SO_LINGER 0: close() sends a TCP RST, as a crashed peer or a middlebox would.
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

            def _proxy(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)  # a network round trip that loopback does not have
                fault = self._draw()
                if fault == "reset":
                    return self._reset()
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    err = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD reply carries the object's length with no body.
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
