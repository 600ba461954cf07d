"""Harmony chat template for the Lens GPT-OSS text encoder (LENS_SPEC §4.3).

The Lens conversation has three turns -- system, user (the prompt) and an assistant turn with empty content and a
fixed "thinking" text. The official pipeline renders it with the GPT-OSS tokenizer's chat template
(``add_generation_prompt=False``) and keeps the text before ``<|return|>``. The result is the concatenation of five
segments with no separators between them::

    1. <|start|>system<|message|>You are ChatGPT, ...Current date: YYYY-MM-DD\\n\\nReasoning: medium\\n\\n# Valid ...<|end|>
    2. <|start|>developer<|message|># Instructions\\n\\n{SYSTEM}\\n\\n<|end|>
    3. <|start|>user<|message|>{PROMPT}<|end|>
    4. <|start|>assistant<|channel|>analysis<|message|>{THINKING}<|end|>
    5. <|start|>assistant<|channel|>final<|message|>

Everything up to and including ``<|start|>user<|message|>`` (segments 1-2 plus the head of segment 3) is the
*prefix*; with the real tokenizer and the pinned date it is exactly ``DEFAULT_TXT_OFFSET = 97`` tokens, which are
stripped from the encoder features before they reach the DiT.

This module only produces strings; tokenisation lives in :mod:`lens_jax.text.prompt_encoding`.
"""
from __future__ import annotations

import datetime as _dt
import re

__all__ = [
    "LENS_SYSTEM_PROMPT",
    "LENS_THINKING",
    "DEFAULT_DATE",
    "DEFAULT_TXT_OFFSET",
    "PAD_TOKEN_ID",
    "PAD_TOKEN",
    "MAX_LENGTH",
    "HARMONY_SPECIAL_TOKENS",
    "validate_date",
    "render_prompt",
    "render_prefix",
    "render_suffix",
    "render_generation_prompt",
]

# System prompt placed in the developer turn ("# Instructions").
LENS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background."
)
# Fixed analysis-channel text of the (otherwise empty) assistant turn.
LENS_THINKING = "Need to generate one image according to the description."
# ComfyUI pins this date; the official pipeline uses today's date (LENS_SPEC §4.3, §12 item 11).
DEFAULT_DATE = "2026-05-23"
# Token count of `render_prefix()` with the real GPT-OSS tokenizer and the pinned date.
DEFAULT_TXT_OFFSET = 97
# Right-padding id: `<|endoftext|>` in the GPT-OSS (o200k_harmony) vocabulary.
PAD_TOKEN_ID = 199999
PAD_TOKEN = "<|endoftext|>"
# Maximum length of the *whole* templated sequence, in tokens (prefix included).
MAX_LENGTH = 512

# Special tokens that appear in the rendered template (plus the pad and the end-of-generation token).
HARMONY_SPECIAL_TOKENS = (
    "<|start|>",
    "<|message|>",
    "<|end|>",
    "<|channel|>",
    "<|return|>",
    "<|endoftext|>",
)

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def validate_date(date: str | _dt.date) -> str:
    """Returns `date` as a ``YYYY-MM-DD`` string, raising ``ValueError`` if it is not a valid calendar date.

    A ``datetime.date`` (or ``datetime.datetime``) is accepted and formatted.
    """
    if isinstance(date, _dt.datetime):
        date = date.date()
    if isinstance(date, _dt.date):
        return date.isoformat()
    if not isinstance(date, str) or not _DATE_RE.match(date):
        raise ValueError(f"Harmony date must be a 'YYYY-MM-DD' string (e.g. {DEFAULT_DATE!r}); got {date!r}.")
    try:
        _dt.date.fromisoformat(date)
    except ValueError as e:
        raise ValueError(f"Harmony date {date!r} is not a valid calendar date: {e}") from None
    return date


REASONING_EFFORTS = ("low", "medium", "high")


def _system_segment(date: str, reasoning: str = "medium") -> str:
    """Segment 1: the Harmony system message with the knowledge cutoff, date and reasoning effort."""
    if reasoning not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort {reasoning!r}; choose one of {REASONING_EFFORTS}")
    return (
        "<|start|>system<|message|>"
        "You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n"
        f"Current date: {date}\n"
        "\n"
        f"Reasoning: {reasoning}\n"
        "\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
        "<|end|>"
    )


def _developer_segment(system: str) -> str:
    """Segment 2: the developer turn carrying the Lens system prompt as instructions."""
    return "<|start|>developer<|message|># Instructions\n\n" + system + "\n\n<|end|>"


_USER_HEAD = "<|start|>user<|message|>"


def render_prefix(date: str | _dt.date = DEFAULT_DATE, system: str = LENS_SYSTEM_PROMPT) -> str:
    """Segments 1-2 plus ``<|start|>user<|message|>``: the part removed by the text offset.

    With the real GPT-OSS tokenizer and the default arguments this tokenises to exactly 97 tokens.
    """
    date = validate_date(date)
    if not isinstance(system, str):
        raise TypeError(f"system prompt must be a str; got {type(system).__name__}")
    return _system_segment(date) + _developer_segment(system) + _USER_HEAD


def render_suffix(thinking: str = LENS_THINKING) -> str:
    """What follows the user prompt: ``<|end|>`` of segment 3, then segments 4 and 5."""
    if not isinstance(thinking, str):
        raise TypeError(f"thinking must be a str; got {type(thinking).__name__}")
    return (
        "<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>" + thinking + "<|end|>"
        "<|start|>assistant<|channel|>final<|message|>"
    )


def render_prompt(
    prompt: str,
    date: str | _dt.date = DEFAULT_DATE,
    system: str = LENS_SYSTEM_PROMPT,
    thinking: str = LENS_THINKING,
) -> str:
    """Renders the full Lens Harmony conversation for one user prompt (LENS_SPEC §4.3, five segments).

    Args:
      prompt: the user prompt. An empty string is allowed (the conversation then has an empty user turn).
      date: ``YYYY-MM-DD`` date for the system message (default: the pinned 2026-05-23).
      system: the Lens system prompt (developer instructions).
      thinking: the assistant's analysis-channel text.

    Returns:
      ``render_prefix(date, system) + prompt + render_suffix(thinking)``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
    return render_prefix(date, system) + prompt + render_suffix(thinking)


def render_generation_prompt(prompt: str, system: str, date: str | _dt.date = DEFAULT_DATE,
                             reasoning_effort: str = "low") -> str:
    """A generation conversation for GPT-OSS run as a chat model (the reasoner, LENS_SPEC §9.1): the system
    message with `reasoning_effort`, `system` as developer instructions, the user turn, then the generation prompt
    ``<|start|>assistant``. The model continues with its analysis channel and a ``final`` channel answer."""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise TypeError("prompt and system must be str")
    return (_system_segment(validate_date(date), reasoning_effort) + _developer_segment(system)
            + _USER_HEAD + prompt + "<|end|><|start|>assistant")
