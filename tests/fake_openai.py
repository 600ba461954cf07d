"""A scripted, loopback OpenAI-compatible fake server for tests (chat.completions and models).

    fake = FakeOpenAI().start()              # 127.0.0.1, a free port, a daemon thread
    fake.script(Status(429), Reply("1"))     # the next chat requests, in order
    fake.default = Reply("0")                # what comes after the script runs out (or a callable(body) -> action)
    ... ChatConfig(base_url=fake.url, ...)
    fake.chat_requests                       # every chat.completions request body received, in arrival order
    fake.stop()

Actions: Reply(content, usage=(prompt, completion), delay_s) — delay_s > the client timeout makes a slow
reply; Status(code) — an OpenAI-style error body with that status; Malformed() — 200 with a body that is not
JSON. `models_status` sets the status of GET /models (200 = a one-model list). Every wait is bounded (a delay
is cut short by stop()), nothing loops forever.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pytest

MAX_DELAY_S = 10.0  # no scripted delay waits longer than this


@dataclasses.dataclass
class Reply:
    content: str
    usage: Tuple[int, int] = (10, 1)
    delay_s: float = 0.0


@dataclasses.dataclass
class Status:
    code: int
    message: str = "scripted error"


@dataclasses.dataclass
class Malformed:
    body: bytes = b'{"choices": [ this is not json'


Action = Union[Reply, Status, Malformed]


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: Dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or the raw text when not JSON
    t: float


class FakeOpenAI:
    """The fake server; `requests` holds every request (any path), `chat_requests` the chat bodies."""

    def __init__(self, default: Union[Action, Callable[[Dict[str, Any]], Action], None] = None):
        self.default = default if default is not None else Reply("1")
        self.models_status = 200  # the status GET /models answers (401 to test a rejected key)
        self.requests: List[Recorded] = []
        self._queue: List[Union[Action, Callable]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- scripting ------------------------------------------------------------------------------------------------

    def script(self, *actions) -> "FakeOpenAI":
        with self._lock:
            self._queue.extend(actions)
        return self

    def _next_action(self, body: Any) -> Action:
        with self._lock:
            action = self._queue.pop(0) if self._queue else self.default
        if callable(action) and not isinstance(action, (Reply, Status, Malformed)):
            action = action(body)
        return action

    @property
    def chat_requests(self) -> List[Any]:
        with self._lock:
            return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    # -- life cycle -----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _record(self, body):
                with fake._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.requests.append(Recorded(self.command, self.path, headers, body, time.time()))

            def _send(self, status: int, data: bytes, content_type: str = "application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client timed out and left

            def do_GET(self):  # noqa: N802
                self._record(None)
                if self.path.rstrip("/").endswith("/models") and fake.models_status != 200:
                    err = {"error": {"message": "scripted", "type": "scripted", "code": str(fake.models_status)}}
                    self._send(fake.models_status, json.dumps(err).encode())
                elif self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": "fake-model", "object": "model", "created": 0, "owned_by": "tests"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n > 0 else b""
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                self._record(body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                action = fake._next_action(body)
                if isinstance(action, Status):
                    err = {"error": {"message": action.message, "type": "scripted", "code": str(action.code)}}
                    self._send(action.code, json.dumps(err).encode())
                    return
                if isinstance(action, Malformed):
                    self._send(200, action.body)
                    return
                if action.delay_s > 0:
                    fake._stop.wait(min(action.delay_s, MAX_DELAY_S))
                p, c = action.usage
                resp = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                        "created": int(time.time()), "model": body.get("model", "fake") if isinstance(body, dict)
                        else "fake",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": action.content}}],
                        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
                self._send(200, json.dumps(resp).encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-openai")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def fake_openai(request) -> FakeOpenAI:
    """A started FakeOpenAI, stopped in the finaliser."""
    fake = FakeOpenAI().start()
    request.addfinalizer(fake.stop)
    return fake
