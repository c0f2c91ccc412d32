"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), for the storage scenarios.

``S3Fixture`` starts moto's ``ThreadedMotoServer`` and a ``FaultProxy`` in front of it, both on
127.0.0.1 on free ports; clients (boto3, pyarrow's S3FileSystem, mosaicml-streaming) are pointed at
the proxy's ``endpoint_url``. On command the proxy:

- answers the S3 errors a real store sends under load or in an incident, instead of forwarding:
  ``"500"`` (InternalError), ``"503"`` (ServiceUnavailable), ``"slowdown"`` (503 SlowDown, S3's
  throttling answer), ``"throttle"`` (400 ThrottlingException, the AWS-wide throttling error);
- ``"reset"``: drops the connection without answering (a load balancer restart);
- ``"cut"``: forwards the request (a write takes effect) but sends only half of the answer and drops
  the connection (a download or an acknowledgement lost mid-way);
- ``stop()`` / ``start()``: stops listening and severs every open connection (connection refused
  from then on), then listens again on the same port (the server is restarted; its data survives,
  as a real store's would); ``outage(seconds)`` does both; the fault mode ``"stop"`` starts such an
  outage (``down_s`` long) when its request arrives, and drops that request.

Faults are armed with ``inject(mode, count=..., duration_s=..., match=..., after=...)``: after
``after`` matching requests went through, the next ``count`` matching ones (or every matching one
for ``duration_s`` from the first hit, or until ``clear()``) get the fault.
Every request is recorded (time, method, path, status, fault) so a scenario can check that a client
retried, how often and how far apart. Everything is bounded: request bodies (``MAX_BODY``), socket and
upstream timeouts, and ``close()`` stops both servers.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("500", "503", "slowdown", "throttle", "reset", "cut", "stop")
MAX_BODY = 1 << 30  # 1 GiB: far above anything the scenarios write; larger requests get 413
SOCKET_TIMEOUT_S = 60.0  # idle client connections and the upstream request
HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "throttle": (400, "ThrottlingException", "Rate exceeded."),
}


@dataclass
class Request:
    """One request the proxy saw: when, what, how it was answered (``fault`` None: forwarded)."""

    t: float  # time.monotonic()
    method: str
    path: str  # /bucket/key (no query string)
    query: str
    status: int | None  # None: no answer (reset / cut / stopped mid-way)
    fault: str | None

    @property
    def key(self) -> str:
        """``method path?query``: the identity used to find retries of the same request."""
        return f"{self.method} {self.path}?{self.query}"


@dataclass
class Injection:
    """An armed fault; ``hits`` are the requests it answered."""

    mode: str
    match: Callable[[str, str], bool]
    count: int | None
    duration_s: float | None
    after: int = 0  # matching requests still to let through before the fault starts
    down_s: float = 0.0  # "stop": how long the outage lasts
    hits: list[Request] = field(default_factory=list)
    until: float | None = None  # set at the first hit when duration_s is given

    def takes(self, now: float) -> bool:
        """Whether this fault answers a matching request arriving at ``now`` (counts it down)."""
        if self.count is not None and len(self.hits) >= self.count:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.after > 0:
            self.after -= 1
            return False
        if self.until is None and self.duration_s is not None:
            self.until = now + self.duration_s
        return True

    @property
    def first_hit(self) -> float | None:
        return self.hits[0].t if self.hits else None


def matcher(methods: tuple[str, ...] = (), pattern: str | None = None) -> Callable[[str, str], bool]:
    """A request filter: any of ``methods`` (empty: all) and ``re.search(pattern, path)``."""
    regex = re.compile(pattern) if pattern else None
    wanted = {m.upper() for m in methods}

    def match(method: str, path: str) -> bool:
        return (not wanted or method.upper() in wanted) and (regex is None or bool(regex.search(path)))

    return match


class FaultProxy:
    """The proxy (module docstring). ``endpoint_url`` stays the same across ``stop()`` / ``start()``."""

    def __init__(self, upstream: str, *, port: int = 0) -> None:
        parsed = urllib.parse.urlparse(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy only fronts a local server, got {upstream}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.port = port
        self.requests: list[Request] = []
        self._injections: list[Injection] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by every start/stop: a pending restart of an older outage is void
        self._conns: set[socket.socket] = set()
        self.start()

    # ------------------------------------------------------------------------------------- control
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on 127.0.0.1:``port`` (a free port the first time)."""
        self._generation += 1
        if self._server is not None:
            return
        proxy = self

        class Handler(_Handler):
            owner = proxy

        deadline = time.monotonic() + 10.0
        while True:
            try:
                server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
                server.allow_reuse_address = True
                server.daemon_threads = True
                server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.server_bind()
                server.server_activate()
                break
            except OSError:
                server.server_close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the port is still held by the previous listener's sockets
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="s3-fault-proxy", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and sever every open connection: clients get connection errors."""
        self._generation += 1
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.clear()
        self.stop()

    @contextlib.contextmanager
    def down(self, seconds: float) -> Iterator[None]:
        """Stopped for ``seconds`` (in a background thread), then started again."""
        timer = self.outage(seconds)
        try:
            yield
        finally:
            timer.join(seconds + 15)

    def outage(self, seconds: float) -> threading.Thread:
        """Stop now and start again after ``seconds``, in a background thread (returned); a ``start()``
        or ``stop()`` meanwhile cancels the restart."""
        self.stop()
        generation = self._generation

        def restart() -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if self._generation != generation:
                    return
                time.sleep(0.05)
            if self._generation == generation:
                self.start()

        thread = threading.Thread(target=restart, name="s3-fault-proxy-restart", daemon=True)
        thread.start()
        return thread

    def inject(
        self,
        mode: str,
        *,
        count: int | None = None,
        duration_s: float | None = None,
        match: Callable[[str, str], bool] | None = None,
        after: int = 0,
        down_s: float = 2.0,
    ) -> Injection:
        """Arm a fault: after ``after`` matching requests, the next ``count`` matching requests, or
        every one for ``duration_s`` seconds from the first hit, or (neither given) until ``clear()``.
        ``"stop"`` stops the proxy for ``down_s`` seconds at its (first) hit."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r} (one of {MODES})")
        if mode == "stop" and count is None:
            count = 1
        inj = Injection(mode, match or matcher(), count, duration_s, after=after, down_s=down_s)
        with self._lock:
            self._injections.append(inj)
        return inj

    def clear(self) -> None:
        with self._lock:
            self._injections.clear()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``predicate`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
            time.sleep(0.05)

    def count(self, match: Callable[[str, str], bool] | None = None) -> int:
        """How many requests (matching ``match``) the proxy has seen."""
        with self._lock:
            return sum(1 for r in self.requests if match is None or match(r.method, r.path))

    # ------------------------------------------------------------------------------------ internals
    def _fault_for(self, method: str, path: str) -> Injection | None:
        now = time.monotonic()
        with self._lock:
            for inj in self._injections:
                if inj.match(method, path) and inj.takes(now):
                    return inj
        return None

    def _record(self, req: Request, inj: Injection | None) -> None:
        with self._lock:
            self.requests.append(req)
            if inj is not None:
                inj.hits.append(req)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:  # quiet: requests are recorded instead
        pass

    def handle_expect_100(self) -> bool:
        return super().handle_expect_100()  # 100 Continue: the body is read in full before any fault

    def _read_body(self) -> bytes | None:
        """The request body (chunked transfer decoded); None if it is over ``MAX_BODY``."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1 << 16)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        t = time.monotonic()
        url = urllib.parse.urlsplit(self.path)
        path, query, method = url.path, url.query, self.command
        body = self._read_body()
        if body is None:
            self.send_error(413, "request body too large for the fault proxy")
            return
        inj = self.owner._fault_for(method, path)
        mode = inj.mode if inj is not None else None
        if mode in ("reset", "stop"):
            self.owner._record(Request(t, method, path, query, None, mode), inj)
            if mode == "stop":  # stopping waits for the serving loop: not from this handler's thread
                threading.Thread(target=self.owner.outage, args=(inj.down_s,), daemon=True).start()
            self._drop()
            return
        if mode in _ERRORS:
            status, code, message = _ERRORS[mode]
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            self.owner._record(Request(t, method, path, query, status, mode), inj)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        headers.pop("Expect", None)
        headers.pop("expect", None)
        if body or method in ("PUT", "POST"):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=SOCKET_TIMEOUT_S)
        try:
            upstream.request(method, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            status, resp_headers = resp.status, resp.getheaders()
        except OSError:
            self.owner._record(Request(t, method, path, query, None, "upstream-down"), None)
            self.send_error(502, "upstream S3 server unreachable")
            return
        finally:
            upstream.close()
        if mode == "cut":
            self.owner._record(Request(t, method, path, query, None, mode), inj)
            self.send_response(status)
            for k, v in resp_headers:
                if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(max(len(data), 2)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        self.owner._record(Request(t, method, path, query, status, None), None)
        self.send_response(status)
        for k, v in resp_headers:
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                self.send_header(k, v)
        length = dict((k.lower(), v) for k, v in resp_headers).get("content-length")
        self.send_header("Content-Length", length if method == "HEAD" and length else str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class S3Fixture:
    """moto's S3 server on 127.0.0.1 with a ``FaultProxy`` in front; ``env`` points AWS clients at the
    proxy with dummy credentials. ``close()`` stops both (use as a context manager)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.moto_url = f"http://{host}:{port}"
        self.proxy = FaultProxy(self.moto_url)
        self.endpoint_url = self.proxy.endpoint_url
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def apply_env(self) -> None:
        """Set ``env`` in this process (the scenario's own process: nothing to restore)."""
        os.environ.update(self.env)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(key, None)

    def client(self, *, direct: bool = True):  # -> botocore S3 client
        """A boto3 client for checking results: straight to moto (``direct``) or via the proxy."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.moto_url if direct else self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key below ``prefix`` (read straight from moto, past any armed fault)."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def close(self) -> None:
        self.proxy.close()
        self._moto.stop()

    def __enter__(self) -> S3Fixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def retry_gaps(requests: list[Request], key: str) -> list[float]:
    """Seconds between consecutive attempts of the request ``key`` (``Request.key``)."""
    times = [r.t for r in requests if r.key == key]
    return [b - a for a, b in itertools.pairwise(times)]
