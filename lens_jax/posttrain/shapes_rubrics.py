"""Rule-checkable rubrics of the shapes world: their text, their parser and the rule judge (LENS_SPEC §8.10).

A rubric is (name, check). The check is an English sentence a VLM can judge and this module can parse back
(one grammar, `parse_check`), so the same rubric file drives the rule judge in-process and through an
OpenAI-compatible server (tools/serve_rule_judge.py). Checks (shape: circle / square / triangle / diamond,
colour: a palette name of lens_jax/data/synthetic.py, N: a number word or digits):

  count      "The image contains exactly N <shape>s."            recognised <shape>s == N
  color      "Every <shape> in the image is <colour>."           >= 1 <shape> and all of them <colour>
  relation   "The <shape> is <left of|right of|above|below> the <shape>."
                                                                  the largest of each: GenEval's relation rule
  only       "The image contains no objects other than <shape>s, <shape>s and <shape>s."
                                                                  every recognised object is of a listed shape
  integrity  GLOBAL_RUBRIC's check                               ShapesEval's integrity rule (no spurious
                                                                  blob, little clutter: lens_jax/eval/shapes_eval.py)

A verdict is 1 (satisfied) or 0; a check outside the grammar raises RubricError.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, relative_position

GLOBAL_RUBRIC_NAME = "Structural Integrity (Overall)"
GLOBAL_RUBRIC = ("The whole image is coherent and physically plausible: every object is complete and cleanly "
                 "drawn, with no missing, duplicated, floating, fragmented, merged or distorted parts and no "
                 "stray marks.")
RELATIONS = ("left of", "right of", "above", "below")
_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}


class RubricError(ValueError):
    """A rubric check the shapes-world grammar does not cover."""


@dataclasses.dataclass(frozen=True)
class Check:
    kind: str                                   # count | color | relation | only | integrity
    shape: str = ""
    count: int = 0
    color: str = ""
    relation: str = ""
    other: str = ""
    shapes: Tuple[str, ...] = ()


def plural(shape: str) -> str:
    return shape + "s"


def _number(word: str) -> int:
    w = word.lower()
    if w.isdigit():
        return int(w)
    if w in _WORD_NUMBERS:
        return _WORD_NUMBERS[w]
    raise RubricError(f"unknown number {word!r}")


def _shape(word: str) -> str:
    w = word.lower()
    w = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
    if w not in SHAPES:
        raise RubricError(f"unknown shape {word!r} (known: {SHAPES})")
    return w


# ------------------------------------------------------------------------------------------ text

def count_check(shape: str, n: int) -> str:
    return f"The image contains exactly {NUMBER_WORDS.get(n, str(n))} {plural(shape) if n != 1 else shape}."


def color_check(shape: str, color: str) -> str:
    return f"Every {shape} in the image is {color}."


def relation_check(a: str, relation: str, b: str) -> str:
    return f"The {a} is {relation} the {b}."


def only_check(shapes: Sequence[str]) -> str:
    names = [plural(s) for s in shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The image contains no objects other than {listed}."


# ------------------------------------------------------------------------------------------ parsing

_PATTERNS = (
    ("count", re.compile(r"the image contains exactly (\w+) (\w+)\.?")),
    ("color", re.compile(r"every (\w+) in the image is (\w+)\.?")),
    ("relation", re.compile(r"the (\w+) is (left of|right of|above|below) the (\w+)\.?")),
    ("only", re.compile(r"the image contains no objects other than (.+?)\.?")),
)


def parse_check(check: str) -> Check:
    """The Check a rubric sentence states; RubricError if it is not in the grammar (module docstring)."""
    text = " ".join(str(check).strip().split())
    if not text:
        raise RubricError("empty rubric check")
    if text == GLOBAL_RUBRIC:
        return Check("integrity")
    low = text.lower()
    for kind, pat in _PATTERNS:
        m = pat.fullmatch(low)
        if not m:
            continue
        if kind == "count":
            return Check("count", shape=_shape(m.group(2)), count=_number(m.group(1)))
        if kind == "color":
            if m.group(2) not in COLORS:
                raise RubricError(f"unknown colour {m.group(2)!r} in {check!r}")
            return Check("color", shape=_shape(m.group(1)), color=m.group(2))
        if kind == "relation":
            return Check("relation", shape=_shape(m.group(1)), relation=m.group(2), other=_shape(m.group(3)))
        parts = re.split(r",\s*|\s+and\s+", m.group(1))
        return Check("only", shapes=tuple(_shape(p.strip()) for p in parts if p.strip()))
    raise RubricError(f"rubric check {check!r} is not a shapes-world check (see lens_jax/posttrain/shapes_rubrics.py)")


# ------------------------------------------------------------------------------------------ judging

def verdict(check: Check, detections: Sequence[dict], integrity: dict) -> int:
    """1 if the detections (ShapesEval's analyze_image) satisfy `check`, else 0."""
    known = [d for d in detections if d["shape"] not in (None, "unknown")]
    by_shape: Dict[str, List[dict]] = {}
    for d in sorted(known, key=lambda d: -d["area"]):
        by_shape.setdefault(d["shape"], []).append(d)
    if check.kind == "integrity":
        return int(bool(integrity["clean"]))
    if check.kind == "count":
        return int(len(by_shape.get(check.shape, [])) == check.count)
    if check.kind == "color":
        objs = by_shape.get(check.shape, [])
        return int(bool(objs) and all(d["color"] == check.color for d in objs))
    if check.kind == "relation":
        a, b = by_shape.get(check.shape, []), by_shape.get(check.other, [])
        if not a or not b:
            return 0
        return int(check.relation in relative_position(a[0]["bbox"], b[0]["bbox"]))
    if check.kind == "only":
        return int(bool(known) and all(d["shape"] in check.shapes for d in known))
    raise RubricError(f"unknown check kind {check.kind!r}")


def analyze(image: np.ndarray):
    """(detections, integrity) of one uint8 [H, W, 3] image (ShapesEval's detector)."""
    from lens_jax.eval.shapes_eval import analyze_image
    return analyze_image(image)


def judge_rubric(image: np.ndarray, prompt: str, rubric_name: str, rubric: str) -> int:
    """The rule judge's 0/1 verdict of one rubric on one image (the prompt and name are not needed by the
    rules; the check sentence says everything). RubricError for a check outside the grammar."""
    check = parse_check(rubric)
    dets, integ = analyze(np.asarray(image))
    return verdict(check, dets, integ)


def judge_image(image: np.ndarray, rubrics: Dict[str, str]) -> Dict[str, int]:
    """{rubric name: verdict} for every rubric of one image, analysing the image once."""
    checks = {name: parse_check(text) for name, text in rubrics.items()}
    dets, integ = analyze(np.asarray(image))
    return {name: verdict(c, dets, integ) for name, c in checks.items()}


def rubric_family(name: str) -> str:
    """'Object Count Consistency (circle)' -> 'Object Count Consistency' (per-rubric pass-rate groups)."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", name).strip() or name


def check_or_none(rubric: str) -> Optional[Check]:
    try:
        return parse_check(rubric)
    except RubricError:
        return None
