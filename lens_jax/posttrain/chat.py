"""A small shared layer over an OpenAI-compatible chat endpoint: retries, concurrency, an on-disk cache, counters.

The VLM judge (vlm_judge.py) and the prompt writer (prompt_writer.py) both talk to a chat.completions endpoint
(the OpenAI API, or a local server such as vLLM or tools/serve_rule_judge.py) through `ChatService`:

    chat = ChatService(ChatConfig(base_url="http://127.0.0.1:8000/v1", model="gpt-4.1-mini", cache_dir="runs/cache"))
    chat.check_reachable()                      # raises JudgeUnavailableError naming the URL
    result = chat.complete(messages, cache_key_parts=(image_sha, prompt, rubric, model))
    results = chat.map([ChatRequest(messages, key_parts), ...])   # concurrent, order kept

Retries: 429 (rate limited), status >= 500, timeouts and connection errors are retried up to `max_retries` times
with exponential backoff (`backoff_s`, doubling, capped at `max_backoff_s`); a malformed response body is retried
too. Other 4xx statuses fail at once. A failure never raises from `complete`: it returns a `ChatResult` with
`text=None` and `error` set, and is counted in `stats['failures']`.

Cache: one append-only JSONL file, `<cache_dir>/chat_cache.jsonl`, one line per successful reply,
    {"key": sha256 hex of the JSON of cache_key_parts, "text": reply text, "usage": {...}}
flushed per line, so a crashed run resumes from what it had finished; corrupt lines (a crash mid-write) are
skipped and counted in `stats['cache_corrupt_lines']`. Only the key's hash is stored, never the request itself,
and never the API key: the key is read from the environment variable named by `api_key_env` and kept only
inside the OpenAI client (it appears in no repr, file, cache or log written here).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence

CACHE_FILE = "chat_cache.jsonl"
EMPTY_API_KEY = "EMPTY"  # what local OpenAI-compatible servers (vLLM, the rule judge) accept

COUNTERS = (
    "calls",              # complete() calls (one per logical request, cached or not)
    "requests",           # HTTP requests sent to the endpoint (retries included)
    "cache_hits",         # calls answered from the on-disk cache
    "retries",            # attempts after the first one
    "failures",           # calls that failed after all retries (or at once, on a non-retried 4xx)
    "timeouts",           # attempts that timed out
    "rate_limited",       # attempts answered 429
    "server_errors",      # attempts answered with a status >= 500
    "connection_errors",  # attempts that could not connect
    "client_errors",      # attempts answered with another 4xx (not retried)
    "bad_responses",      # attempts whose body was not a chat.completions object
    "prompt_tokens",      # usage.prompt_tokens summed over replies received (cache hits excluded)
    "completion_tokens",  # usage.completion_tokens, likewise
    "cache_corrupt_lines",  # unreadable cache lines skipped at load
)


class JudgeUnavailableError(RuntimeError):
    """The chat endpoint cannot be reached (or rejects the credentials); the message names the base URL."""


class Counters:
    """Thread-safe named integer counters; `counters['name']` reads one, `as_dict()` all of them."""

    def __init__(self, names: Sequence[str] = ()):
        self._lock = threading.Lock()
        self._values: Dict[str, int] = {n: 0 for n in names}

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + int(n)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def get(self, name: str, default: int = 0) -> int:
        with self._lock:
            return self._values.get(name, default)

    def items(self):
        return self.as_dict().items()

    def as_dict(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._values)

    def __repr__(self) -> str:
        return f"Counters({self.as_dict()})"


@dataclasses.dataclass
class ChatConfig:
    """Where and how to call the chat endpoint. Holds the *name* of the API-key variable, never the key.

    timeout_s: per-attempt HTTP timeout in seconds. max_retries: retries after the first attempt.
    backoff_s: the first backoff sleep in seconds; it doubles per retry, capped at max_backoff_s.
    concurrency: worker threads of `ChatService.map`. temperature / max_tokens: None = the server's default.
    cache_dir: '' = no cache. price_per_1m_input / price_per_1m_output: USD per 1M prompt / completion tokens.
    progress: show a tqdm bar in `map` (only when stderr is a terminal).
    """

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4.1-mini"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    concurrency: int = 16
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    cache_dir: str = ""
    price_per_1m_input: float = 0.0
    price_per_1m_output: float = 0.0
    progress: bool = True

    def __post_init__(self):
        if not self.base_url:
            raise ValueError("ChatConfig.base_url is empty")
        if not self.model:
            raise ValueError("ChatConfig.model is empty")
        if self.timeout_s <= 0:
            raise ValueError(f"ChatConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"ChatConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("ChatConfig.backoff_s and max_backoff_s must be >= 0")
        if self.concurrency < 1:
            raise ValueError(f"ChatConfig.concurrency must be >= 1, got {self.concurrency}")


@dataclasses.dataclass
class ChatRequest:
    """One chat.completions call: OpenAI-format `messages` and the parts its cache key is hashed from."""

    messages: List[Dict[str, Any]]
    cache_key_parts: Sequence[Any]
    max_tokens: Optional[int] = None      # overrides ChatConfig.max_tokens when set
    temperature: Optional[float] = None   # overrides ChatConfig.temperature when set
    cache_if: Optional[Callable[[str], bool]] = None  # cache the reply only when cache_if(text) is true


@dataclasses.dataclass
class ChatResult:
    """The reply text (None on failure), the error (None on success), token usage, and how it was obtained."""

    text: Optional[str]
    error: Optional[str] = None
    usage: Dict[str, int] = dataclasses.field(default_factory=dict)  # prompt_tokens, completion_tokens
    cached: bool = False
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


def cache_key(parts: Sequence[Any]) -> str:
    """sha256 hex digest of the canonical JSON of `parts` (a list of JSON-serialisable values)."""
    blob = json.dumps(list(parts), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _DiskCache:
    """Append-only JSONL cache of successful replies, loaded into a dict at start; thread-safe appends."""

    def __init__(self, cache_dir: str, counters: Counters):
        os.makedirs(cache_dir, exist_ok=True)
        self.path = os.path.join(cache_dir, CACHE_FILE)
        self._lock = threading.Lock()
        self._entries: Dict[str, Dict[str, Any]] = {}
        needs_newline = False
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            needs_newline = bool(data) and not data.endswith(b"\n")
            for line in data.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not (isinstance(rec, dict) and isinstance(rec.get("key"), str)
                            and isinstance(rec.get("text"), str)):
                        raise ValueError("not a cache record")
                except ValueError:
                    counters.inc("cache_corrupt_lines")
                    continue
                self._entries[rec["key"]] = rec
        self._file = open(self.path, "a", encoding="utf-8")
        if needs_newline:  # a partial last line from a crash: end it so the next record starts clean
            self._file.write("\n")
            self._file.flush()

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, text: str, usage: Dict[str, int]) -> None:
        rec = {"key": key, "text": text, "usage": usage}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[key] = rec
            self._file.write(line)
            self._file.flush()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


class ChatService:
    """Calls an OpenAI-compatible chat.completions endpoint with retries, a disk cache and counters (`stats`)."""

    def __init__(self, config: ChatConfig):
        import openai  # imported here so modules that only need the data types work without it

        self.config = config
        self.stats = Counters(COUNTERS)
        self._openai = openai
        # The key lives only inside the client; "EMPTY" when the variable is unset (local servers).
        self._client = openai.OpenAI(base_url=config.base_url,
                                     api_key=os.environ.get(config.api_key_env) or EMPTY_API_KEY,
                                     timeout=config.timeout_s, max_retries=0)
        self._cache = _DiskCache(config.cache_dir, self.stats) if config.cache_dir else None

    def _redact(self, text: str) -> str:
        """`text` with the API key masked, should an endpoint echo it back in an error message."""
        key = self._client.api_key
        if isinstance(key, str) and len(key) >= 8 and key != EMPTY_API_KEY:
            text = text.replace(key, "***")
        return text

    def __repr__(self) -> str:
        return (f"ChatService(base_url={self.config.base_url!r}, model={self.config.model!r}, "
                f"cache={self.cache_path!r})")

    @property
    def cache_path(self) -> str:
        """The cache JSONL file, or '' without a cache."""
        return self._cache.path if self._cache is not None else ""

    def close(self) -> None:
        """Closes the cache file and the HTTP client."""
        if self._cache is not None:
            self._cache.close()
        self._client.close()

    def __enter__(self) -> "ChatService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reachability ---------------------------------------------------------------------------------------------

    def check_reachable(self, timeout_s: float = 10.0) -> List[str]:
        """One cheap request (GET /models). Returns the model ids served; raises JudgeUnavailableError when the
        endpoint cannot be reached, times out, or rejects the API key (401/403). Any other HTTP answer (a server
        without /models, say) counts as reachable."""
        oa = self._openai
        url = self.config.base_url
        client = self._client.with_options(timeout=min(timeout_s, self.config.timeout_s), max_retries=0)
        try:
            page = client.models.list()
            return [m.id for m in getattr(page, "data", []) or []]
        except oa.APITimeoutError as e:
            raise JudgeUnavailableError(f"chat endpoint {url} did not answer within {timeout_s:g} s ({e})") from None
        except oa.APIConnectionError as e:
            raise JudgeUnavailableError(f"chat endpoint {url} is unreachable: {self._redact(str(e))} "
                                        f"(is the server running and the URL right?)") from None
        except oa.APIStatusError as e:
            if e.status_code in (401, 403):
                raise JudgeUnavailableError(
                    f"chat endpoint {url} rejected the API key from ${self.config.api_key_env} "
                    f"(HTTP {e.status_code})") from None
            return []

    # -- one request ----------------------------------------------------------------------------------------------

    def _backoff(self, retry_index: int) -> float:
        return min(self.config.backoff_s * (2.0 ** retry_index), self.config.max_backoff_s)

    def complete(self, messages: List[Dict[str, Any]], *, cache_key_parts: Optional[Sequence[Any]] = None,
                 max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 cache_if: Optional[Callable[[str], bool]] = None) -> ChatResult:
        """One chat completion; returns ChatResult(text, error, usage). Never raises on API failures.

        cache_key_parts: JSON-serialisable values the reply is cached under (None = do not cache this call).
        The config's model is *not* added to the key: callers include it in the parts.
        max_tokens / temperature: per-call overrides of the config's values.
        cache_if: a successful reply is cached only when cache_if(text) is true (e.g. only parseable verdicts).
        """
        cfg = self.config
        oa = self._openai
        self.stats.inc("calls")
        key = cache_key(cache_key_parts) if (self._cache is not None and cache_key_parts is not None) else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                self.stats.inc("cache_hits")
                return ChatResult(text=hit["text"], usage=dict(hit.get("usage") or {}), cached=True)

        kwargs: Dict[str, Any] = {"model": cfg.model, "messages": messages}
        mt = max_tokens if max_tokens is not None else cfg.max_tokens
        if mt is not None:
            kwargs["max_tokens"] = int(mt)
        temp = temperature if temperature is not None else cfg.temperature
        if temp is not None:
            kwargs["temperature"] = float(temp)

        error = "no attempt made"
        attempts = 0
        for attempt in range(cfg.max_retries + 1):
            if attempt > 0:
                self.stats.inc("retries")
                time.sleep(self._backoff(attempt - 1))
            attempts += 1
            self.stats.inc("requests")
            try:
                resp = self._client.chat.completions.create(**kwargs)
                text, usage = self._read_response(resp)
            except oa.RateLimitError as e:
                self.stats.inc("rate_limited")
                error = f"HTTP 429 rate limited: {_short(e)}"
                continue
            except oa.APIStatusError as e:
                if e.status_code >= 500:
                    self.stats.inc("server_errors")
                    error = f"HTTP {e.status_code} server error: {_short(e)}"
                    continue
                self.stats.inc("client_errors")
                error = f"HTTP {e.status_code}: {_short(e)}"
                break  # other 4xx: the request itself is wrong, retrying cannot help
            except oa.APITimeoutError:
                self.stats.inc("timeouts")
                error = f"timed out after {cfg.timeout_s:g} s"
                continue
            except oa.APIConnectionError as e:
                self.stats.inc("connection_errors")
                error = f"connection error to {cfg.base_url}: {_short(e)}"
                continue
            except (oa.APIResponseValidationError, _BadResponse, ValueError) as e:
                self.stats.inc("bad_responses")
                error = f"malformed response: {_short(e)}"
                continue
            self.stats.inc("prompt_tokens", usage.get("prompt_tokens", 0))
            self.stats.inc("completion_tokens", usage.get("completion_tokens", 0))
            if key is not None and (cache_if is None or cache_if(text)):
                self._cache.put(key, text, usage)
            return ChatResult(text=text, usage=usage, attempts=attempts)
        self.stats.inc("failures")
        return ChatResult(text=None, error=self._redact(f"{error} (after {attempts} attempt(s))"), attempts=attempts)

    @staticmethod
    def _read_response(resp: Any):
        """(text, usage) of a chat.completions response; raises _BadResponse when it is not one."""
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _BadResponse(f"no choices in the response ({type(resp).__name__})")
        message = getattr(choices[0], "message", None)
        if message is None:
            raise _BadResponse("the first choice has no message")
        text = message.content if isinstance(message.content, str) else ""
        usage: Dict[str, int] = {}
        u = getattr(resp, "usage", None)
        if u is not None:
            usage = {"prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                     "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
        return text, usage

    # -- many requests --------------------------------------------------------------------------------------------

    def map(self, requests: Sequence[Any], *, progress: Optional[bool] = None, desc: str = "chat") -> List[ChatResult]:
        """Runs `requests` (ChatRequest, or (messages, cache_key_parts) pairs) on `concurrency` threads and
        returns their ChatResults in the same order. progress: a tqdm bar (default: config.progress), shown only
        when stderr is a terminal."""
        reqs = [r if isinstance(r, ChatRequest) else ChatRequest(*r) for r in requests]
        results: List[Optional[ChatResult]] = [None] * len(reqs)
        if not reqs:
            return []
        show = (self.config.progress if progress is None else progress) and sys.stderr.isatty()
        bar = None
        if show:
            from tqdm import tqdm
            bar = tqdm(total=len(reqs), desc=desc, unit="req", leave=False)

        def run(r: ChatRequest) -> ChatResult:
            return self.complete(r.messages, cache_key_parts=r.cache_key_parts, max_tokens=r.max_tokens,
                                 temperature=r.temperature, cache_if=r.cache_if)

        try:
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(reqs))) as pool:
                futures = {pool.submit(run, r): i for i, r in enumerate(reqs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    # -- accounting -----------------------------------------------------------------------------------------------

    def cost_usd(self) -> float:
        """USD spent so far: prompt/completion tokens of replies received times the configured prices."""
        return (self.stats["prompt_tokens"] * self.config.price_per_1m_input
                + self.stats["completion_tokens"] * self.config.price_per_1m_output) / 1e6

    def usage_summary(self) -> Dict[str, Any]:
        """Token counts, cost and request counters as one dict (for logs and CLI summaries)."""
        d: Dict[str, Any] = self.stats.as_dict()
        d["cost_usd"] = self.cost_usd()
        return d


class _BadResponse(Exception):
    """The endpoint answered 2xx with something that is not a chat.completions object."""


def _short(e: BaseException, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + "..."
