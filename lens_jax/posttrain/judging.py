"""Judge data types without heavy dependencies: `JudgeItem` (one image, one rubric) and `parse_verdict`.

A judge (the VLM judge of vlm_judge.py, or a rule judge) answers one binary verdict per JudgeItem:
1 = the rubric is fully satisfied, 0 = it is not, None = no verdict (the request failed or the reply was not a
strict 0/1). None verdicts are never scored as 0 or 1; callers leave them out of the mean.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

import numpy as np

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclasses.dataclass
class JudgeItem:
    """One judge request: image uint8 [H, W, 3], the generation prompt, and one rubric (short name + check)."""

    image: np.ndarray
    prompt: str
    rubric_name: str
    rubric: str


def parse_verdict(text: Optional[str]) -> Optional[int]:
    """Strict binary verdict of a judge reply: 0, 1, or None when the reply is anything else.

    Accepted (after stripping surrounding whitespace): "0" / "1", optionally with one trailing period ("1."),
    or a JSON object with exactly one key, "verdict" or "score", whose value is the integer 0 or 1
    ({"verdict": 1}; also inside a ```json fence). Everything else is None: "yes", "0.5", "2", "1 because ...",
    "true", {"verdict": true}, {"verdict": "1"}, the empty string.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if s in ("0", "1"):
        return int(s)
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    if not isinstance(obj, dict) or len(obj) != 1:
        return None
    (k, v), = obj.items()
    if k not in ("verdict", "score") or isinstance(v, bool) or not isinstance(v, int) or v not in (0, 1):
        return None
    return int(v)
