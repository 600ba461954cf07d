"""Taxonomy validation, the shipped real-world taxonomy, and the prompt writer against the loopback fake:
valid / invalid / fenced replies, retries with the error in the conversation, resume, token and cost
accounting, and the tools/make_rl_prompts.py command line."""
import json
import os
import re
import socket

import pytest

from fake_openai import Reply, Status, fake_openai  # noqa: F401 - fixture
from lens_jax.posttrain.chat import ChatConfig, ChatService
from lens_jax.posttrain.prompt_writer import (PromptValidationError, build_writer_messages, parse_prompt_reply,
                                              pick_dimensions, write_prompts)
from lens_jax.posttrain.taxonomy import DIMENSIONS, TaxonomyError, load_taxonomy, validate_taxonomy
from tools import make_rl_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "data", "rl", "real_world_taxonomy.json")
LENS_CATEGORIES = ["Human", "Object", "Animal", "Plant", "Scene", "Food", "Event", "Fictional World", "Text",
                   "UI & Graphic Design"]


def _tax(**over):
    d = {"name": "t", "dimensions": list(DIMENSIONS),
         "categories": {"Human": {"Occupation": ["Doctor", "Chef"], "Age": ["Toddler"]},
                        "Food": {"Dish": ["Paella", "Ramen"]}}}
    d.update(over)
    return d


def _write(tmp_path, obj, name="tax.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


# -- taxonomy -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate,pattern", [
    (lambda d: d.pop("categories"), r"missing key\(s\) 'categories'"),
    (lambda d: d.pop("dimensions"), r"missing key\(s\) 'dimensions'"),
    (lambda d: d["categories"]["Human"].__setitem__("Occupation", []), r"\['Human'\]\['Occupation'\].*empty list"),
    (lambda d: d["categories"].__setitem__("Plant", {}), r"categories\['Plant'\].*empty object"),
    (lambda d: d.__setitem__("categories", {}), r"'categories' must be a non-empty object"),
    (lambda d: d.__setitem__("dimensions", ["Attribute", "Texture"]), r"dimensions\[1\]: unknown dimension 'Texture'"),
    (lambda d: d.__setitem__("dimensions", ["Count", "Count"]), r"dimensions\[1\].*listed twice"),
    (lambda d: d["categories"]["Food"]["Dish"].append("paella"), r"\['Food'\]\['Dish'\]\[2\]: duplicate item 'paella'"),
    (lambda d: d["categories"]["Food"]["Dish"].append(7), r"\['Food'\]\['Dish'\]\[2\]: items must be strings"),
    (lambda d: d["categories"]["Food"]["Dish"].append("  "), r"\['Food'\]\['Dish'\]\[2\].*non-empty string"),
    (lambda d: d["categories"]["Food"]["Dish"].append("AC/DC"), r"contains '/'"),
])
def test_taxonomy_validation_names_the_problem(tmp_path, mutate, pattern):
    d = _tax()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(TaxonomyError, match=pattern) as e:
        load_taxonomy(path)
    assert str(e.value).startswith(path)  # names the file


def test_taxonomy_file_errors(tmp_path):
    with pytest.raises(TaxonomyError, match="not valid JSON"):
        load_taxonomy(_write(tmp_path, "{not json"))
    with pytest.raises(TaxonomyError, match="cannot read"):
        load_taxonomy(str(tmp_path / "missing.json"))
    dup = '{"name": "t", "dimensions": ["Count"], "categories": {"A": {"s": ["x"]}, "A": {"s": ["y"]}}}'
    with pytest.raises(TaxonomyError, match="key 'A' appears twice"):
        load_taxonomy(_write(tmp_path, dup))
    t = validate_taxonomy(_tax(), "mem")
    assert list(t.items()) == [("Human", "Occupation", "Doctor"), ("Human", "Occupation", "Chef"),
                               ("Human", "Age", "Toddler"), ("Food", "Dish", "Paella"), ("Food", "Dish", "Ramen")]
    assert t.counts() == {"Human": 3, "Food": 2} and len(t) == 5


def test_shipped_real_world_taxonomy():
    t = load_taxonomy(SHIPPED)
    assert list(t.categories) == LENS_CATEGORIES
    assert list(t.counts()) == LENS_CATEGORIES
    assert 300 <= len(t) <= 400 and sum(t.counts().values()) == len(t)
    assert all(3 <= len(subs) <= 6 for subs in t.categories.values())
    assert t.dimensions == DIMENSIONS
    ids = [f"{c}/{s}/{i}" for c, s, i in t.items()]
    assert len(set(ids)) == len(ids)


# -- the writer -----------------------------------------------------------------------------------------------------

def _words(n, item="thing"):
    return " ".join([f"A realistic photograph of a {item}"] + [f"w{k}" for k in range(n - 6)])


def _reply(item, n_words=40, n_rubrics=10, fence=False):
    obj = {"prompt": _words(n_words, item),
           "rubrics": {f"Rubric {k}": f"The image shows detail {k} of the {item}." for k in range(n_rubrics)}}
    text = json.dumps(obj)
    return f"Here you go:\n```json\n{text}\n```" if fence else text


