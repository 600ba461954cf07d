"""The VLM judge of Lens RL (spec §8.3): a chat model sees the image, the prompt and one rubric, and answers 1 or 0.

    chat = ChatService(ChatConfig(base_url=..., model="gpt-4.1-mini", cache_dir="runs/judge_cache"))
    judge = VLMJudge(chat)
    verdicts = judge.judge_batch([JudgeItem(image_uint8_hw3, prompt, "Object Count Consistency", "There are ..."), ...])

One rubric per request. The request is a system message (a strict binary judge: reply exactly 1 or 0) and a user
message with two parts: a text part laid out by `format_judge_request` (the prompt, the rubric name and the rubric
check between tags; `parse_judge_request` inverts it, which is how tools/serve_rule_judge.py reads it) and an
`image_url` part holding the image as a base64 PNG data URL (`data:image/png;base64,...`, encoded with Pillow).

Verdicts are parsed strictly (judging.parse_verdict): a reply that is not 0/1 is None and counted in
`stats['unparseable']`; a request that failed after the ChatService's retries is None and counted in
`stats['failed']`. Replies are cached (when the ChatService has a cache_dir; parseable verdicts only, so
an unparseable reply is asked again on a rerun) under (sha256 of the PNG bytes, prompt, rubric name, rubric, model).
"""
from __future__ import annotations

import base64
import hashlib
import io
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.posttrain.chat import ChatRequest, ChatService, Counters
from lens_jax.posttrain.judging import JudgeItem, parse_verdict

SYSTEM_PROMPT = (
    "You are a strict binary judge of generated images. You are given an image, the text prompt it was "
    "generated from, and one rubric: a short name and a check. Decide whether the image fully satisfies the "
    "rubric check. Answer exactly 1 if it is fully satisfied, and exactly 0 otherwise (partly satisfied, "
    "violated, or impossible to verify in the image). Reply with the single character 1 or 0 and nothing else."
)

_FIELDS = ("prompt", "rubric_name", "rubric_check")
_HEADER = "Judge the image against one rubric."
_FOOTER = "Reply with exactly 1 if the image fully satisfies the rubric check, otherwise 0."
_REQUEST_RE = re.compile(
    r"\A" + re.escape(_HEADER) + r"\n\n"
    + r"\n\n".join(rf"<{f}>\n(?P<{f}>.*?)\n</{f}>" for f in _FIELDS)
    + r"\n\n" + re.escape(_FOOTER) + r"\Z", re.DOTALL)
JUDGE_MAX_TOKENS = 16  # completion budget of one verdict (a reply of "0" or "1" is one token)


def format_judge_request(prompt: str, rubric_name: str, rubric: str) -> str:
    """The text part of a judge request:

        Judge the image against one rubric.

        <prompt>
        {prompt}
        </prompt>

        <rubric_name>
        {rubric_name}
        </rubric_name>

        <rubric_check>
        {rubric}
        </rubric_check>

        Reply with exactly 1 if the image fully satisfies the rubric check, otherwise 0.

    Raises ValueError when a field is not a string or contains one of the tags (the layout would not invert).
    """
    values = {"prompt": prompt, "rubric_name": rubric_name, "rubric_check": rubric}
    for field, value in values.items():
        if not isinstance(value, str):
            raise ValueError(f"judge request {field} must be a string, got {type(value).__name__}")
        for tag in _FIELDS:
            if f"<{tag}>" in value or f"</{tag}>" in value:
                raise ValueError(f"judge request {field} contains the reserved tag <{tag}>: {value[:80]!r}")
    body = "\n\n".join(f"<{f}>\n{values[f]}\n</{f}>" for f in _FIELDS)
    return f"{_HEADER}\n\n{body}\n\n{_FOOTER}"


def parse_judge_request(text: str) -> Tuple[str, str, str]:
    """Inverts format_judge_request: (prompt, rubric_name, rubric). Raises ValueError for any other layout."""
    m = _REQUEST_RE.match(text or "")
    if m is None:
        raise ValueError("the text part is not a judge request in the layout of format_judge_request "
                         f"(starts {str(text)[:60]!r})")
    return m.group("prompt"), m.group("rubric_name"), m.group("rubric_check")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes (Pillow) of a uint8 image [H, W, 3] (RGB). Raises ValueError for another dtype or shape."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"judge image must be uint8, got {a.dtype}")
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"judge image must be [H, W, 3], got shape {tuple(a.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(png: bytes) -> str:
    """`data:image/png;base64,...` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_judge_messages(png: bytes, prompt: str, rubric_name: str, rubric: str) -> List[dict]:
    """The chat messages of one judge request (system + user with a text part and an image_url part)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [
            {"type": "text", "text": format_judge_request(prompt, rubric_name, rubric)},
            {"type": "image_url", "image_url": {"url": png_data_url(png)}},
        ]},
    ]


def _parseable(text: str) -> bool:
    return parse_verdict(text) is not None


class VLMJudge:
    """Binary rubric judge over a ChatService. `stats`: judged, ones, zeros, unparseable, failed, invalid."""

    def __init__(self, chat: ChatService, *, max_tokens: Optional[int] = JUDGE_MAX_TOKENS,
                 temperature: Optional[float] = 0.0):
        """max_tokens / temperature: per-request values (None = the ChatConfig's). Temperature 0 by default so a
        verdict is reproducible; max_tokens small because a verdict is a single character."""
        self.chat = chat
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stats = Counters(("judged", "ones", "zeros", "unparseable", "failed", "invalid"))

    def close(self) -> None:
        """Closes the ChatService (its cache file and HTTP client)."""
        self.chat.close()

    def judge(self, image: np.ndarray, prompt: str, rubric_check: str, rubric_name: str = "") -> Optional[int]:
        """Verdict (1, 0, or None) of one image [H, W, 3] uint8 against one rubric."""
        return self.judge_batch([JudgeItem(image, prompt, rubric_name, rubric_check)])[0]

    def judge_batch(self, items: Sequence[JudgeItem]) -> List[Optional[int]]:
        """Verdicts of `items` in order, requested concurrently (ChatService.map). A None is either a failed
        request (stats['failed']), an unparseable reply (stats['unparseable']), or an item that cannot be sent
        (wrong image dtype/shape, a field holding a reserved tag: stats['invalid'])."""
        model = self.chat.config.model
        verdicts: List[Optional[int]] = [None] * len(items)
        requests: List[ChatRequest] = []
        slots: List[int] = []
        png_cache = {}  # the same image is judged against many rubrics: encode it once
        for i, it in enumerate(items):
            try:
                key = id(it.image)
                if key not in png_cache:
                    png_cache[key] = encode_png(it.image)
                png = png_cache[key]
                messages = build_judge_messages(png, it.prompt, it.rubric_name, it.rubric)
            except ValueError:
                self.stats.inc("invalid")
                continue
            parts = ("vlm_judge/v1", hashlib.sha256(png).hexdigest(), it.prompt, it.rubric_name, it.rubric, model)
            requests.append(ChatRequest(messages, parts, max_tokens=self.max_tokens, temperature=self.temperature,
                                        cache_if=_parseable))
            slots.append(i)
        results = self.chat.map(requests, desc="judge") if requests else []
        for i, res in zip(slots, results):
            if not res.ok:
                self.stats.inc("failed")
                continue
            v = parse_verdict(res.text)
            if v is None:
                self.stats.inc("unparseable")
                continue
            self.stats.inc("judged")
            self.stats.inc("ones" if v == 1 else "zeros")
            verdicts[i] = v
        return verdicts
