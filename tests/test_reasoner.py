"""The reasoner: output cleaning, the rewriter contract (fallbacks, counters, the token cap, the user's language),
the shapes-world rule rewriter, the API backend against a loopback server, and the system-prompt search."""
import json
import os
import re

import numpy as np
import pytest

from fake_openai import Malformed, Reply, Status, fake_openai  # noqa: F401 - fixture
from lens_jax.configs.base import ConfigError, load_experiment
from lens_jax.data import synthetic as sw
from lens_jax.eval import shapes_eval
from lens_jax.posttrain.chat import ChatConfig, JudgeUnavailableError
from lens_jax.reasoner import base, dev_file, rules, search
from lens_jax.reasoner.api import ApiRewriter
from lens_jax.reasoner.cleaning import clean_rewrite, dominant_script, same_language
from lens_jax.reasoner.system_prompts import resolve_system_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "data", "tiny", "text_encoder", "tokenizer")
WORLD = sw.world_config(load_experiment("pretrain", "tiny").data.world, image_size=80, seed=0)   # the tiny world


# ---------------------------------------------------------------------------------------------------------------
# Cleaning


@pytest.mark.parametrize("raw, want", [
    ("<|channel|>analysis<|message|>User wants a cat.<|end|><|start|>assistant<|channel|>final<|message|>"
     "A grey cat on a sofa.<|return|>", "A grey cat on a sofa."),
    ("<think>let me think</think>\n\"A red bicycle.\"", "A red bicycle."),
    ("```text\nA lighthouse at dusk.\n```", "A lighthouse at dusk."),
    ("Rewritten prompt: \u201cTwo dogs.\u201d", "Two dogs."),
    ("  many   spaces\nand lines ", "many spaces and lines"),
    ("<|channel|>analysis<|message|>only reasoning, the budget ran out", ""),
    ("<think>never closed", ""),
    ("", ""),
    (None, ""),
    ('"a" and "b"', '"a" and "b"'),
])
def test_clean_rewrite(raw, want):
    assert clean_rewrite(raw) == want


def test_scripts_and_languages():
    assert dominant_script("一只红色的猫") == "CJK" and dominant_script("赤い猫です") == "CJK"
    assert dominant_script("a red cat") == "LATIN" and dominant_script("кошка") == "CYRILLIC"
    assert same_language("une photo d'un chat", "une photo détaillée d'un chat gris")
    assert not same_language("一只红色的猫", "a red cat sitting on a chair")
    assert same_language("123", "anything")


# ---------------------------------------------------------------------------------------------------------------
# The rewriter contract


class Scripted(base.Rewriter):
    """Replies from a dict (missing = failure)."""
    name = "scripted"

    def __init__(self, replies, **kw):
        super().__init__(**kw)
        self.replies, self.calls = replies, []

    def _rewrite_batch(self, prompts):
        self.calls.append(list(prompts))
        return [(self.replies[p], None) if p in self.replies else (None, "backend down") for p in prompts]


def test_fallbacks_are_counted_and_keep_the_original():
    r = Scripted({"a cat": "A fluffy grey cat.", "a dog": "<think>x</think>  ", "猫": "A cat on a mat."})
    out = r.rewrite(["a cat", "", "a dog", "a bird", "猫", "a cat", "   "])
    assert out == ["A fluffy grey cat.", "", "a dog", "a bird", "猫", "A fluffy grey cat.", "   "]
    assert [x.status for x in r.records] == ["rewritten", "empty_input", "fallback_empty", "fallback_failed",
                                             "fallback_language", "rewritten", "empty_input"]
    assert r.records[3].detail == "backend down"
    s = r.stats.as_dict()
    assert (s["prompts"], s["rewritten"], s["empty_input"], s["fallback_empty"], s["fallback_failed"],
            s["fallback_language"]) == (7, 2, 2, 1, 1, 1)
    assert r.calls == [sorted(["a cat", "a dog", "a bird", "猫"])]     # each distinct prompt once; no empty ones
    assert "2 of 7 prompts rewritten" in r.summary()
    with pytest.raises(TypeError):
        r.rewrite("a cat")
    with pytest.raises(TypeError):
        r.rewrite(["a cat", 3])


