"""RL prompt sets: loading and validating prompt/rubric JSONL, and the check that they share nothing with any
evaluation prompt set (LENS_SPEC §8.2-8.3; the honest-evaluation rule).

A prompt file has one JSON object per line: {"prompt": str, "category": str, "rubrics": {name: check, ...},
"id"?: str, "metadata"?: {"include": [...], "exclude"?: [...]} (GenEval clauses), ...} as written by
tools/make_rl_prompts.py. `load_rl_prompts` appends the global rubric ("Structural Integrity (Overall)") to
every prompt's rubrics unless the file already has it.

Disjointness (`assert_disjoint`) is checked by content, never by convention: a prompt collides with an
evaluation prompt when their GenEval clause sets are equal (metadata, order-free, a position clause keyed by
its target's class and colour) or when their normalised texts are equal (lowercase, punctuation and a leading
"a photo of" / "an image of" / "a picture of" removed).
"""
from __future__ import annotations

import json
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from lens_jax.configs.base import ConfigError
from lens_jax.posttrain.shapes_rubrics import GLOBAL_RUBRIC, GLOBAL_RUBRIC_NAME

EvalSet = Tuple[str, List[dict]]       # (name, prompt dicts with 'prompt' and optional 'include' / 'exclude')


class PromptFileError(ConfigError):
    """A malformed RL prompt file; the message names the file and line."""


def load_rl_prompts(path: str, *, add_global: bool = True) -> List[dict]:
    """The validated records of a prompt JSONL file (module docstring); PromptFileError on a bad record."""
    try:
        f = open(path)
    except OSError as e:
        raise PromptFileError(f"RL prompt file {path}: {e}") from None
    out, ids = [], set()
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: not JSON ({e})") from None
            if not isinstance(r, dict):
                raise PromptFileError(f"{where}: a record must be a JSON object")
            if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
                raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
            if "rubrics" not in r:
                raise PromptFileError(f"{where}: no 'rubrics' (a {{name: check}} object)")
            rub = r["rubrics"]
            if not isinstance(rub, dict) or not rub:
                raise PromptFileError(f"{where}: 'rubrics' must be a non-empty {{name: check}} object, got {rub!r}")
            for k, v in rub.items():
                if not isinstance(k, str) or not k.strip() or not isinstance(v, str) or not v.strip():
                    raise PromptFileError(f"{where}: rubric {k!r}: names and checks must be non-empty strings")
            r.setdefault("category", "uncategorised")
            r.setdefault("id", f"line{n}")
            if r["id"] in ids:
                raise PromptFileError(f"{where}: duplicate id {r['id']!r}")
            ids.add(r["id"])
            if add_global and GLOBAL_RUBRIC_NAME not in rub:
                r["rubrics"] = dict(rub, **{GLOBAL_RUBRIC_NAME: GLOBAL_RUBRIC})
            out.append(r)
    if not out:
        raise PromptFileError(f"RL prompt file {path} holds no prompts")
    return out


# ------------------------------------------------------------------------------------------ disjointness

_PREFIX = re.compile(r"^(a photo of|an image of|a picture of)\s+")


def normalise_text(text: str) -> str:
    t = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return _PREFIX.sub("", t)


def clause_key(meta: dict) -> Optional[Tuple]:
    """An order-free key of GenEval clauses (None when the record has no 'include' clauses)."""
    inc = meta.get("include")
    if not inc:
        return None

    def one(c: dict) -> str:
        d = {"class": c["class"], "count": int(c["count"]), "color": c.get("color")}
        if c.get("position"):
            rel, target = c["position"]
            t = inc[int(target)]
            d["position"] = [rel, t["class"], t.get("color")]
        return json.dumps(d, sort_keys=True)
    exc = tuple(sorted(json.dumps({"class": c["class"], "count": int(c["count"])}, sort_keys=True)
                       for c in meta.get("exclude", []) or []))
    return tuple(sorted(one(c) for c in inc)), exc


def assert_disjoint(records: Sequence[dict], eval_sets: Iterable[EvalSet]) -> None:
    """Raises ValueError naming the first collisions if an RL prompt equals an evaluation prompt (module
    docstring)."""
    texts, keys = {}, {}
    for name, prompts in eval_sets:
        for p in prompts:
            if p.get("prompt"):
                texts.setdefault(normalise_text(p["prompt"]), (name, p["prompt"]))
            k = clause_key(p)
            if k is not None:
                keys.setdefault(k, (name, p.get("prompt", "")))
    bad = []
    for r in records:
        hit = texts.get(normalise_text(r["prompt"]))
        meta = r.get("metadata") or {}
        k = clause_key(meta) if meta else None
        hit = hit or (keys.get(k) if k is not None else None)
        if hit:
            bad.append(f"{r['prompt']!r} (id {r.get('id')}) = {hit[0]} prompt {hit[1]!r}")
    if bad:
        raise ValueError(f"{len(bad)} RL prompt(s) are also evaluation prompts: " + "; ".join(bad[:5])
                         + (" ..." if len(bad) > 5 else ""))


def shapes_eval_sets(cfg) -> List[EvalSet]:
    """Every prompt of ShapesEval's six task pools over world `cfg` (all seeds and sizes draw from these)."""
    from lens_jax.eval.shapes_eval import TASKS, _all_task_metadata, _prompt_text
    out = []
    for tag in TASKS:
        metas = _all_task_metadata(cfg, tag)
        out.append((f"ShapesEval/{tag}", [dict(m, prompt=_prompt_text(tag, m["include"])) for m in metas]))
    return out


def metadata_file_set(path: str) -> EvalSet:
    """An evaluation set from a GenEval evaluation_metadata.jsonl file."""
    from lens_jax.eval.geneval import read_metadata
    return (path, [dict(p) for p in read_metadata(path)])


def category_counts(records: Sequence[dict]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in records:
        out[r["category"]] = out.get(r["category"], 0) + 1
    return out
