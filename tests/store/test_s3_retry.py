"""Transient S3 failures are retried (botocore "standard" mode: exponential backoff with
jitter); what persists becomes one clear line.  Against a tiny fake S3 endpoint that
answers a scripted sequence of statuses, so no Ceph is needed and every attempt counts."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)

from vmarchive.errors import BackendError
from vmarchive.store.s3 import (
    UNREACHABLE_WAIT_ENV,
    S3Backend,
    S3Options,
    _GatewayWait,
    _unreachable_wait,
)

BODY = b"the object's bytes"


@dataclass
class FakeS3:
    """Answers each request with the next scripted (status, S3 error code); 200 after."""

    script: list[tuple[int, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    port: int = 0


def _handler(fake: FakeS3) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            fake.requests.append(f"{self.command} {self.path}")
            status, code = fake.script.pop(0) if fake.script else (200, "")
            if status != 200:
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>scripted</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
            else:
                body = BODY if self.command == "GET" else b""
                self.send_response(200)
                self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
                self.send_header("Last-Modified", "Wed, 25 Nov 2026 00:00:00 GMT")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = _answer

    return Handler


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeS3]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FAKEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    f = FakeS3()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(f))
    f.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f
    server.shutdown()
    server.server_close()
    t.join()


def backend(fake: FakeS3, attempts: int) -> S3Backend:
    opts = S3Options(
        endpoint=f"http://127.0.0.1:{fake.port}", max_attempts=attempts, cache_dir=None
    )
    return S3Backend("bucket", "repo/", opts)


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_transient_errors_are_retried(fake: FakeS3, status: int, code: str) -> None:
    b = backend(fake, attempts=4)
    config = b._client.meta.config
    assert config.retries["mode"] == "standard"  # type: ignore[attr-defined]  # backoff, jitter
    fake.script = [(status, code)]
    assert b.get("config") == BODY
    assert len(fake.requests) == 2  # a failure, then the answer
    fake.script, fake.requests[:] = [(status, code)], []
    assert b.put("index/" + "a" * 64, b"x", create_only=True)
    assert [r.split()[0] for r in fake.requests] == ["PUT", "PUT"]


def test_persistent_errors_end_in_one_line_and_single_attempt_is_the_control(
    fake: FakeS3,
) -> None:
    fake.script = [(503, "SlowDown")] * 2
    with pytest.raises(BackendError) as ei:
        backend(fake, attempts=2).get("config")
    msg = str(ei.value)
    assert "SlowDown" in msg and "HTTP 503" in msg and "\n" not in msg
    assert "fake-secret" not in msg
    assert len(fake.requests) == 2  # every attempt was made, no more
    # Negative control: one attempt, the same transient error is not ridden out.
    fake.script, fake.requests[:] = [(503, "SlowDown")], []
    with pytest.raises(BackendError, match="SlowDown"):
        backend(fake, attempts=1).get("config")
    assert len(fake.requests) == 1
    fake.requests.clear()
    assert backend(fake, attempts=1).get("config") == BODY  # and the store is fine after


# --- a gateway that does not accept connections for a while --------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _late_backend(port: int, wait: float, attempts: int = 1) -> S3Backend:
    opts = S3Options(
        endpoint=f"http://127.0.0.1:{port}",
        max_attempts=attempts,
        unreachable_wait=wait,
        cache_dir=None,
    )
    return S3Backend("bucket", "repo/", opts)


def _serve(port: int, fake: FakeS3) -> tuple[ThreadingHTTPServer, threading.Thread]:
    srv = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, t


def _stop(srv: ThreadingHTTPServer, t: threading.Thread) -> None:
    srv.shutdown()
    srv.server_close()
    t.join(10)


def test_a_gateway_that_goes_away_is_waited_for(
    fake: FakeS3, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that answered, then refuses connections for ~1.5 s: with one attempt and
    the gateway wait the GET and the conditional PUT go through once it listens again.
    Controls: the same outage without the wait fails at once, and so does a gateway that
    never answered (a mistyped endpoint: one line, no waiting)."""
    port = _free_port()
    served = [_serve(port, fake)]
    b = _late_backend(port, wait=30)
    hasty = _late_backend(port, wait=0)
    assert b.get("config") == BODY and hasty.get("config") == BODY
    _stop(*served.pop())
    with pytest.raises(BackendError, match="Could not connect"):
        hasty.get("config")
    never = _late_backend(_free_port(), wait=30)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="Could not connect"):
        never.get("config")
    assert time.monotonic() - t0 < 1.0
    fake.requests.clear()

    def reopen() -> None:
        time.sleep(1.5)
        served.append(_serve(port, fake))

    t = threading.Thread(target=reopen, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        with caplog.at_level(logging.WARNING, logger="vmarchive.store.s3"):
            assert b.get("config") == BODY
        assert 1.4 < time.monotonic() - t0 < 15
        said = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
        assert len(said) == 1 and "up to 30 s" in said[0], said
        assert b.put("index/" + "b" * 64, b"y", create_only=True)
        assert [r.split()[0] for r in fake.requests] == ["GET", "PUT"]  # each sent once
    finally:
        t.join(10)
        for srv_t in served:
            _stop(*srv_t)


def test_a_gateway_that_stays_away_fails_after_the_wait_not_a_multiple(fake: FakeS3) -> None:
    """A GET's own retries of a body that broke off do not start the wait again: the
    gateway gone after one answer, a 1 s wait fails in about 1 s (it took four before)."""
    port = _free_port()
    served = _serve(port, fake)
    b = _late_backend(port, wait=1.0, attempts=2)
    assert b.get("config") == BODY
    _stop(*served)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="Could not connect"):
        b.get("config")
    assert 0.9 < time.monotonic() - t0 < 2.5
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="Could not connect"):
        b.put("index/" + "c" * 64, b"z")
    assert 0.9 < time.monotonic() - t0 < 2.5


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "error",
    [
        EndpointConnectionError(endpoint_url="http://gw"),
        ConnectTimeoutError(endpoint_url="http://gw"),
        ProxyConnectionError(proxy_url="http://proxy"),
    ],
)
def test_the_wait_takes_connections_not_established_until_its_time_is_up(
    error: Exception,
) -> None:
    clock = _Clock()
    w = _GatewayWait(10.0, "s3://b/p", clock=clock, rand=lambda: 1.0)
    # not before the gateway has answered this client (a mistyped endpoint: no waiting)
    assert w(attempts=1, caught_exception=error, request_dict={"context": {}}) is None
    assert w(attempts=1, response=(object(), {})) is None and w.reached
    request: dict[str, Any] = {"context": {}}
    delays: list[float] = []
    while (d := w(len(delays) + 1, caught_exception=error, request_dict=request)) is not None:
        delays.append(d)
        clock.now += d
        assert len(delays) < 20
    # 0.25 s doubling to 4 s (jitter at its top here), the last one cut to what is left
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 2.25]
    assert clock.now == 110.0
    # another request has a time of its own
    assert w(attempts=1, caught_exception=error, request_dict={"context": {}}) == 0.25