def test_rewrites_over_the_encoders_cap_are_cut_at_a_word_and_counted():
    from lens_jax.text.prompt_encoding import PromptEncodingConfig, load_tokenizer, tokenize_prompts
    tok = load_tokenizer(TINY_TOKENIZER)
    cfg = PromptEncodingConfig(max_length=160, txt_offset=None, pad_id=None)
    budget = base.TokenBudget(tok, cfg)
    long = " ".join(["a small red circle next to a big blue square"] * 40)
    r = Scripted({"x": long, "y": "A short rewrite."}, token_budget=budget)
    out = r.rewrite(["x", "y"])
    assert out[1] == "A short rewrite." and not r.records[1].truncated
    assert r.records[0].truncated and r.stats["truncated"] == 1
    assert long.startswith(out[0]) and len(out[0]) < len(long) and budget.fits(out[0])
    assert not budget.fits(long.split(" ")[:len(out[0].split(" ")) + 1] and " ".join(long.split(" ")[:len(out[0].split(" ")) + 1]))
    ids, mask = tokenize_prompts(tok, [out[0]], cfg)
    suffix = tok("<|end|><|start|>assistant<|channel|>final<|message|>", add_special_tokens=False)["input_ids"]
    n = int(mask[0].sum())
    assert list(ids[0, n - len(suffix):n]) == list(suffix)     # the Harmony suffix survived the cut


def test_system_prompt_resolution(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_system_prompt("", str(tmp_path / "missing.txt"), "api")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_system_prompt("", str(tmp_path / "empty.txt"), "api")
    (tmp_path / "p.txt").write_text("Be dense.")
    assert resolve_system_prompt("general", str(tmp_path / "p.txt"), "api") == "Be dense."
    assert "GenEval" not in resolve_system_prompt("general", "", "api")
    assert "detector-friendly" in resolve_system_prompt("", "", "api")
    assert rules.Directives.parse(resolve_system_prompt("", "", "rules")) == rules.DEFAULT_DIRECTIVES


def test_unknown_backend_is_an_error():
    from lens_jax import reasoner
    c = load_experiment("eval", "tiny")
    c.reasoner.backend = "gpt9"
    with pytest.raises(ConfigError, match="reasoner.backend"):
        reasoner.validate(c)


# ---------------------------------------------------------------------------------------------------------------
# The rule rewriter


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("enumerate_instances yes", "not a `key: value`"), ("colour: red", "unknown directive"),
    ("opening: maybe", "expected yes/no"), ("opening: yes\nopening: no", "twice"), ("target_words: many", "target_words"),
    ("unspecified_color: mauve", "unspecified_color"), ("background: plaid", "background"),
])
def test_bad_directives_name_the_line(text, match):
    with pytest.raises(ConfigError, match=match):
        rules.Directives.parse(text)


def test_directives_round_trip_and_mutations_are_distinct():
    d = rules.Directives.parse("# comment\nstate_positions: no  # trailing\nTarget Words: 90\n")
    assert not d.state_positions and d.target_words == 90 and d.enumerate_instances
    assert rules.Directives.parse(d.to_text()) == d
    texts = [m.to_text() for _, m in d.mutations(WORLD.colors, WORLD.backgrounds)]
    assert len(set(texts)) == len(texts) and d.to_text() not in texts


def _cells(text):
    """{(color or None, shape): [cell, ...]} stated by a rewrite's 'X of the image there is a ... shape.'"""
    phrase_cell = {p: c for c, ps in sw.CELL_PHRASES.items() for p in ps}
    out = {}
    for pos, obj in re.findall(r"([A-Z][a-z ]+?) of the image there is an? ([a-z -]+?)\.", text):
        words = obj.split()
        color = words[-2] if len(words) > 1 and words[-2] in sw.COLORS else None
        out.setdefault((color, words[-1]), []).append(phrase_cell[pos[0].lower() + pos[1:]])
    return out


def test_every_shapes_eval_prompt_is_rewritten_faithfully():
    """Each ShapesEval prompt: parsed (no fallback), every requested object enumerated with its colour, counts
    right, cells from the canonical layout, relations where the prompt puts them."""
    prompts = shapes_eval.make_eval_prompts(WORLD, seed=0, per_task=None)
    r = rules.RuleRewriter(rules.DEFAULT_DIRECTIVES.to_text(), shapes=WORLD.shapes)
    out = r.rewrite([p["prompt"] for p in prompts])
    assert r.stats["rewritten"] == len(prompts) == 553
    for p, text in zip(prompts, out):
        cells = _cells(text)
        for c in p["include"]:
            assert len(cells.get((c.get("color"), c["class"]), [])) == c["count"], (p["prompt"], text)
        assert sum(len(v) for v in cells.values()) == sum(c["count"] for c in p["include"])
        n = sum(c["count"] for c in p["include"])
        assert sorted(c for v in cells.values() for c in v) in [sorted(o) for o in sw.CANONICAL_CELLS[n]] or \
            p["tag"] == "position"
        if p["tag"] == "position":
            b, a = p["include"]
            (cb,), (ca,) = cells[(None, b["class"])], cells[(None, a["class"])]
            rel = a["position"][0]
            assert {"left of": ca[1] < cb[1], "right of": ca[1] > cb[1], "above": ca[0] < cb[0],
                    "below": ca[0] > cb[0]}[rel], (p["prompt"], text)
        assert 40 <= len(text.split()) <= 260
    assert len(out[0].split()) < len(rules.compose("a photo of four circles", rules.DEFAULT_DIRECTIVES).split())


