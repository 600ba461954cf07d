"""The rewriter interface every reasoner backend implements, and what all of them share.

    rewriter = build_rewriter(config, encoders)       # lens_jax/reasoner/__init__.py
    dense = rewriter.rewrite(["a photo of two red circles", ...])     # same length, same order
    rewriter.records                                  # the last call's RewriteRecord per prompt
    rewriter.stats.as_dict()                          # counters over every call

A backend implements `_rewrite_batch(prompts) -> [(raw_text | None, error | None)]`; `Rewriter.rewrite` then
  * passes empty / whitespace-only prompts through untouched (the unconditional prompt; counted `empty_input`);
  * cleans each reply (`cleaning.clean_rewrite`, LENS_SPEC §9.1);
  * falls back to the original prompt when the backend failed (`fallback_failed`), the cleaned reply is empty
    (`fallback_empty`) or it is written in another script than the prompt (`fallback_language`);
  * truncates a rewrite whose templated sequence would exceed the text encoder's token cap (512 for Lens) at a
    word boundary, so the Harmony suffix the DiT was trained with survives (`truncated`).
Nothing raises for a bad reply; bad arguments (a non-string prompt) raise TypeError.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from lens_jax.posttrain.chat import Counters
from lens_jax.reasoner.cleaning import clean_rewrite, same_language

STATUSES = ("rewritten", "empty_input", "fallback_failed", "fallback_empty", "fallback_language")
COUNTERS = ("prompts",) + STATUSES + ("truncated",)

RawRewrite = Tuple[Optional[str], Optional[str]]   # (reply text or None, error message or None)


@dataclasses.dataclass
class RewriteRecord:
    """One prompt's rewrite: the prompt used (`rewrite`), how it came about (`status`, one of STATUSES), whether it
    was cut to the token cap, and the backend's error or the raw reply when it was rejected."""
    prompt: str
    rewrite: str
    status: str
    truncated: bool = False
    detail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TokenBudget:
    """Keeps a prompt's whole templated sequence within the text encoder's cap.

    fits(text): len(tokenize(render_prompt(text))) <= max_length. fit(text) -> (text, truncated): the longest
    word prefix that fits (a single over-long word is cut by tokens).
    """

    def __init__(self, tokenizer, prompt_config):
        from lens_jax.text.harmony import render_prompt
        self.tokenizer, self.cfg = tokenizer, prompt_config
        self._render = lambda t: render_prompt(t, prompt_config.date, prompt_config.system, prompt_config.thinking)
        self.max_length = int(prompt_config.max_length)

    def _len(self, text: str) -> int:
        return len(self.tokenizer(self._render(text), add_special_tokens=False)["input_ids"])

    def fits(self, text: str) -> bool:
        return self._len(text) <= self.max_length

    def fit(self, text: str) -> Tuple[str, bool]:
        if self.fits(text):
            return text, False
        words = text.split(" ")
        lo, hi = 0, len(words)          # words[:lo] fits, words[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fits(" ".join(words[:mid])):
                lo = mid
            else:
                hi = mid
        if lo > 0:
            return " ".join(words[:lo]), True
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        overhead = self._len("")
        return self.tokenizer.decode(ids[:max(0, self.max_length - overhead)]), True


class Rewriter:
    """Base class: `rewrite(prompts) -> prompts` around a backend's `_rewrite_batch` (module docstring)."""

    name = "base"

    def __init__(self, token_budget: Optional[TokenBudget] = None):
        self.token_budget = token_budget
        self.stats = Counters(COUNTERS)
        self.records: List[RewriteRecord] = []

    def _rewrite_batch(self, prompts: List[str]) -> List[RawRewrite]:
        raise NotImplementedError

    def describe(self) -> dict:
        """What to record next to outputs (backend, model, system prompt); never credentials."""
        return {"backend": self.name}

    def rewrite(self, prompts: Sequence[str]) -> List[str]:
        return [r.rewrite for r in self.rewrite_records(prompts)]

    def rewrite_records(self, prompts: Sequence[str]) -> List[RewriteRecord]:
        if isinstance(prompts, str):
            raise TypeError("rewrite() takes a list of prompts, not one string")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str")
        todo = sorted({p for p in prompts if p.strip()})     # each distinct prompt rewritten once per call
        raw = dict(zip(todo, self._rewrite_batch(todo))) if todo else {}
        records = []
        for p in prompts:
            self.stats.inc("prompts")
            if not p.strip():
                rec = RewriteRecord(p, p, "empty_input")
            else:
                rec = self._finish(p, *raw[p])
            if rec.status == "rewritten" and self.token_budget is not None:
                rec.rewrite, rec.truncated = self.token_budget.fit(rec.rewrite)
                if rec.truncated:
                    self.stats.inc("truncated")
            self.stats.inc(rec.status)
            records.append(rec)
        self.records = records
        return records

    @staticmethod
    def _finish(prompt: str, text: Optional[str], error: Optional[str]) -> RewriteRecord:
        if text is None:
            return RewriteRecord(prompt, prompt, "fallback_failed", detail=error or "no reply")
        cleaned = clean_rewrite(text)
        if not cleaned:
            return RewriteRecord(prompt, prompt, "fallback_empty", detail=text[:500])
        if not same_language(prompt, cleaned):
            return RewriteRecord(prompt, prompt, "fallback_language", detail=cleaned[:500])
        return RewriteRecord(prompt, cleaned, "rewritten")

    def summary(self) -> str:
        s = self.stats.as_dict()
        fallbacks = {k: s[k] for k in STATUSES[2:] if s[k]}
        return (f"reasoner {self.name}: {s['rewritten']} of {s['prompts']} prompts rewritten, "
                f"{s['empty_input']} empty, fallbacks {fallbacks or 'none'}, {s['truncated']} truncated to the cap")