@pytest.mark.parametrize(
    "error",
    [
        None,
        ReadTimeoutError(endpoint_url="http://gw"),
        ConnectionClosedError(endpoint_url="http://gw"),
        SSLError(endpoint_url="http://gw", error=ValueError("bad certificate")),
        ClientError({"Error": {"Code": "SlowDown"}}, "GetObject"),
    ],
)
def test_the_wait_leaves_everything_else_to_the_retry_mode(error: Exception | None) -> None:
    """A request that may have reached the gateway, or an answer from it: not ours."""
    w = _GatewayWait(10.0, "s3://b/p", clock=_Clock(), rand=lambda: 1.0)
    w.reached = True
    assert w(attempts=1, caught_exception=error, request_dict={"context": {}}) is None
    off = _GatewayWait(0.0, "s3://b/p", clock=_Clock(), rand=lambda: 1.0)
    off.reached = True
    refused = EndpointConnectionError(endpoint_url="http://gw")
    assert off(attempts=1, caught_exception=refused, request_dict={"context": {}}) is None
    on = _GatewayWait(10.0, "s3://b/p", clock=_Clock(), rand=lambda: 0.0)
    on.reached = True
    assert on(attempts=1, caught_exception=refused, request_dict={"context": {}}) == 0.125


def test_the_wait_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNREACHABLE_WAIT_ENV, raising=False)
    assert _unreachable_wait(None) == 20.0
    monkeypatch.setenv(UNREACHABLE_WAIT_ENV, "3.5")
    assert _unreachable_wait(None) == 3.5
    assert _unreachable_wait(0) == 0.0  # the option wins
    monkeypatch.setenv(UNREACHABLE_WAIT_ENV, "soon")
    assert _unreachable_wait(None) == 20.0