def _item_of(body):
    user = [m for m in body["messages"] if m["role"] == "user"][0]["content"]
    return re.search(r'item "([^"]+)"', user).group(1)


def _chat(url, **kw):
    base = dict(base_url=url, model="writer-model", timeout_s=2.0, max_retries=1, backoff_s=0.01,
                concurrency=4, progress=False)
    base.update(kw)
    return ChatService(ChatConfig(**base))


def _records(path):
    """The readable records of a JSONL file (a corrupt line left by a simulated crash is skipped)."""
    out = []
    for line in open(path).read().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_parse_prompt_reply_rules():
    prompt, rubrics = parse_prompt_reply(_reply("dog"))
    assert len(prompt.split()) == 40 and len(rubrics) == 10
    assert parse_prompt_reply(_reply("dog", fence=True)) == (prompt, rubrics)
    bad = [("", "empty"), ("no json here", "not a JSON object"), ("{bad", "not valid JSON"),
           (_reply("dog", n_rubrics=9), "has 9 entries; it must have exactly 10"),
           (_reply("dog", n_words=12), "has 12 words; it must have 30 to 60"),
           (_reply("dog", n_words=61), "has 61 words"),
           ('{"prompt": "x"}', "no 'rubrics' key"),
           (json.dumps({"prompt": _words(40), "rubrics": ["a"] * 10}), "must be a JSON object"),
           (json.dumps({"prompt": _words(40), "rubrics": {f"r{k}": "" for k in range(10)}}), "non-empty string"),
           ('{"prompt": "%s", "rubrics": {%s}}' % (_words(40), ", ".join(['"same": "c"'] * 10)), "repeats the key")]
    for text, msg in bad:
        with pytest.raises(PromptValidationError, match=re.escape(msg)):
            parse_prompt_reply(text)
    assert len(parse_prompt_reply(_reply("dog", n_words=12), word_range=(10, 20))[0].split()) == 12


def test_pick_dimensions_seeded():
    picks = [pick_dimensions(DIMENSIONS, 0, i) for i in range(200)]
    assert picks == [pick_dimensions(DIMENSIONS, 0, i) for i in range(200)]  # reruns pick the same
    assert all(1 <= len(p) <= 4 and len(set(p)) == len(p) and set(p) <= set(DIMENSIONS) for p in picks)
    assert {len(p) for p in picks} == {1, 2, 3, 4}
    assert picks != [pick_dimensions(DIMENSIONS, 1, i) for i in range(200)]
    assert pick_dimensions(DIMENSIONS, 5, 0) == pick_dimensions(DIMENSIONS, 0, 5)  # seed + index
    msgs = build_writer_messages("Text", "Signage", "neon shop sign", ["Count", "Color"], num_rubrics=7)
    user = msgs[1]["content"]
    assert "realistic photographic" in user and "no cartoon, anime" in user and "30 to 60 words" in user
    assert "exactly 7 rubrics" in user and "counting:" in user and "color:" in user and "text:" in user
    assert "JSON" in user and "position:" not in user


def test_write_prompts_valid_invalid_fenced_and_usage(fake_openai, tmp_path):
    tax = validate_taxonomy(_tax(), "mem")

    def respond(body):
        item = _item_of(body)
        attempt = (len(body["messages"]) - 2) // 2  # system + user, then (assistant, user) per retry
        if item == "Doctor":
            return Reply(_reply(item, n_rubrics=9), usage=(100, 50))  # always 9 rubrics -> skipped
        if item == "Chef" and attempt == 0:
            return Reply(_reply(item, n_words=12), usage=(100, 50))  # 12 words, then fixed
        if item == "Ramen":
            return Reply(_reply(item, fence=True), usage=(100, 50))
        return Reply(_reply(item), usage=(100, 50))

    fake_openai.default = respond
    chat = _chat(fake_openai.url, price_per_1m_input=2.0, price_per_1m_output=8.0)
    out = str(tmp_path / "prompts.jsonl")
    s = write_prompts(tax, out, chat, num_rubrics=10, seed=3)
    assert (s["written"], s["skipped"], s["invalid"], s["failed"], s["reused"]) == (4, 1, 1, 0, 0)
    assert s["validation_retries"] == 2 + 1  # Doctor: 2 retries, Chef: 1
    n_req = len(fake_openai.chat_requests)
    assert n_req == 3 + 2 + 1 + 1 + 1
    assert s["prompt_tokens"] == 100 * n_req and s["completion_tokens"] == 50 * n_req
    assert s["cost_usd"] == pytest.approx((100 * n_req * 2.0 + 50 * n_req * 8.0) / 1e6)
    assert s["errors"][0]["id"] == "Human/Occupation/Doctor" and "9 entries" in s["errors"][0]["error"]

    # The retry carried the bad reply and the error.
    doctor = [b for b in fake_openai.chat_requests if _item_of(b) == "Doctor"]
    assert [len(b["messages"]) for b in doctor] == [2, 4, 6]
    assert "has 9 entries" in doctor[1]["messages"][3]["content"]
    assert doctor[1]["messages"][2]["role"] == "assistant"
    chef = [b for b in fake_openai.chat_requests if _item_of(b) == "Chef"]
    assert "has 12 words" in chef[1]["messages"][3]["content"]

    recs = {r["id"]: r for r in _records(out)}
    assert set(recs) == {"Human/Occupation/Chef", "Human/Age/Toddler", "Food/Dish/Paella", "Food/Dish/Ramen"}
    for idx, (c, sub, it) in enumerate(tax.items()):
        r = recs.get(f"{c}/{sub}/{it}")
        if r is None:
            continue
        assert (r["category"], r["sub_category"], r["item"]) == (c, sub, it)
        assert r["dimensions"] == pick_dimensions(tax.dimensions, 3, idx)
        assert r["source"] == "api" and r["model"] == "writer-model"
        assert 30 <= len(r["prompt"].split()) <= 60 and it in r["prompt"]
        assert len(r["rubrics"]) == 10 and all(isinstance(v, str) and v for v in r["rubrics"].values())
        user = [b for b in fake_openai.chat_requests if _item_of(b) == it][0]["messages"][1]["content"]
        assert ", ".join(r["dimensions"]) in user  # the request asked for the recorded dimensions


