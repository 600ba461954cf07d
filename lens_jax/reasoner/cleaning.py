"""Cleaning of a reasoner's raw reply into one plain T2I prompt (LENS_SPEC §9.1), and a script check.

`clean_rewrite(text)` removes, in order:
  * Harmony structure: when a ``<|channel|>final<|message|>`` marker is present only the text after the last
    one is kept (up to ``<|return|>`` / ``<|end|>``); any remaining ``<|...|>`` markers and channel headers go;
  * ``<think> ... </think>`` blocks (an unclosed ``<think>`` drops everything after it);
  * Markdown code fences (the fenced content is kept, the fence lines go);
  * a leading "Prompt:" / "Rewritten prompt:" label;
  * surrounding quotes (straight, curly, guillemets, CJK brackets), repeatedly;
  * surplus whitespace (runs collapsed to one space).
An empty result means the rewrite failed; callers fall back to the original prompt.

`dominant_script(text)` names the Unicode script most letters belong to ('LATIN', 'CJK', 'CYRILLIC', ...), so a
rewrite that answered in another language than the user's can be detected (`same_language`).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Optional

_FINAL = re.compile(r"<\|channel\|>\s*final\s*<\|message\|>", re.IGNORECASE)
_END = re.compile(r"<\|(?:return|end|call|endoftext)\|>")
_MARKER = re.compile(r"<\|[a-z_]+\|>")
# A Harmony header left over once markers are removed: "assistant", "analysis", "final", "commentary".
_HEADER = re.compile(r"^(?:\s*(?:assistant|analysis|final|commentary)\b)+", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"^.*?</think>", re.IGNORECASE | re.DOTALL)
_FENCE = re.compile(r"^\s*```[\w+-]*\s*$", re.MULTILINE)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten |final |improved |t2i |image )?prompt(?:\*\*)?\s*:\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "\u300c": "\u300d",
           "\u300e": "\u300f", "`": "`"}


def harmony_final(text: str) -> Optional[str]:
    """The content of the last ``final`` channel message of a Harmony completion, or None when there is none."""
    parts = _FINAL.split(text)
    if len(parts) < 2:
        return None
    return _END.split(parts[-1], maxsplit=1)[0]


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        inner = text[1:-1].strip()
        if text[0] in inner and text[0] in "\"'":   # '"a" and "b"' is not one quoted string
            break
        text = inner
    return text


def clean_rewrite(text: Optional[str]) -> str:
    """One plain prompt from a raw reply (module docstring); '' when nothing usable remains."""
    if not text:
        return ""
    final = harmony_final(text)
    if final is not None:
        text = final
    elif "<|channel|>" in text:
        return ""   # Harmony output with no final channel: only reasoning, no answer
    text = _THINK.sub(" ", text)
    text = _THINK_OPEN.sub(" ", text)
    text = _THINK_CLOSE.sub(" ", text)     # a reply that starts inside a think block
    text = _MARKER.sub(" ", text)
    text = _HEADER.sub("", text)
    text = _FENCE.sub(" ", text)
    text = " ".join(text.split())
    text = _LABEL.sub("", text)
    return _strip_quotes(text.strip()).strip()


def dominant_script(text: str) -> str:
    """The Unicode script of most letters in `text` ('LATIN', 'CJK', 'HIRAGANA', ...); '' without letters."""
    counts: Counter = Counter()
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = name.split(" ")[0] if name else ""
        if script in ("HIRAGANA", "KATAKANA", "CJK", "HANGUL"):
            script = "CJK"     # Japanese mixes kana and kanji; one bucket for East-Asian scripts
        counts[script] += 1
    return counts.most_common(1)[0][0] if counts else ""


def same_language(original: str, rewrite: str) -> bool:
    """False when the rewrite is written in another script than the original (e.g. a Chinese prompt answered
    in English). Prompts without letters, or in one script, always pass."""
    a, b = dominant_script(original), dominant_script(rewrite)
    return not a or not b or a == b
