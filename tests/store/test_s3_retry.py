"""Transient S3 failures are retried (botocore "standard" mode: exponential backoff with
jitter); what persists becomes one clear line.  Against a tiny fake S3 endpoint that
answers a scripted sequence of statuses, so no Ceph is needed and every attempt counts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vmarchive.errors import BackendError
from vmarchive.store.s3 import S3Backend, S3Options

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
