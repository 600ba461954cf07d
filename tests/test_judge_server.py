"""The OpenAI-compatible judge server (lens_jax/posttrain/judge_server.py) with an injected judge_fn, driven
end to end by VLMJudge over loopback HTTP, plus the tools/serve_rule_judge.py command line."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from lens_jax.posttrain.chat import ChatConfig, ChatService
from lens_jax.posttrain.judge_server import RULE_JUDGE_MODEL, make_server
from lens_jax.posttrain.judging import JudgeItem
from lens_jax.posttrain.vlm_judge import VLMJudge, build_judge_messages, encode_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeRubricError(ValueError):
    """What a rule judge raises for a rubric it cannot parse."""


def bright_judge(image, prompt, rubric_name, rubric):
    """1 if the mean pixel is bright; raises for a rubric it does not know; crashes on request."""
    if rubric == "crash":
        raise RuntimeError("judge bug")
    if rubric != "The image is bright.":
        raise FakeRubricError(f"cannot parse rubric {rubric!r}")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return int(image.mean() > 127)


@pytest.fixture
def server(request):
    calls = []

    def judge_fn(*args):
        calls.append(args)
        return bright_judge(*args)

    srv = make_server("127.0.0.1", 0, judge_fn=judge_fn)
    srv.calls = calls
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()

    def stop():
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)

    request.addfinalizer(stop)
    return srv


def _chat(url, **kw):
    base = dict(base_url=url, model=RULE_JUDGE_MODEL, timeout_s=5.0, max_retries=2, backoff_s=0.01,
                concurrency=4, progress=False)
    base.update(kw)
    return ChatService(ChatConfig(**base))


def _img(value, h=8, w=10):
    rng = np.random.default_rng(value)
    return np.clip(value + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_vlm_judge_end_to_end(server):
    chat = _chat(server.url)
    assert chat.check_reachable() == [RULE_JUDGE_MODEL]
    judge = VLMJudge(chat)
    images = [_img(230), _img(20), _img(200), _img(60)]
    items = [JudgeItem(im, f"prompt {k}", "Brightness", "The image is bright.") for k, im in enumerate(images)]
    assert judge.judge_batch(items) == [1, 0, 1, 0]
    assert judge.stats["judged"] == 4 and judge.stats["ones"] == 2 and judge.stats["failed"] == 0
    # The server saw the same pixels, prompt and rubric the client sent.
    seen = {c[1]: c for c in server.calls}
    for k, im in enumerate(images):
        img, prompt, name, rubric = seen[f"prompt {k}"]
        np.testing.assert_array_equal(img, im)
        assert (name, rubric) == ("Brightness", "The image is bright.")
    assert chat.stats["prompt_tokens"] > 0 and chat.stats["completion_tokens"] == 4
    assert server.counts["ones"] == 2 and server.counts["zeros"] == 2


def test_unparseable_rubric_is_400_and_none(server):
    chat = _chat(server.url)
    judge = VLMJudge(chat)
    out = judge.judge_batch([JudgeItem(_img(230), "p", "Mystery", "The image has a vibe."),
                             JudgeItem(_img(230), "p", "Brightness", "The image is bright.")])
    assert out == [None, 1]
    assert judge.stats["failed"] == 1 and judge.stats["judged"] == 1
    assert chat.stats["client_errors"] == 1 and chat.stats["retries"] == 0  # a 400 is not retried
    assert server.counts["bad_requests"] == 1
    status, body = _post(server.url, {"model": "m", "messages": build_judge_messages(
        encode_png(_img(10)), "p", "Mystery", "The image has a vibe.")})
    assert status == 400 and "cannot parse rubric" in body["error"]["message"]


def test_judge_bug_is_500_retried_then_failed(server):
    chat = _chat(server.url, max_retries=1)
    judge = VLMJudge(chat)
    assert judge.judge(_img(200), "p", "crash", "R") is None
    assert chat.stats["server_errors"] == 2 and chat.stats["failures"] == 1 and judge.stats["failed"] == 1


def test_malformed_requests_and_endpoints(server):
    good = build_judge_messages(encode_png(_img(200)), "p", "Brightness", "The image is bright.")
    status, body = _post(server.url, {"model": "m", "messages": good})
    assert status == 200 and body["choices"][0]["message"]["content"] == "1"
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 1

    text_only = [good[0], {"role": "user", "content": [good[1]["content"][0]]}]
    status, body = _post(server.url, {"messages": text_only})
    assert status == 400 and "one text part and one image_url part" in body["error"]["message"]

    jpeg = io.BytesIO()
    Image.fromarray(_img(200)).save(jpeg, format="JPEG")
    wrong = json.loads(json.dumps(good))
    wrong[1]["content"][1]["image_url"]["url"] = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    status, body = _post(server.url, {"messages": wrong})
    assert status == 400 and "data:image/png;base64" in body["error"]["message"]

    garbled = json.loads(json.dumps(good))
    garbled[1]["content"][0]["text"] = "Is this image bright?"
    status, body = _post(server.url, {"messages": garbled})
    assert status == 400 and "format_judge_request" in body["error"]["message"]

    status, body = _post(server.url, None, raw=b"{not json")
    assert status == 400

    with urllib.request.urlopen(server.url + "/models", timeout=5) as r:
        assert json.loads(r.read())["data"][0]["id"] == RULE_JUDGE_MODEL
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/nothing", timeout=5)
    assert e.value.code == 404


def test_non_loopback_host_is_refused():
    with pytest.raises(ValueError, match="non-loopback"):
        make_server("0.0.0.0", 0, judge_fn=bright_judge)
    with pytest.raises(ValueError, match="non-loopback"):
        make_server("192.0.2.7", 0, judge_fn=bright_judge)
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve_rule_judge.py"), "--host", "0.0.0.0"],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert rc.returncode == 2 and "non-loopback" in rc.stderr


def test_serve_rule_judge_cli_prints_url_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve_rule_judge.py"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert first, "the server printed nothing within 60 s"
        url = first[0].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        chat = _chat(url)
        assert chat.check_reachable() == [RULE_JUDGE_MODEL]
        chat.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
