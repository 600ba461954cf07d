"""The prompt-and-rubric writer of Lens-RL (spec §8.2-8.3, the GPT-4.1 role) over a ChatService.

For every taxonomy item (category, sub_category, item), in file order:
  1. pick 1-4 description dimensions (from the taxonomy's, e.g. Attribute, Spatial Relationship, Count,
     Interaction, Color) with numpy's Generator seeded by `seed + item index`, so a rerun picks the same ones;
  2. ask the model for one realistic-photographic prompt of 30-60 words in one paragraph that works in the
     keypoints of the chosen dimensions, and for `num_rubrics` binary rubrics, as the JSON object
         {"prompt": str, "rubrics": {short name: check, ...}}
     (a bare object, or one inside a ```json fence);
  3. validate the reply (`parse_prompt_reply`); on a validation failure ask again with the bad reply and the
     error appended to the conversation, up to `max_attempts` requests; then the item is skipped and counted.
The global rubric "Structural Integrity (Overall)" is not written here: the reward appends it to every prompt.

Output: one JSONL record per finished item, appended and flushed as it completes (so the order follows
completion, not the taxonomy):
    {"id": "<category>/<sub_category>/<item>", "prompt", "category", "sub_category", "item",
     "dimensions": [...], "rubrics": {...}, "source": "api", "model"}
A rerun with the same output file skips ids already in it (resumable); a corrupt last line from a crash is
skipped (counted in the summary) and its item written again.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.posttrain.chat import ChatService
from lens_jax.posttrain.taxonomy import Taxonomy, item_id

MAX_DIMENSIONS = 4

# What each description dimension asks the prompt to contain (the paper's keypoints: global, counting,
# position, attribute, color, relation, text).
KEYPOINTS = {
    "Attribute": "attribute: give the subject and other objects concrete, visually checkable attributes "
                 "(material, size, shape, texture, age, clothing or state)",
    "Spatial Relationship": "position: state explicitly where things are relative to each other "
                            "(left of, right of, in front of, behind, on top of, under, next to)",
    "Count": "counting: give exact numbers of some objects or people (for example 'three ceramic mugs')",
    "Interaction": "relation: describe an action or an interaction between the subject and another person, "
                   "animal or object",
    "Color": "color: name the specific colors of the key objects",
}
GLOBAL_KEYPOINT = ("global: a coherent overall scene with a setting, lighting and camera viewpoint that a "
                   "real photograph could have")
TEXT_KEYPOINT = ("text: include the exact words to be rendered in the image, in double quotes, and say where "
                 "they appear")
TEXT_CATEGORIES = ("Text", "UI & Graphic Design")

SYSTEM_PROMPT = (
    "You write prompts for a text-to-image model together with binary grading rubrics for the images it makes. "
    "Every prompt describes a realistic photograph: photographic style only, never cartoon, anime, illustration, "
    "painting or 3D-render styles. You always answer with a single JSON object and nothing else."
)


class PromptValidationError(ValueError):
    """A writer reply that is not a valid {"prompt", "rubrics"} object; the message says what is wrong."""


def pick_dimensions(dimensions: Sequence[str], seed: int, index: int) -> List[str]:
    """1 to min(4, len(dimensions)) distinct dimensions for item `index`, from default_rng(seed + index);
    returned in the taxonomy's order."""
    rng = np.random.default_rng(int(seed) + int(index))
    k = int(rng.integers(1, min(MAX_DIMENSIONS, len(dimensions)) + 1))
    chosen = set(int(j) for j in rng.choice(len(dimensions), size=k, replace=False))
    return [d for j, d in enumerate(dimensions) if j in chosen]