def test_directives_change_the_rewrite():
    p = "a photo of a circle left of a square"
    d = rules.DEFAULT_DIRECTIVES
    full = rules.compose(p, d)
    assert "to the left of the square" in full and "on a plain white background" in full
    bare = rules.compose(p, rules.MINIMAL_DIRECTIVES)
    assert "left" not in bare and len(bare.split()) < len(full.split())
    import dataclasses
    red = rules.compose(p, dataclasses.replace(d, unspecified_color="red", background="none"))
    assert "red circle" in red and "red square" in red and "background" not in red
    stacked = rules.compose("a photo of a circle and a square", dataclasses.replace(d, pair_layout="stacked"))
    assert "above the square" in stacked
    padded = rules.compose("a photo of a circle", dataclasses.replace(d, target_words=120))
    assert len(padded.split()) > len(rules.compose("a photo of a circle", d).split())
    detailed = " ".join(["word"] * 45)
    assert rules.compose(detailed, d) == detailed


def test_prompts_outside_the_world_keep_the_original():
    r = rules.RuleRewriter(rules.DEFAULT_DIRECTIVES.to_text(), shapes=WORLD.shapes)
    bad = ["une photo d'un cercle rouge", "a photo of a dog", "a photo of a mauve circle", "a photo of zero circles"]
    assert r.rewrite(bad) == bad
    assert r.stats["fallback_failed"] == 4
    assert "not a shapes-world prompt" in r.records[1].detail


# ---------------------------------------------------------------------------------------------------------------
# The API backend against a loopback server


def _chat(url, tmp_path, **kw):
    return ChatConfig(base_url=url, model="rewriter-1", timeout_s=kw.pop("timeout_s", 2.0), max_retries=2,
                      backoff_s=0.01, concurrency=4, cache_dir=str(tmp_path / "cache"), **kw)


