"""An OpenAI-compatible chat.completions server whose "model" is a rule judge (the shapes-world stand-in for
GPT-4.1-mini, spec §8.10), so the VLM-judge client path can run end to end offline.

    server = make_server("127.0.0.1", 0)            # judge_fn defaults to shapes_rubrics.judge_rubric
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chat = ChatService(ChatConfig(base_url=server.url, model=RULE_JUDGE_MODEL))

Endpoints:
  GET  /v1/models             {"object": "list", "data": [{"id": "rule-judge", ...}]}
  POST /v1/chat/completions   the last user message must hold a text part in the layout of
                              vlm_judge.format_judge_request and an image_url part with a base64 PNG data URL;
                              the reply content is "1" or "0" = judge_fn(image uint8 [H, W, 3], prompt,
                              rubric_name, rubric), with a usage block (prompt_tokens: whitespace words of the
                              text parts + 85 per image, a rough stand-in; completion_tokens: 1).
A malformed request, or a rubric the judge cannot parse (shapes_rubrics.RubricError, or a ValueError from an
injected judge_fn), is answered HTTP 400 with an OpenAI-style {"error": {...}} body, which the client does not
retry; other judge exceptions are HTTP 500. Only loopback hosts are accepted unless allow_remote=True.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from lens_jax.posttrain.vlm_judge import parse_judge_request

RULE_JUDGE_MODEL = "rule-judge"
IMAGE_PROMPT_TOKENS = 85  # what OpenAI bills a low-detail image; only an order of magnitude here
MAX_BODY_BYTES = 64 << 20

JudgeFn = Callable[[np.ndarray, str, str, str], int]


class BadJudgeRequest(ValueError):
    """The request is not a judge request this server understands (answered with HTTP 400)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_judge() -> Tuple[JudgeFn, Tuple[type, ...]]:
    from lens_jax.posttrain import shapes_rubrics  # the other half of the offline RL reward

    return shapes_rubrics.judge_rubric, (shapes_rubrics.RubricError,)


def _rubric_error_types() -> Tuple[type, ...]:
    try:
        from lens_jax.posttrain.shapes_rubrics import RubricError
    except Exception:  # noqa: BLE001 - an injected judge_fn does not need the shapes module
        return ()
    return (RubricError,)


def decode_data_url_png(url: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of a `data:image/png;base64,...` URL; BadJudgeRequest otherwise."""
    from PIL import Image, UnidentifiedImageError

    prefix = "data:image/png;base64,"
    if not isinstance(url, str) or not url.startswith(prefix):
        raise BadJudgeRequest(f"image_url must be a {prefix}... data URL, got {str(url)[:40]!r}")
    try:
        png = base64.b64decode(url[len(prefix):], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            if im.format != "PNG":
                raise BadJudgeRequest(f"image_url holds a {im.format} image, not a PNG")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise BadJudgeRequest(f"image_url does not hold a readable base64 PNG ({e})") from None


def parse_chat_request(body: Dict[str, Any]) -> Tuple[np.ndarray, str, str, str, int]:
    """(image, prompt, rubric_name, rubric, approx prompt tokens) of a chat.completions request body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadJudgeRequest("the request has no 'messages' list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadJudgeRequest("the request has no user message")
    content = users[-1].get("content")
    if not isinstance(content, list):
        raise BadJudgeRequest("the user message must be a list of parts (a text part and an image_url part)")
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(texts) != 1 or len(images) != 1:
        raise BadJudgeRequest(f"the user message must have exactly one text part and one image_url part, "
                              f"got {len(texts)} and {len(images)}")
    try:
        prompt, rubric_name, rubric = parse_judge_request(texts[0])
    except ValueError as e:
        raise BadJudgeRequest(str(e)) from None
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    image = decode_data_url_png(url)
    n_tokens = sum(len(m["content"].split()) for m in messages
                   if isinstance(m, dict) and isinstance(m.get("content"), str))
    n_tokens += len(texts[0].split()) + IMAGE_PROMPT_TOKENS
    return image, prompt, rubric_name, rubric, n_tokens


class JudgeHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer answering judge requests with `judge_fn`; `url` is its OpenAI base URL (".../v1")."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, judge_fn: JudgeFn, bad_request_errors: Tuple[type, ...], model: str, quiet: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.judge_fn = judge_fn
        self.bad_request_errors = (BadJudgeRequest, ValueError) + tuple(bad_request_errors)
        self.model = model
        self.quiet = quiet
        self.counts_lock = threading.Lock()
        self.counts = {"requests": 0, "ones": 0, "zeros": 0, "bad_requests": 0, "errors": 0}
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def count(self, name: str) -> None:
        with self.counts_lock:
            self.counts[name] += 1


class _Handler(BaseHTTPRequestHandler):
    server: JudgeHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # noqa: D401 - quiet unless asked
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, payload: Dict[str, Any], close: bool = False) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:  # the request body may be unread: do not reuse the connection
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, status: int, message: str, code: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": code, "param": None}}, close=True)

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [
                {"id": self.server.model, "object": "model", "created": 0, "owned_by": "lens_jax"}]})
        else:
            self._error(404, f"no such endpoint: GET {self.path}", "not_found")

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no such endpoint: POST {self.path}", "not_found")
            return
        srv = self.server
        srv.count("requests")
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY_BYTES:
                raise BadJudgeRequest(f"bad Content-Length {n}")
            body = json.loads(self.rfile.read(n))
            image, prompt, rubric_name, rubric, n_tokens = parse_chat_request(body)
            verdict = srv.judge_fn(image, prompt, rubric_name, rubric)
            if verdict not in (0, 1) or isinstance(verdict, bool):
                raise RuntimeError(f"judge_fn returned {verdict!r}, not 0 or 1")
        except srv.bad_request_errors as e:  # includes json's ValueError and the rubric parser's errors
            srv.count("bad_requests")
            self._error(400, f"{type(e).__name__}: {e}", "rubric_error" if not isinstance(e, BadJudgeRequest)
                        else "bad_request")
            return
        except Exception as e:  # noqa: BLE001 - a judge bug answers 500, the server keeps serving
            srv.count("errors")
            self._error(500, f"judge failed: {type(e).__name__}: {e}", "judge_error")
            return
        srv.count("ones" if verdict == 1 else "zeros")
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or srv.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": str(int(verdict))},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": n_tokens, "completion_tokens": 1, "total_tokens": n_tokens + 1},
        })


def make_server(host: str = "127.0.0.1", port: int = 0, judge_fn: Optional[JudgeFn] = None, *,
                allow_remote: bool = False, model: str = RULE_JUDGE_MODEL, quiet: bool = True) -> JudgeHTTPServer:
    """A bound (not yet serving) JudgeHTTPServer; call serve_forever() on it (in a thread, or the main one).

    judge_fn(image uint8 [H, W, 3], prompt, rubric_name, rubric) -> 0 | 1; default: the shapes-world rule judge
    lens_jax.posttrain.shapes_rubrics.judge_rubric. port 0 = any free port (read it from server.url).
    Raises ValueError for a non-loopback host unless allow_remote.
    """
    if not allow_remote and not _is_loopback(host):
        raise ValueError(f"refusing to serve on non-loopback host {host!r} (pass allow_remote=True / --allow_remote)")
    if judge_fn is None:
        judge_fn, errors = _default_judge()
    else:
        errors = _rubric_error_types()
    return JudgeHTTPServer((host, port), judge_fn, errors, model, quiet)