def build_writer_messages(category: str, sub_category: str, item: str, dimensions: Sequence[str], *,
                          num_rubrics: int = 10, word_range: Tuple[int, int] = (30, 60)) -> List[dict]:
    """The first request of one item: system + user message with the instructions (paraphrasing spec §8.2)."""
    lo, hi = word_range
    keypoints = [GLOBAL_KEYPOINT] + [KEYPOINTS.get(d, d) for d in dimensions]
    if category in TEXT_CATEGORIES:
        keypoints.append(TEXT_KEYPOINT)
    kp = "\n".join(f"- {k}" for k in keypoints)
    user = (
        f"Taxonomy entry: category \"{category}\", sub-category \"{sub_category}\", item \"{item}\".\n"
        f"Description dimensions to emphasise: {', '.join(dimensions)}.\n\n"
        f"Write one text-to-image prompt centred on \"{item}\":\n"
        f"- realistic photographic style only; no cartoon, anime, illustration or painting;\n"
        f"- {lo} to {hi} words, in one paragraph;\n"
        f"- work in these keypoints:\n{kp}\n\n"
        f"Then write exactly {num_rubrics} rubrics for grading a generated image against this prompt. Each rubric "
        f"has a short title-case name (for example \"Object Count Consistency\", \"Attribute Accuracy\", "
        f"\"Object Placement and Spatial Reasoning\", \"OCR Alignment\", \"Action Accuracy\") and a check: one "
        f"concrete statement about the image that a judge can answer with yes or no by looking at it. Cover "
        f"different details of the prompt; use {num_rubrics} distinct names. Do not add a rubric about overall "
        f"structural integrity or artefacts; that one is added separately.\n\n"
        f"Return only this JSON object:\n"
        f"{{\"prompt\": \"<the prompt>\", \"rubrics\": {{\"<rubric name>\": \"<check>\", ...}}}}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def _strict_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise PromptValidationError(f"the JSON object repeats the key {k!r}")
        out[k] = v
    return out


def parse_prompt_reply(text: Optional[str], *, num_rubrics: int = 10,
                       word_range: Tuple[int, int] = (30, 60)) -> Tuple[str, Dict[str, str]]:
    """(prompt, rubrics) of a writer reply, or PromptValidationError saying what is wrong.

    The reply must be a JSON object (bare, or inside a ```json fence) with "prompt": a string of word_range[0]
    to word_range[1] words (whitespace-separated; whitespace is collapsed to single spaces, so it is one
    paragraph) and "rubrics": an object of exactly num_rubrics entries, non-empty string -> non-empty string,
    with distinct names. Other keys are ignored.
    """
    s = (text or "").strip()
    if not s:
        raise PromptValidationError("the reply is empty; expected a JSON object")
    if not s.startswith("{"):
        m = _FENCE.search(s)
        if m is None:
            raise PromptValidationError("the reply is not a JSON object (nor one inside a ```json fence)")
        s = m.group(1).strip()
    try:
        obj = json.loads(s, object_pairs_hook=_strict_object)
    except PromptValidationError:
        raise
    except ValueError as e:
        raise PromptValidationError(f"the reply is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PromptValidationError(f"the reply must be a JSON object, got a {type(obj).__name__}")
    for k in ("prompt", "rubrics"):
        if k not in obj:
            raise PromptValidationError(f"the JSON object has no {k!r} key")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise PromptValidationError(f"'prompt' must be a string, got {type(prompt).__name__}")
    prompt = " ".join(prompt.split())
    n_words = len(prompt.split())
    lo, hi = word_range
    if not lo <= n_words <= hi:
        raise PromptValidationError(f"'prompt' has {n_words} words; it must have {lo} to {hi} words")
    rubrics = obj["rubrics"]
    if not isinstance(rubrics, dict):
        raise PromptValidationError(f"'rubrics' must be a JSON object of name -> check, "
                                    f"got {type(rubrics).__name__}")
    if len(rubrics) != num_rubrics:
        raise PromptValidationError(f"'rubrics' has {len(rubrics)} entries; it must have exactly {num_rubrics}")
    out: Dict[str, str] = {}
    for name, check in rubrics.items():
        if not name.strip():
            raise PromptValidationError("'rubrics' has an empty rubric name")
        if not isinstance(check, str) or not check.strip():
            raise PromptValidationError(f"rubric {name!r}: the check must be a non-empty string, got {check!r}")
        if name.strip() in out:
            raise PromptValidationError(f"rubric name {name.strip()!r} appears twice")
        out[name.strip()] = " ".join(check.split())
    return prompt, out


def _read_done(out_path: str) -> Tuple[set, int, bool]:
    """(ids already written, corrupt lines skipped, whether the file lacks a final newline)."""
    done, corrupt = set(), 0
    if not os.path.exists(out_path):
        return done, corrupt, False
    with open(out_path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add(rec["id"])
        except (ValueError, KeyError, TypeError):
            corrupt += 1
    return done, corrupt, bool(data) and not data.endswith(b"\n")


def _write_one(chat: ChatService, cat: str, sub: str, item: str, dims: List[str], *,
               num_rubrics: int, word_range: Tuple[int, int], max_attempts: int) -> Dict[str, Any]:
    """Requests (and re-requests) one item; returns {"record"} or {"error", "kind": "failed"|"invalid"}."""
    model = chat.config.model
    messages = build_writer_messages(cat, sub, item, dims, num_rubrics=num_rubrics, word_range=word_range)

    def valid(text: str) -> bool:  # only valid replies are cached, so a rerun asks again after a bad one
        try:
            parse_prompt_reply(text, num_rubrics=num_rubrics, word_range=word_range)
            return True
        except PromptValidationError:
            return False

    retries = 0
    last_error = ""
    for attempt in range(max_attempts):
        if attempt > 0:
            retries += 1
        res = chat.complete(messages, cache_key_parts=("prompt_writer/v1", model, messages), cache_if=valid)
        if not res.ok:
            return {"kind": "failed", "error": res.error, "retries": retries}
        try:
            prompt, rubrics = parse_prompt_reply(res.text, num_rubrics=num_rubrics, word_range=word_range)
        except PromptValidationError as e:
            last_error = str(e)
            messages = messages + [
                {"role": "assistant", "content": res.text},
                {"role": "user", "content": f"That reply is invalid: {last_error}. Answer again with only the "
                                            f"corrected JSON object."},
            ]
            continue
        record = {"id": item_id(cat, sub, item), "prompt": prompt, "category": cat, "sub_category": sub,
                  "item": item, "dimensions": list(dims), "rubrics": rubrics, "source": "api", "model": model}
        return {"record": record, "retries": retries}
    return {"kind": "invalid", "error": f"{max_attempts} invalid replies; last: {last_error}", "retries": retries}


def write_prompts(taxonomy: Taxonomy, out_path: str, chat: ChatService, *, num_rubrics: int = 10, seed: int = 0,
                  limit: int = 0, word_range: Tuple[int, int] = (30, 60), max_attempts: int = 3,
                  progress: Optional[bool] = None) -> Dict[str, Any]:
    """Writes one prompt + `num_rubrics` rubrics per taxonomy item to the JSONL `out_path` (module docstring).

    limit: only the first `limit` items of the taxonomy (0 = all). Items run on chat.config.concurrency threads.
    Returns the summary: items (considered), written, reused (already in out_path), skipped (= invalid + failed:
    invalid after max_attempts replies, or a request that failed after the ChatService's retries),
    validation_retries, corrupt_lines, prompt_tokens, completion_tokens, cost_usd (this call's requests),
    requests, cache_hits, errors (the first 20 {"id", "error"}), out_path.
    """
    if num_rubrics < 1:
        raise ValueError(f"num_rubrics must be >= 1, got {num_rubrics}")
    lo, hi = word_range
    if not 1 <= lo <= hi:
        raise ValueError(f"word_range must be (lo, hi) with 1 <= lo <= hi, got {word_range}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    items = list(taxonomy.items())
    if limit and limit > 0:
        items = items[:limit]
    done, corrupt, needs_newline = _read_done(out_path)
    todo = [(i, c, s, it) for i, (c, s, it) in enumerate(items) if item_id(c, s, it) not in done]
    before = chat.stats.as_dict()
    cost_before = chat.cost_usd()

    summary: Dict[str, Any] = {"out_path": out_path, "items": len(items), "written": 0,
                               "reused": len(items) - len(todo), "skipped": 0, "invalid": 0, "failed": 0,
                               "validation_retries": 0, "corrupt_lines": corrupt, "errors": []}
    if os.path.dirname(out_path):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    bar = None
    show = (chat.config.progress if progress is None else progress) and sys.stderr.isatty()
    if show and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="prompts", unit="item", leave=False)
    lock = threading.Lock()
    with open(out_path, "a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
            f.flush()

        def task(i, c, s, it):
            dims = pick_dimensions(taxonomy.dimensions, seed, i)
            return item_id(c, s, it), _write_one(chat, c, s, it, dims, num_rubrics=num_rubrics,
                                                 word_range=word_range, max_attempts=max_attempts)

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(chat.config.concurrency, len(todo) or 1))) as pool:
                futures = [pool.submit(task, *t) for t in todo]
                for fut in as_completed(futures):
                    iid, out = fut.result()
                    with lock:
                        summary["validation_retries"] += out["retries"]
                        if "record" in out:
                            f.write(json.dumps(out["record"], ensure_ascii=False) + "\n")
                            f.flush()
                            summary["written"] += 1
                        else:
                            summary[out["kind"]] += 1
                            summary["skipped"] += 1
                            if len(summary["errors"]) < 20:
                                summary["errors"].append({"id": iid, "error": out["error"]})
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    after = chat.stats.as_dict()
    for k in ("prompt_tokens", "completion_tokens", "requests", "cache_hits"):
        summary[k] = after.get(k, 0) - before.get(k, 0)
    summary["cost_usd"] = chat.cost_usd() - cost_before
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    """One line: written / skipped / reused, tokens, cost."""
    return (f"written {summary.get('written', 0)}, skipped {summary.get('skipped', 0)} "
            f"(invalid {summary.get('invalid', 0)}, failed {summary.get('failed', 0)}), "
            f"reused {summary.get('reused', 0)} of {summary.get('items', 0)} items; "
            f"tokens {summary.get('prompt_tokens', 0)} in / {summary.get('completion_tokens', 0)} out; "
            f"cost ${summary.get('cost_usd', 0.0):.4f} -> {summary.get('out_path', '')}")