def test_api_rewriter_slow_failing_malformed_and_cached(fake_openai, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123456")

    def respond(body):
        user = body["messages"][1]["content"]
        assert body["messages"][0]["content"] == "SYSTEM"
        if user == "slow":
            return Reply("never used", delay_s=5.0)
        if user == "down":
            return Status(503)
        if user == "bad":
            return Malformed()
        if user == "blank":
            return Reply("<think>hmm</think>")
        if user == "harmony":
            return Reply("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>"
                         "\"A tidy harmony answer.\"<|return|>")
        return Reply(f"A dense version of {user}.")

    fake_openai.default = respond
    r = ApiRewriter(_chat(fake_openai.url, tmp_path, timeout_s=0.5), "SYSTEM")
    prompts = ["a cat", "slow", "down", "bad", "blank", "harmony"]
    out = r.rewrite(prompts)
    assert out == ["A dense version of a cat.", "slow", "down", "bad", "blank", "A tidy harmony answer."]
    assert [x.status for x in r.records] == ["rewritten", "fallback_failed", "fallback_failed", "fallback_failed",
                                             "fallback_empty", "rewritten"]
    st = r.chat.stats.as_dict()
    assert st["timeouts"] == 3 and st["server_errors"] == 3 and st["bad_responses"] == 3
    n = len(fake_openai.chat_requests)
    again = r.rewrite(["a cat", "harmony"])            # from the on-disk cache, no request
    assert again == [out[0], out[5]] and len(fake_openai.chat_requests) == n
    r.close()
    cache = open(os.path.join(tmp_path, "cache", "chat_cache.jsonl")).read()
    assert "sk-test-secret" not in cache and "blank" not in cache     # failed / empty replies are not cached
    assert len(cache.strip().splitlines()) == 2
    assert "sk-test" not in json.dumps(r.describe())


def test_unreachable_endpoint_fails_before_any_work(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}"):
        ApiRewriter(_chat(f"http://127.0.0.1:{port}/v1", tmp_path), "SYSTEM")


# ---------------------------------------------------------------------------------------------------------------
# The search, with a stand-in DiT that follows dense captions literally


class LiteralPipeline:
    """A 'DiT' that draws exactly the objects a rule rewrite states: stated cells where given, the next free cells
    otherwise; a text without object sentences gives a blank image. Deterministic."""

    def __init__(self, world):
        self.world, self.calls = world, 0

    def render(self, text):
        rng = np.random.default_rng(0)
        phrase_cell = {p: c for c, ps in sw.CELL_PHRASES.items() for p in ps}
        objs, free = [], [(r, c) for r in range(3) for c in range(3)]
        placed = re.findall(r"([A-Z][a-z ]+?) of the image there is an? ([a-z -]+?)\.", text)
        loose = re.findall(r"There is an? ([a-z -]+?)\.", text)
        for pos, obj in placed + [(None, o) for o in loose]:
            words = obj.split()
            color = words[-2] if len(words) > 1 and words[-2] in sw.COLORS else "green"
            cell = phrase_cell[pos[0].lower() + pos[1:]] if pos else free[0]
            if cell in free:
                free.remove(cell)
            objs.append(sw.place_object(words[-1], color, "medium", cell[0], cell[1], rng, self.world))
        return sw.render(sw.Scene(objects=objs, background="white", image_size=self.world.image_size))

    def generate(self, prompts, height, width, num_steps, guidance, seed=0, batch_size=16, mu=None, progress=None):
        self.calls += 1
        return np.stack([self.render(p) for p in prompts])


def search_config(**kw):
    c = load_experiment("prompt_search", "tiny")
    s = c.search
    s.rounds, s.beam, s.children, s.max_candidates, s.patience = 3, 2, 6, 30, 3
    s.dev_pool_per_task, s.dev_size, s.samples_per_prompt = 3, 10, 1
    s.heldout_per_task, s.heldout_samples_per_prompt = 3, 1
    for k, v in kw.items():
        s[k] = v
    return c


def test_split_is_disjoint_and_covers_every_task():
    dev, held = search.split_prompts(WORLD, 0.5)
    for tag in shapes_eval.TASKS:
        assert dev[tag] and held[tag]
        assert not {p["prompt"] for p in dev[tag]} & {p["prompt"] for p in held[tag]}
    with pytest.raises(AssertionError, match="both"):
        search.check_disjoint(dev["colors"][:2], dev["colors"][1:3])
    with pytest.raises(ConfigError, match="dev_fraction"):
        search.split_prompts(WORLD, 1.0)


def test_mutation_search_improves_and_reports_on_held_out_prompts(tmp_path):
    c = search_config()
    out = str(tmp_path / "search")
    make = lambda text: rules.RuleRewriter(text, shapes=WORLD.shapes)  # noqa: E731
    report = search.run_search(c, LiteralPipeline(WORLD), make, out, search.MutationProposer(WORLD, seed=0),
                               [("minimal", rules.MINIMAL_DIRECTIVES.to_text())], WORLD, log=lambda m: None)
    cands = [json.loads(line) for line in open(os.path.join(out, "candidates.jsonl"))]
    assert len(cands) == report["candidates"] > 1
    assert all({"round", "parent", "origin", "system_prompt", "score", "tasks", "analysis"} <= set(x) for x in cands)
    assert "Accuracy by task" in cands[0]["analysis"] and "Failed:" in cands[0]["analysis"]
    seed_score = cands[0]["score"]
    best = report["best"]
    assert best["score"] > seed_score                          # the search found a better directive set
    held = report["heldout"]
    assert held[f"searched (candidate {best['id']})"]["overall"] > held["seed: minimal"]["overall"]
    assert held["no rewriter"]["overall"] == 0.0              # the literal model draws nothing from short prompts
    dev_prompts = json.load(open(dev_file(os.path.join(out, search.BEST_FILE))))["dev_prompts"]
    sets = json.load(open(os.path.join(out, "dev_prompts.json")))
    assert set(sets["pool"]) <= set(dev_prompts) and not set(dev_prompts) & set(sets["heldout"])
    assert os.path.getsize(os.path.join(out, "score_by_round.png")) > 1000
    assert "| searched" in open(os.path.join(out, "heldout.md")).read()
    # the searched prompt, evaluated through the eval protocol, never meets its development prompts
    from lens_jax.eval.geneval import evaluation_prompts
    ev = load_experiment("eval", "tiny")
    ev.eval.prompts_per_task = 0
    kept, origin = evaluation_prompts(ev, WORLD, dev_prompts)
    assert kept and not {p["prompt"] for p in kept} & set(dev_prompts) and "removed" in origin


def test_llm_proposer_step_against_a_loopback_server(fake_openai, tmp_path):
    """The LLM-driven step: the parent's prompt and analysis go out; fenced, slow, failing, malformed and
    invalid replies come back; valid new directive sets become candidates, the rest are counted."""
    from lens_jax.posttrain.chat import ChatService
    good = rules.Directives(state_positions=False).to_text()
    fake_openai.script(Reply("```\n" + good + "```"), Status(500), Status(500), Status(500),
                       Reply("colour: red"), Malformed(), Malformed(), Malformed(), Reply(""))
    fake_openai.default = Reply("nothing useful")
    chat = ChatService(_chat(fake_openai.url, tmp_path, timeout_s=2.0))
    chat.config.concurrency = 1
    prop = search.LlmProposer(chat, validate=rules.Directives.parse, format_hint="Use key: value lines.")
    parent = search.Candidate(0, 0, None, "seed", rules.DEFAULT_DIRECTIVES.to_text(), score=0.4,
                              tasks={"position": 0.1}, analysis="Failed: 'a photo of a circle left of a square'")
    out = prop.propose(parent, 5, seen=set())
    assert [text for _, text in out] == [good.strip()]
    assert prop.stats["proposed"] == 1 and prop.stats["failed"] == 2 and prop.stats["invalid"] >= 1
    body = fake_openai.chat_requests[0]
    user = body["messages"][1]["content"]
    assert "Score on the development prompts: 0.400" in user and "circle left of a square" in user
    assert "Use key: value lines." in user and rules.DEFAULT_DIRECTIVES.to_text().strip() in user
    chat.close()


# ---------------------------------------------------------------------------------------------------------------
# The local GPT-OSS backend


def test_local_backend_reuses_the_encoder_weights_and_parses_the_final_channel(tmp_path):
    """backend=local with the shipped tiny LM: one copy of the weights (the encoder's arrays), Harmony generation
    prompt with reasoning_effort=low, a reply without a final channel counted, a final-channel reply parsed."""
    from lens_jax import build, reasoner
    from lens_jax.reasoner.local import LocalRewriter
    c = load_experiment("eval", "tiny")
    c.reasoner.backend = "local"
    c.reasoner.local.max_new_tokens = 6
    c.reasoner.local.temperature = 0.0
    enc = build.load_encoders(c)
    rw = reasoner.build_rewriter(c, enc, str(tmp_path))
    assert isinstance(rw, LocalRewriter)
    shared = enc.encode_text.params
    assert rw.params["embedding"] is shared["embedding"] and rw.params["layers_0"] is shared["layers_0"]
    text = rw.render("a red circle")
    assert "Reasoning: low" in text and text.endswith("<|start|>assistant")
    assert "Keep your reasoning private" in text
    out = rw.rewrite(["a red circle", ""])
    assert len(out) == 2 and out[1] == "" and rw.stats["prompts"] == 2
    assert rw.stats["rewritten"] + rw.stats["fallback_empty"] + rw.stats["fallback_language"] == 1
    # The parse of a Harmony completion: analysis then final -> the final text; analysis only -> fallback.
    tok = enc.tokenizer
    done = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>a big red circle"
    ids = tok(done, add_special_tokens=False)["input_ids"]

    class Fixed(LocalRewriter):
        def _rewrite_batch(self, prompts):
            return [(tok.decode(ids, skip_special_tokens=False), None), ("<|channel|>analysis<|message|>hmm", None)]

    f = Fixed(rw.params, rw.config, tok, "SYSTEM")
    assert f.rewrite(["a", "b"]) == ["a big red circle", "b"] and f.stats["fallback_empty"] == 1


def test_search_candidates_share_one_api_client(fake_openai, tmp_path):
    """backend=api: open_chat checks the endpoint once; every candidate's rewriter reuses that client."""
    from lens_jax import build, reasoner
    from lens_jax.reasoner.api import open_chat
    c = load_experiment("prompt_search", "api")
    c.reasoner.api.base_url = fake_openai.url
    enc = build.load_encoders(c)
    chat = open_chat(c.reasoner.api, str(tmp_path))
    fake_openai.default = Reply("A dense prompt.")
    rws = [reasoner.build_rewriter(c, enc, str(tmp_path), system_prompt=f"S{i}", chat=chat) for i in range(3)]
    assert all(r.chat is chat for r in rws) and rws[1].rewrite(["x"]) == ["A dense prompt."]
    assert sum(1 for r in fake_openai.requests if r.path.endswith("/models")) == 1
    assert chat.cache_path == os.path.join(str(tmp_path), "reasoner_cache", "chat_cache.jsonl")
    chat.close()
