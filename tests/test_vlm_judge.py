"""VLMJudge and ChatService against the scripted loopback fake (tests/fake_openai.py): parsing, retries,
failures, the image payload, the on-disk cache and resume, unreachable endpoints, and the API key's secrecy."""
import base64
import io
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from fake_openai import Malformed, Reply, Status, fake_openai  # noqa: F401 - fixture
from lens_jax.posttrain.chat import CACHE_FILE, ChatConfig, ChatService, JudgeUnavailableError
from lens_jax.posttrain.judging import JudgeItem, parse_verdict
from lens_jax.posttrain.vlm_judge import (SYSTEM_PROMPT, VLMJudge, format_judge_request, parse_judge_request)


def _config(url, **kw):
    base = dict(base_url=url, model="judge-model", timeout_s=2.0, max_retries=2, backoff_s=0.01,
                concurrency=4, progress=False)
    base.update(kw)
    return ChatConfig(**base)


def _image(seed=0, h=12, w=16):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _decode_request_image(body):
    user = [m for m in body["messages"] if m["role"] == "user"][-1]
    url = [p for p in user["content"] if p["type"] == "image_url"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    png = base64.b64decode(url[len(prefix):], validate=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _request_text(body):
    user = [m for m in body["messages"] if m["role"] == "user"][-1]
    texts = [p["text"] for p in user["content"] if p["type"] == "text"]
    assert len(texts) == 1
    return texts[0]


@pytest.mark.parametrize("text,expected", [
    ("1", 1), ("0", 0), ("  1\n", 1), ("0.", 0), ("1.", 1), ('{"verdict": 1}', 1), ('{"score": 0}', 0),
    (' {"verdict":0} ', 0), ('```json\n{"verdict": 1}\n```', 1),
    ("yes", None), ("no", None), ("0.5", None), ("2", None), ("1 because the dog is red", None), ("", None),
    (None, None), ("1..", None), ("10", None), ("-1", None), ("true", None), ('{"verdict": true}', None),
    ('{"verdict": "1"}', None), ('{"verdict": 2}', None), ('{"verdict": 1, "reason": "ok"}', None),
    ('{"answer": 1}', None), ('{"verdict": 1', None), ("1\n0", None), ("1.0", None),
])
def test_parse_verdict_table(text, expected):
    assert parse_verdict(text) == expected


def test_judge_request_layout_round_trips():
    cases = [("a red cube left of a blue ball", "Color Accuracy", "The cube is red."),
             ("two\nlines\n\nand a blank one", "", "  leading and trailing spaces  "),
             ("quotes \" and { braces }", "Name: with colon", "Check\nover two lines")]
    for prompt, name, rubric in cases:
        text = format_judge_request(prompt, name, rubric)
        assert parse_judge_request(text) == (prompt, name, rubric)
    with pytest.raises(ValueError, match="reserved tag"):
        format_judge_request("a </prompt> b", "n", "r")
    with pytest.raises(ValueError, match="layout"):
        parse_judge_request("Prompt: a dog\nRubric: is it a dog?")


def test_judge_request_shape_and_png_payload(fake_openai):
    fake_openai.default = Reply("1")
    judge = VLMJudge(ChatService(_config(fake_openai.url)))
    images = [_image(1), _image(2, h=9, w=7)]
    items = [JudgeItem(images[0], "a cat", "Count", "There is exactly one cat."),
             JudgeItem(images[0], "a cat", "Color", "The cat is orange."),
             JudgeItem(images[1], "a dog", "Count", "There is one dog.")]
    assert judge.judge_batch(items) == [1, 1, 1]
    bodies = fake_openai.chat_requests
    assert len(bodies) == 3  # one rubric per request
    by_rubric = {parse_judge_request(_request_text(b)): b for b in bodies}
    assert set(by_rubric) == {(it.prompt, it.rubric_name, it.rubric) for it in items}
    for it in items:
        body = by_rubric[(it.prompt, it.rubric_name, it.rubric)]
        assert body["model"] == "judge-model"
        assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert "exactly 1" in SYSTEM_PROMPT and "0" in SYSTEM_PROMPT
        np.testing.assert_array_equal(_decode_request_image(body), it.image)  # lossless, same pixels
    assert judge.stats["judged"] == 3 and judge.stats["ones"] == 3


def test_retries_on_timeout_429_500_then_success(fake_openai):
    chat = ChatService(_config(fake_openai.url, timeout_s=0.3, max_retries=3))
    judge = VLMJudge(chat)
    img = _image(3)
    fake_openai.script(Reply("1", delay_s=1.5), Reply("1"))  # slow (times out), then fine
    assert judge.judge(img, "p", "The check.", "Name") == 1
    fake_openai.script(Status(429), Status(500), Reply("0"))
    assert judge.judge(img, "p", "Another check.", "Name") == 0
    s = chat.stats
    assert s["timeouts"] == 1 and s["rate_limited"] == 1 and s["server_errors"] == 1
    assert s["retries"] == 3 and s["requests"] == 5 and s["failures"] == 0
    assert len(fake_openai.chat_requests) == 5  # the retries really were sent
    assert judge.stats["failed"] == 0 and judge.stats["judged"] == 2


def test_unparseable_and_failed_verdicts_are_none_and_counted(fake_openai):
    chat = ChatService(_config(fake_openai.url, max_retries=1))
    judge = VLMJudge(chat)
    img = _image(4)
    replies = ["yes", "0.5", "2", "1 because it matches", "", '{"verdict": 1']
    for r in replies:
        fake_openai.script(Reply(r))
        assert judge.judge(img, "p", f"check for {r!r}", "N") is None
    assert judge.stats["unparseable"] == len(replies)
    # A malformed body is retried; two in a row exhaust max_retries=1 -> failed.
    fake_openai.script(Malformed(), Malformed())
    assert judge.judge(img, "p", "malformed", "N") is None
    fake_openai.script(Status(500), Status(500))
    assert judge.judge(img, "p", "server down", "N") is None
    assert judge.stats["failed"] == 2 and chat.stats["failures"] == 2
    assert chat.stats["bad_responses"] == 2 and chat.stats["server_errors"] == 2
    # A 4xx other than 429 is not retried.
    n = len(fake_openai.chat_requests)
    fake_openai.script(Status(400, "bad request"))
    assert judge.judge(img, "p", "bad", "N") is None
    assert len(fake_openai.chat_requests) == n + 1 and chat.stats["client_errors"] == 1
    assert judge.stats["failed"] == 3 and judge.stats["judged"] == 0


def test_mixed_batch_keeps_order(fake_openai):
    verdict_of = {"one": "1", "zero": "0", "junk": "maybe"}
    fake_openai.default = lambda body: Reply(verdict_of[parse_judge_request(_request_text(body))[2]])
    judge = VLMJudge(ChatService(_config(fake_openai.url, concurrency=8)))
    names = ["one", "zero", "junk", "zero", "one", "one", "junk", "zero"] * 3
    items = [JudgeItem(_image(i), f"prompt {i}", "R", n) for i, n in enumerate(names)]
    out = judge.judge_batch(items)
    assert out == [{"one": 1, "zero": 0, "junk": None}[n] for n in names]
    assert judge.stats["unparseable"] == names.count("junk")


def test_cache_resume_and_key_secrecy(fake_openai, tmp_path, monkeypatch):
    secret = "sk-test-DO-NOT-LEAK-4f1c9a"
    monkeypatch.setenv("LENS_TEST_JUDGE_KEY", secret)
    cache_dir = str(tmp_path / "cache")
    cfg = _config(fake_openai.url, cache_dir=cache_dir, api_key_env="LENS_TEST_JUDGE_KEY",
                  price_per_1m_input=2.0, price_per_1m_output=8.0)
    fake_openai.default = Reply("1", usage=(1000, 1))
    items = [JudgeItem(_image(i), "a prompt", f"R{i}", f"check {i}") for i in range(5)]
    chat = ChatService(cfg)
    fake_openai.script(Reply("nonsense", usage=(1000, 1)))  # unparseable: not cached, asked again on the rerun
    first = VLMJudge(chat).judge_batch(items)
    assert sorted(map(str, first)) == ["1", "1", "1", "1", "None"]
    assert chat.stats["prompt_tokens"] == 5000 and chat.stats["completion_tokens"] == 5
    assert chat.cost_usd() == pytest.approx((5000 * 2.0 + 5 * 8.0) / 1e6)
    auth = {r.headers.get("authorization") for r in fake_openai.requests}
    assert auth == {f"Bearer {secret}"}  # the key was used ...
    chat.close()
    n_sent = len(fake_openai.chat_requests)

    chat2 = ChatService(cfg)  # a resumed run over the same cache
    judge2 = VLMJudge(chat2)
    second = judge2.judge_batch(items)
    assert second == [1, 1, 1, 1, 1]
    assert chat2.stats["cache_hits"] == 4 and chat2.stats["requests"] == 1
    assert len(fake_openai.chat_requests) == n_sent + 1  # only the unparseable one was asked again
    third = VLMJudge(chat2).judge_batch(items)
    assert third == second and len(fake_openai.chat_requests) == n_sent + 1
    chat2.close()

    # ... but never written anywhere, nor shown in a repr.
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert files and all(secret not in open(p, encoding="utf-8", errors="replace").read() for p in files)
    assert secret not in repr(cfg) and secret not in repr(chat2) and secret not in repr(chat2.stats)
    lines = open(os.path.join(cache_dir, CACHE_FILE)).read().splitlines()
    assert len(lines) == 5 and all(set(json.loads(l)) == {"key", "text", "usage"} for l in lines)


def test_cache_survives_a_corrupt_trailing_line(fake_openai, tmp_path):
    cache_dir = str(tmp_path / "cache")
    cfg = _config(fake_openai.url, cache_dir=cache_dir)
    items = [JudgeItem(_image(i), "p", "R", f"c{i}") for i in range(3)]
    with ChatService(cfg) as chat:
        assert VLMJudge(chat).judge_batch(items) == [1, 1, 1]
    path = os.path.join(cache_dir, CACHE_FILE)
    with open(path, "a") as f:
        f.write('{"key": "abc", "text": "1", "us')  # a crash mid-line
    n = len(fake_openai.chat_requests)
    with ChatService(cfg) as chat:
        assert chat.stats["cache_corrupt_lines"] == 1
        more = items + [JudgeItem(_image(9), "p", "R", "new")]
        assert VLMJudge(chat).judge_batch(more) == [1, 1, 1, 1]
        assert chat.stats["cache_hits"] == 3
    assert len(fake_openai.chat_requests) == n + 1
    with ChatService(cfg) as chat:  # the record after the corrupt line is readable
        assert chat.stats["cache_corrupt_lines"] == 1
        assert VLMJudge(chat).judge_batch(more[-1:]) == [1] and chat.stats["cache_hits"] == 1


def test_unreachable_endpoint_raises_with_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"  # closed now: nothing listens there
    chat = ChatService(_config(url, max_retries=1))
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}"):
        chat.check_reachable(timeout_s=2.0)
    assert issubclass(JudgeUnavailableError, RuntimeError)
    judge = VLMJudge(chat)  # without the check, requests fail cleanly after the retries
    assert judge.judge(_image(0), "p", "c") is None
    assert judge.stats["failed"] == 1 and chat.stats["connection_errors"] == 2


def test_check_reachable_ok_and_rejected_key(fake_openai):
    chat = ChatService(_config(fake_openai.url))
    assert chat.check_reachable() == ["fake-model"]
    fake_openai.models_status = 401
    with pytest.raises(JudgeUnavailableError, match="rejected the API key"):
        chat.check_reachable()
    fake_openai.models_status = 404  # a server without /models still counts as reachable
    assert chat.check_reachable() == []


def test_invalid_images_are_counted_not_sent(fake_openai):
    judge = VLMJudge(ChatService(_config(fake_openai.url)))
    bad = [JudgeItem(np.zeros((4, 4), np.uint8), "p", "R", "c"),
           JudgeItem(np.zeros((4, 4, 3), np.float32), "p", "R", "c"),
           JudgeItem(_image(0), "p", "R", "c")]
    assert judge.judge_batch(bad) == [None, None, 1]
    assert judge.stats["invalid"] == 2 and len(fake_openai.chat_requests) == 1


def test_key_echoed_in_an_error_is_redacted(fake_openai, monkeypatch):
    secret = "sk-test-ECHOED-9b2e77"
    monkeypatch.setenv("LENS_TEST_JUDGE_KEY", secret)
    chat = ChatService(_config(fake_openai.url, api_key_env="LENS_TEST_JUDGE_KEY"))
    fake_openai.script(Status(401, f"Incorrect API key provided: {secret}"))
    res = chat.complete([{"role": "user", "content": "hi"}])
    assert res.text is None and "401" in res.error and "***" in res.error and secret not in res.error
    judge = VLMJudge(chat)
    judge.close()  # closes the ChatService; a second close is harmless
    chat.close()