def test_write_prompts_resume_and_failures(fake_openai, tmp_path):
    tax = validate_taxonomy(_tax(), "mem")
    out = str(tmp_path / "prompts.jsonl")
    fake_openai.default = lambda body: (Status(500) if _item_of(body) == "Paella" else Reply(_reply(_item_of(body))))
    s1 = write_prompts(tax, out, _chat(fake_openai.url), limit=4)
    assert (s1["items"], s1["written"], s1["failed"], s1["skipped"]) == (4, 3, 1, 1)
    assert "500" in s1["errors"][0]["error"]
    n1 = len(fake_openai.chat_requests)
    assert n1 == 3 + 2  # Paella: 1 + max_retries=1

    with open(out, "a") as f:
        f.write('{"id": "Food/Dish/Ra')  # a crash mid-line
    fake_openai.default = lambda body: Reply(_reply(_item_of(body)))
    s2 = write_prompts(tax, out, _chat(fake_openai.url), limit=4)
    assert (s2["written"], s2["reused"], s2["corrupt_lines"]) == (1, 3, 1)
    new = fake_openai.chat_requests[n1:]
    assert [_item_of(b) for b in new] == ["Paella"]  # finished ids make no new requests

    s3 = write_prompts(tax, out, _chat(fake_openai.url))  # no limit: only Ramen is new
    assert (s3["written"], s3["reused"]) == (1, 4)
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == sorted(f"{c}/{s}/{i}" for c, s, i in tax.items())  # each once, corrupt line ignored

    s4 = write_prompts(tax, out, _chat(fake_openai.url))
    assert (s4["written"], s4["reused"], s4["prompt_tokens"]) == (0, 5, 0)
    assert len(fake_openai.chat_requests) == n1 + 2


def test_write_prompts_cache_replays_without_requests(fake_openai, tmp_path):
    tax = validate_taxonomy(_tax(), "mem")
    fake_openai.default = lambda body: Reply(_reply(_item_of(body)))
    cache = str(tmp_path / "cache")
    write_prompts(tax, str(tmp_path / "a.jsonl"), _chat(fake_openai.url, cache_dir=cache))
    n = len(fake_openai.chat_requests)
    s = write_prompts(tax, str(tmp_path / "b.jsonl"), _chat(fake_openai.url, cache_dir=cache))
    assert s["written"] == 5 and s["cache_hits"] == 5 and len(fake_openai.chat_requests) == n
    key = lambda p: sorted((r["id"], r["prompt"]) for r in _records(p))  # noqa: E731
    assert key(str(tmp_path / "a.jsonl")) == key(str(tmp_path / "b.jsonl"))


# -- the command line -----------------------------------------------------------------------------------------------

def test_make_rl_prompts_cli(fake_openai, tmp_path, capsys):
    fake_openai.default = lambda body: Reply(_reply(_item_of(body)), usage=(200, 100))
    out = str(tmp_path / "p.jsonl")
    rc = make_rl_prompts.main(["--taxonomy", SHIPPED, "--out", out, "--backend", "api", "--base_url",
                               fake_openai.url, "--model", "m", "--limit", "3", "--no_progress",
                               "--price_per_1m_input", "1", "--price_per_1m_output", "1"])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and len(_records(out)) == 3
    assert "written 3" in line and "tokens 600 in / 300 out" in line and "$0.0009" in line

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = make_rl_prompts.main(["--taxonomy", SHIPPED, "--out", out, "--base_url", f"http://127.0.0.1:{port}/v1",
                               "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err

    bad = _write(tmp_path, _tax(dimensions=["Mood"]))
    rc = make_rl_prompts.main(["--taxonomy", bad, "--out", out, "--base_url", fake_openai.url])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown dimension 'Mood'" in err and len(err.splitlines()) == 1
