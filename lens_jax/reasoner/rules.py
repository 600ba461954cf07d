"""The shapes-world rule rewriter: a short GenEval-style prompt -> the world's dense-caption style, steered by a
textual "system prompt" of directives (LENS_SPEC §9.6).

The system prompt is plain text, one `key: value` directive per line ('#' starts a comment; unknown keys and bad
values are errors naming the line), e.g. DEFAULT_DIRECTIVES:

    enumerate_instances: yes   # one sentence per object instance ("three circles" -> three sentences)
    state_positions: yes       # each object's place, inferred from the canonical layout (below)
    relations: yes             # a sentence per pair of placed objects ("The circle is to the left of the square.")
    count_summary: yes         # "In total there are two circles and one square."
    color_summary: yes         # "By color, there are ..." (when every colour is known)
    expand_attributes: yes     # a size word on every object ("medium-sized")
    size_word: medium-sized    # the size word used
    unspecified_color: keep    # keep = leave uncoloured objects uncoloured | a colour name to give them
    pair_layout: side          # side (left, right) | stacked (top, bottom): where an unrelated pair goes
    background: white          # the background to name ('none' = do not name one)
    opening: yes               # "The image shows two flat-colored shapes on a plain white background."
    style_sentence: yes        # the flat-fill, crisp-edge sentence of the training captions
    target_words: 0            # > 0: add the optional detail sentences until the rewrite has this many words
    keep_detailed_words: 40    # a prompt of at least this many words is returned unchanged

Positions follow the world's canonical layout (lens_jax/data/synthetic.py CANONICAL_CELLS): one object in the
centre; a pair side by side or stacked, in the order the prompt names them; three in the middle row; four in the
corners; a relation prompt ("a circle left of a square") puts the pair where the relation holds. This is the
simple, unambiguous inference of LENS_SPEC §9.2 rule 5: the rewrite states what the short prompt implies.

A prompt the grammar does not read (another language, other objects) is a failed rewrite: the original prompt is
kept and counted (base.Rewriter). The rewrite is a function of (prompt, directives): phrasing variants are chosen
by a hash of the prompt, so reruns and caches agree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.configs.base import ConfigError
from lens_jax.data import synthetic as sw
from lens_jax.reasoner.base import RawRewrite, Rewriter

BOOL_KEYS = ("enumerate_instances", "state_positions", "relations", "count_summary", "color_summary",
             "expand_attributes", "opening", "style_sentence")
PAIR_LAYOUTS = ("side", "stacked")


@dataclasses.dataclass(frozen=True)
class Directives:
    """The rule rewriter's behaviour (module docstring); `parse(text)` / `to_text()` convert the system prompt."""
    enumerate_instances: bool = True
    state_positions: bool = True
    relations: bool = True
    count_summary: bool = True
    color_summary: bool = True
    expand_attributes: bool = True
    size_word: str = "medium-sized"
    unspecified_color: str = "keep"
    pair_layout: str = "side"
    background: str = "white"
    opening: bool = True
    style_sentence: bool = True
    target_words: int = 0
    keep_detailed_words: int = 40

    def __post_init__(self):
        if self.unspecified_color != "keep" and self.unspecified_color not in sw.COLORS:
            raise ValueError(f"unspecified_color={self.unspecified_color!r}: 'keep' or one of {tuple(sw.COLORS)}")
        if self.pair_layout not in PAIR_LAYOUTS:
            raise ValueError(f"pair_layout={self.pair_layout!r}: one of {PAIR_LAYOUTS}")
        if self.background != "none" and self.background not in sw.BACKGROUNDS:
            raise ValueError(f"background={self.background!r}: 'none' or one of {tuple(sw.BACKGROUNDS)}")
        if self.target_words < 0 or self.keep_detailed_words < 1:
            raise ValueError("target_words must be >= 0 and keep_detailed_words >= 1")
        if not self.size_word.strip():
            raise ValueError("size_word is empty")

    @classmethod
    def parse(cls, text: str, where: str = "system prompt") -> "Directives":
        """Directives from `key: value` lines; raises ConfigError naming the line for anything it cannot read."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: the rule rewriter's system prompt is empty; "
                              "write `key: value` directives (lens_jax/reasoner/rules.py)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: Dict[str, object] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if ":" not in line:
                raise ConfigError(f"{where} line {n}: {raw.strip()!r} is not a `key: value` directive")
            key, value = (s.strip() for s in line.split(":", 1))
            key = key.lower().replace(" ", "_").replace("-", "_")
            if key not in fields:
                raise ConfigError(f"{where} line {n}: unknown directive {key!r}; known: {sorted(fields)}")
            if key in values:
                raise ConfigError(f"{where} line {n}: directive {key!r} given twice")
            kind = fields[key].type
            try:
                if kind in (bool, "bool"):
                    low = value.lower()
                    if low not in ("yes", "no", "true", "false", "on", "off"):
                        raise ValueError(f"expected yes/no, got {value!r}")
                    values[key] = low in ("yes", "true", "on")
                elif kind in (int, "int"):
                    values[key] = int(value)
                else:
                    values[key] = value.lower()
            except ValueError as e:
                raise ConfigError(f"{where} line {n}: {key}: {e}") from None
        try:
            return cls(**values)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_text(self) -> str:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out.append(f"{f.name}: {('yes' if v else 'no') if isinstance(v, bool) else v}")
        return "\n".join(out) + "\n"

    def mutations(self, colors: Sequence[str], backgrounds: Sequence[str]) -> List[Tuple[str, "Directives"]]:
        """Every single-directive change: [(description, new directives)] (the search's mutation moves)."""
        out = []
        for k in BOOL_KEYS:
            out.append((f"{k}: {'no' if getattr(self, k) else 'yes'}", dataclasses.replace(self, **{k: not getattr(self, k)})))
        for c in ("keep",) + tuple(colors):
            if c != self.unspecified_color:
                out.append((f"unspecified_color: {c}", dataclasses.replace(self, unspecified_color=c)))
        for p in PAIR_LAYOUTS:
            if p != self.pair_layout:
                out.append((f"pair_layout: {p}", dataclasses.replace(self, pair_layout=p)))
        for b in ("none",) + tuple(backgrounds):
            if b != self.background:
                out.append((f"background: {b}", dataclasses.replace(self, background=b)))
        for t in (0, 60, 90, 120, 150):
            if t != self.target_words:
                out.append((f"target_words: {t}", dataclasses.replace(self, target_words=t)))
        return out


DEFAULT_DIRECTIVES = Directives()
#: The shortest useful rewrite: no enumeration, positions or summaries (a starting point for the search).
MINIMAL_DIRECTIVES = Directives(enumerate_instances=False, state_positions=False, relations=False,
                                count_summary=False, color_summary=False, expand_attributes=False,
                                opening=True, style_sentence=False)

# ----------------------------------------------------------------------------------------------------------------
# Reading a short prompt

_PREFIX = re.compile(r"^(?:a |an )?(?:photo|image|picture|illustration|drawing|rendering) of ")
_BACKGROUND = re.compile(r" (?:on|against) (?:a |an )?(?:plain )?(" + "|".join(sorted(sw.BACKGROUNDS, key=len, reverse=True))
                         + r") background$")
_RELATION = re.compile(r"^(.+?) (?:is )?(?:to the )?(left of|right of|above|below) (?:the )?(.+)$")
_COUNTS = {"a": 1, "an": 1, "one": 1, "the": 1, **{w: n for n, w in sw.NUMBER_WORDS.items()}}


@dataclasses.dataclass
class Item:
    """One object instance the prompt asks for; cell = (row, col) once placed."""
    shape: str
    color: Optional[str]
    cell: Optional[Tuple[int, int]] = None


class PromptParseError(ValueError):
    """The prompt is not a shapes-world prompt the grammar reads."""


def _group(words: str, shapes: Sequence[str]) -> List[Item]:
    toks = words.split()
    if not toks:
        raise PromptParseError("an empty object phrase")
    count = 1
    if toks[0] in _COUNTS:
        count = _COUNTS[toks.pop(0)]
    elif toks[0].isdigit():
        count = int(toks.pop(0))
    if not toks:
        raise PromptParseError(f"no object in {words!r}")
    noun = toks.pop()
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in shapes else noun
    if shape not in shapes:
        raise PromptParseError(f"unknown object {noun!r} (the world's shapes: {', '.join(shapes)})")
    color = None
    if toks:
        c = " ".join(toks)
        if c not in sw.COLORS:
            raise PromptParseError(f"unknown colour {c!r}")
        color = c
    if count < 1:
        raise PromptParseError(f"count {count} in {words!r}")
    return [Item(shape, color) for _ in range(count)]


def parse_prompt(prompt: str, shapes: Sequence[str] = sw.SHAPES):
    """(items, relation, background): the objects a short prompt asks for, the relation of a relation prompt
    ('left of' | 'right of' | 'above' | 'below', between items[0] and items[1]) or None, and a named background or
    None. Raises PromptParseError."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    text = _PREFIX.sub("", text)
    background = None
    m = _BACKGROUND.search(text)
    if m:
        background = m.group(1)
        text = text[:m.start()]
    m = _RELATION.match(text)
    if m:
        a, b = _group(m.group(1), shapes), _group(m.group(3), shapes)
        if len(a) != 1 or len(b) != 1:
            raise PromptParseError("a relation between groups of objects")
        return a + b, m.group(2), background
    parts = [p for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", text) if p]
    items: List[Item] = []
    for p in parts:
        items.extend(_group(p, shapes))
    return items, None, background


# ----------------------------------------------------------------------------------------------------------------
# Placing and describing


def place(items: List[Item], relation: Optional[str], pair_layout: str) -> None:
    """Sets each item's cell from the canonical layout (module docstring); more than four objects stay unplaced."""
    n = len(items)
    if relation is not None:
        a, b = items
        a.cell, b.cell = {"left of": ((1, 0), (1, 2)), "right of": ((1, 2), (1, 0)),
                          "above": ((0, 1), (2, 1)), "below": ((2, 1), (0, 1))}[relation]
        return
    if n not in sw.CANONICAL_CELLS:
        return
    options = sw.CANONICAL_CELLS[n]
    cells = options[PAIR_LAYOUTS.index(pair_layout)] if n == 2 else options[0]
    for it, c in zip(items, cells):
        it.cell = c


def _rel(a: Item, b: Item) -> Optional[str]:
    rel = set()
    if a.cell[1] < b.cell[1]:
        rel.add("left of")
    if a.cell[1] > b.cell[1]:
        rel.add("right of")
    if a.cell[0] < b.cell[0]:
        rel.add("above")
    if a.cell[0] > b.cell[0]:
        rel.add("below")
    return sw._relation_phrase(rel)


def compose(prompt: str, d: Directives, shapes: Sequence[str] = sw.SHAPES) -> str:
    """The dense rewrite of one short prompt under directives `d` (raises PromptParseError)."""
    if len(prompt.split()) >= d.keep_detailed_words:
        return prompt
    items, relation, named_bg = parse_prompt(prompt, shapes)
    if d.unspecified_color != "keep":
        for it in items:
            it.color = it.color or d.unspecified_color
    if d.state_positions or d.relations:
        place(items, relation, d.pair_layout)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
    pick = lambda options: options[int(rng.integers(len(options)))]   # noqa: E731
    bg = named_bg or (None if d.background == "none" else d.background)
    n = len(items)
    desc = lambda it: " ".join(w for w in ((d.size_word if d.expand_attributes else None), it.color, it.shape) if w)  # noqa: E731
    sents: List[str] = []
    on_bg = f" on a plain {bg} background" if bg else ""
    if d.opening:
        sents.append(f"The image shows a single flat-colored shape{on_bg}." if n == 1 else
                     f"The image shows {sw.NUMBER_WORDS.get(n, str(n))} flat-colored shapes{on_bg}.")
    if d.count_summary:
        summary = sw._join([sw._count_phrase(c, s, article=False) for s, c in sw._group(items, lambda it: it.shape)])
        sents.append(f"In total there {'is' if n == 1 else 'are'} {summary}.")
    if d.color_summary and n > 1 and all(it.color for it in items):
        groups = sw._group(items, lambda it: it.color)
        summary = sw._join([sw._count_phrase(c, f"{col} object", article=False) for col, c in groups])
        sents.append(f"By color, there {'is' if groups[0][1] == 1 else 'are'} {summary}.")
    if d.enumerate_instances:
        for it in items:
            text = desc(it)
            if d.state_positions and it.cell is not None:
                pos = pick(sw.CELL_PHRASES[it.cell])
                sents.append(f"{pos[0].upper() + pos[1:]} of the image there is {sw._article(text)} {text}.")
            else:
                sents.append(f"There is {sw._article(text)} {text}.")
    else:
        groups = sw._group(items, desc)
        sents.append("The image contains " + sw._join([sw._count_phrase(c, t) for t, c in groups]) + ".")
    if d.relations and n > 1 and all(it.cell is not None for it in items):
        names = []
        for it in items:
            base = " ".join(w for w in (it.color, it.shape) if w)
            dup = sum(1 for o in items if o.color == it.color and o.shape == it.shape) > 1
            names.append(f"{base} {sw.CELL_PHRASES[it.cell][0]}" if dup else base)
        for i in range(n):
            for j in range(i + 1, n):
                phrase = _rel(items[i], items[j])
                if phrase:
                    sents.append(f"The {names[i]} is {phrase} the {names[j]}.")
    if bg:
        sents.append(f"The background is a uniform {bg} with no texture, shadows or other details.")
    if d.style_sentence:
        sents.append("All shapes are drawn in solid, saturated colors with crisp edges, and none of them overlap."
                     if n > 1 else "The shape is drawn in a solid, saturated color with crisp edges.")
    extras = [("It is the only object in the image." if n == 1 else "No other objects are present."),
              "The composition is simple and clean, with flat vector-like fills.",
              "The triangle points upward, with a flat base at the bottom." if any(it.shape == "triangle" for it in items)
              else "Every shape has a single flat fill color and sharp edges."]
    while d.target_words and extras and sum(len(s.split()) for s in sents) < d.target_words:
        sents.append(extras.pop(0))
    return " ".join(sents)


class RuleRewriter(Rewriter):
    """The shapes-world rewriter (module docstring). `system_prompt`: directive text."""

    name = "rules"

    def __init__(self, system_prompt: str, shapes: Sequence[str] = sw.SHAPES, token_budget=None):
        super().__init__(token_budget)
        self.system_prompt = system_prompt
        self.directives = Directives.parse(system_prompt)
        self.shapes = tuple(shapes)

    def describe(self) -> dict:
        return {"backend": self.name, "system_prompt": self.system_prompt}

    def _rewrite_batch(self, prompts: List[str]) -> List[RawRewrite]:
        out: List[RawRewrite] = []
        for p in prompts:
            try:
                out.append((compose(p, self.directives, self.shapes), None))
            except PromptParseError as e:
                out.append((None, f"not a shapes-world prompt: {e}"))
        return out
