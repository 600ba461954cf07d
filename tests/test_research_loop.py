"""The research loop end to end on a micro configuration: pretrain -> checkpoint -> eval -> sample,
plus the latent cache's determinism and the sample phase's input errors."""
import json
import os

import numpy as np
import pytest

from lens_jax import main as lens_main
from lens_jax.configs.base import ConfigError, load_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(phase="pretrain"):
    c = load_experiment({"pretrain": "pretrain", "eval": "eval", "sample": "sample"}[phase], "tiny")
    c.data.num_examples = 32
    c.data.max_text_tokens = 48
    c.batch_size = 8
    c.num_steps = 6
    c.log_every = 2
    c.sample_every = 0
    c.optim.warmup_steps = 2
    c.sample.num_steps = 2
    c.sample.prompts = "a photo of a red circle"
    c.eval.prompts_per_task = 1
    c.eval.samples_per_prompt = 1
    c.eval.num_steps = 2
    return c


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    result = lens_main.run(micro_config(), workdir)
    return workdir, result


def test_pretrain_writes_metrics_checkpoint_samples_and_eval(trained_workdir):
    workdir, result = trained_workdir
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    assert {"grad_norm", "param_norm/dit", "update_norm/dit", "lr/dit", "sigma_mean", "loss_hi_noise",
            "step_time_s", "tokens_per_s"} <= set(rows[0])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
    assert os.path.exists(os.path.join(workdir, "samples", "step_000006.png"))
    with open(os.path.join(workdir, "eval", "synthetic_geneval.json")) as f:
        ev = json.load(f)
    assert set(ev["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert 0.0 <= ev["overall"] <= 1.0 and ev["num_images"] == 6
    assert {"blank", "objects", "shape_present", "count_exact", "color_present"} == set(ev["diagnostics"])
    rates = {k: v for k, v in ev["diagnostics"].items() if k != "objects"}
    assert all(0.0 <= v <= 1.0 for v in rates.values()) and ev["diagnostics"]["objects"] >= 0.0, ev["diagnostics"]
    assert result["overall"] == ev["overall"]
    # GenEval's folder layout and per-image results (read by GenEval's summary_scores.py)
    folder = os.path.join(workdir, "eval", "geneval")
    assert sorted(os.listdir(folder)) == [f"{i:05d}" for i in range(6)]
    assert os.listdir(os.path.join(folder, "00000", "samples")) == ["00000.png"]
    results = [json.loads(l) for l in open(os.path.join(workdir, "eval", "results.jsonl"))]
    assert len(results) == 6 and {"filename", "tag", "prompt", "correct", "reason", "metadata"} <= set(results[0])
    assert ev["settings"]["weights"] == "dit.ema of step 6"


def test_rerun_resumes_instead_of_restarting(trained_workdir):
    workdir, _ = trained_workdir
    c = micro_config()
    c.num_steps = 8
    c.eval.enabled = False
    lens_main.run(c, workdir)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows][-2:] == [6, 8]          # continued from step 6, did not redo 1..6
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))


def test_eval_and_sample_phases_read_the_checkpoint(trained_workdir, tmp_path):
    workdir, _ = trained_workdir
    ev = lens_main.run(micro_config("eval"), workdir)
    assert "overall" in ev
    c = micro_config("sample")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of two blue squares\na photo of a green triangle\n")
    c.sample.prompt_file = str(prompts)
    c.sample.height, c.sample.width = 64, 32
    settings = lens_main.run(c, workdir)
    assert len(settings["images"]) == 2
    from PIL import Image
    im = Image.open(os.path.join(workdir, "samples", "0001.png"))
    assert im.size == (32, 64)


def test_eval_of_a_hand_written_geneval_file_writes_the_folder_and_the_tool_scores_it(trained_workdir, tmp_path):
    """Two GenEval metadata lines -> the eval phase on another run's raw (non-EMA) weights -> GenEval's folder
    layout -> tools/score_geneval_folder.py -> GenEval's results JSONL; a malformed line fails naming it."""
    import subprocess
    import sys
    workdir, _ = trained_workdir
    meta = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
             {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                               {"class": "triangle", "count": 1, "color": "blue"}],
              "prompt": "a photo of a red square and a blue triangle"}]
    meta.write_text("".join(json.dumps(l) + "\n" for l in lines))
    c = micro_config("eval")
    c.eval.metadata_file = str(meta)
    c.eval.samples_per_prompt = 2
    c.eval.checkpoint = workdir
    c.eval.params = "dit"
    out = str(tmp_path / "out")
    ev = lens_main.run(c, out)
    assert ev["num_images"] == 4 and set(ev["tasks"]) == {"single_object", "color_attr"}
    assert ev["settings"]["weights"].startswith("dit of ") and ev["settings"]["weights"].endswith("step 8")
    folder = os.path.join(out, "eval", "geneval")
    assert sorted(os.listdir(folder)) == ["00000", "00001"]
    for i, line in enumerate(lines):
        assert json.loads(open(os.path.join(folder, f"{i:05d}", "metadata.jsonl")).read()) == line
        assert sorted(os.listdir(os.path.join(folder, f"{i:05d}", "samples"))) == ["00000.png", "00001.png"]

    results = tmp_path / "rescored.jsonl"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "score_geneval_folder.py"), folder,
                        f"--results={results}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in open(results)]
    assert [(x["tag"], x["prompt"]) for x in rows] == [(l["tag"], l["prompt"]) for l in lines for _ in range(2)]
    assert all(isinstance(x["correct"], bool) and x["reason"] is not None for x in rows)
    phase_rows = [json.loads(l) for l in open(os.path.join(out, "eval", "results.jsonl"))]
    assert [x["correct"] for x in rows] == [x["correct"] for x in phase_rows]      # same images, same verdicts
    assert f"Overall score (avg. over tasks): {ev['overall']:.5f}" in r.stdout

    meta.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "include": [{"class": "hexagon"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"evaluation_metadata.jsonl line 2: unknown class .hexagon."):
        lens_main.run(c, str(tmp_path / "bad"))


@pytest.mark.slow
def test_eval_and_sample_with_the_rule_reasoner_side_by_side(trained_workdir, tmp_path):
    """--config.reasoner.backend=rules: eval renders the same prompts raw (eval/) and rewritten (eval_reasoner/),
    saves the rewrites next to the images and compares the two; sample records the rewrite in PNG and settings."""
    workdir, _ = trained_workdir
    c = micro_config("eval")
    c.eval.checkpoint = workdir
    c.reasoner.backend = "rules"
    out = str(tmp_path / "ev")
    ev = lens_main.run(c, out)
    plain = json.load(open(os.path.join(out, "eval", "synthetic_geneval.json")))
    assert ev["without_reasoner"]["overall"] == plain["overall"] and plain["settings"]["reasoner"] is None
    assert ev["settings"]["reasoner"]["backend"] == "rules" and ev["settings"]["reasoner"]["stats"]["rewritten"] == 6
    rewrites = [json.loads(l) for l in open(os.path.join(out, "eval_reasoner", "rewrites.jsonl"))]
    assert [r["status"] for r in rewrites] == ["rewritten"] * 6
    first = open(os.path.join(out, "eval_reasoner", "geneval", "00000", "rewritten_prompt.txt")).read().strip()
    assert first == rewrites[0]["rewrite"] and first.startswith("The image shows")
    meta = json.loads(open(os.path.join(out, "eval_reasoner", "geneval", "00000", "metadata.jsonl")).read())
    assert meta["prompt"] == rewrites[0]["prompt"]                      # scored against the user's prompt
    comp = json.load(open(os.path.join(out, "eval_reasoner", "reasoner_comparison.json")))
    assert "| overall |" in comp["table"] and comp["with_reasoner"]["overall"] == ev["overall"]

    s = micro_config("sample")
    s.sample.checkpoint = workdir
    s.reasoner.backend = "rules"
    s.sample.prompts = "a photo of two blue squares;une photo d'un cercle"
    settings = lens_main.run(s, str(tmp_path / "sa"))
    imgs = settings["images"]
    assert imgs[0]["rewrite_status"] == "rewritten" and "blue square" in imgs[0]["rewritten_prompt"]
    assert imgs[1]["rewrite_status"] == "fallback_failed" and imgs[1]["rewritten_prompt"] == imgs[1]["prompt"]
    from PIL import Image
    assert Image.open(os.path.join(str(tmp_path / "sa"), "samples", "0000.png")).text["rewritten_prompt"] == \
        imgs[0]["rewritten_prompt"]

    s.reasoner.system_prompt_file = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="system_prompt_file.*does not exist"):
        lens_main.run(s, str(tmp_path / "sb"))


@pytest.mark.slow
def test_prompt_search_phase_writes_the_search_and_its_winner_evaluates_held_out(trained_workdir, tmp_path):
    workdir, _ = trained_workdir
    c = load_experiment("prompt_search", "tiny")
    c.search.checkpoint = workdir
    c.search.rounds, c.search.children, c.search.beam = 1, 1, 1
    c.search.dev_pool_per_task, c.search.dev_size, c.search.samples_per_prompt = 1, 4, 1
    c.search.heldout_per_task, c.search.heldout_samples_per_prompt = 1, 1
    c.eval.num_steps = 2
    out = str(tmp_path / "search")
    report = lens_main.run(c, out)
    assert report["candidates"] == 3 and set(report["heldout"]) >= {"no rewriter", "seed: default"}
    best = os.path.join(out, "search", "best_system_prompt.txt")
    assert os.path.exists(os.path.join(out, "search", "score_by_round.png"))
    ev = micro_config("eval")
    ev.eval.checkpoint = workdir
    ev.eval.prompts_per_task = 4
    ev.reasoner.backend = "rules"
    ev.reasoner.system_prompt_file = best
    ev.eval.with_and_without_reasoner = False
    res = lens_main.run(ev, str(tmp_path / "ev"))
    dev = set(json.load(open(os.path.join(out, "search", "best_system_prompt.dev.json")))["dev_prompts"])
    assert "development set removed" in res["settings"]["prompts"]
    assert not {p["prompt"] for p in res["per_prompt"]} & dev
    assert not os.path.exists(os.path.join(str(tmp_path / "ev"), "eval"))    # only the rewritten run was asked for


def test_sample_phase_rejects_bad_prompts_and_sizes(tmp_path):
    from lens_jax.phases import sample
    c = micro_config("sample")
    bad = tmp_path / "p.txt"
    bad.write_text("a red circle\n\na blue square\n")
    c.sample.prompt_file = str(bad)
    with pytest.raises(ConfigError, match="empty prompt on line"):
        sample.read_prompts(c.sample)
    with pytest.raises(ConfigError, match="multiple of 16"):
        sample.check_size(64, 40)
    c.sample.prompt_file = ""
    c.sample.prompts = "a;;b"
    with pytest.raises(ConfigError, match="empty prompt"):
        sample.read_prompts(c.sample)


def test_bad_shapes_world_options_fail_before_anything_loads():
    from lens_jax.phases import pretrain
    c = micro_config()
    c.data.world.layout = "spiral"
    with pytest.raises(ConfigError, match="config.data.world: unknown layout 'spiral'"):
        pretrain.validate(c)
    c = micro_config()
    c.data.world.grid_span = 1.4                 # outer cells would cross the 80-px image border
    with pytest.raises(ConfigError, match="crosses the image border"):
        pretrain.validate(c)


def test_latent_cache_says_when_it_cuts_captions():
    from types import SimpleNamespace
    from lens_jax.data.latent_cache import encode_examples
    from lens_jax.text.prompt_encoding import TextFeatures

    def encode_text(captions):             # valid length = number of words
        n = np.array([len(c.split()) for c in captions])
        mask = np.arange(n.max())[None] < n[:, None]
        return TextFeatures(np.ones(mask.shape + (3,), np.float32) * mask[..., None], mask)

    vae = SimpleNamespace(encode_tokens=lambda x: np.zeros((len(x), 4, 2), np.float32))
    chunks = [(np.zeros((2, 32, 32, 3), np.float32), ["a b c", "a b c d e f"])]
    logs = []
    ds = encode_examples(iter(chunks), vae, encode_text, 2, max_text_tokens=4, log=logs.append)
    assert ds.txt.shape[1] == 4 and "cut 1 of 2 captions to max_text_tokens=4" in " ".join(logs)
    logs.clear()
    ds = encode_examples(iter(chunks), vae, encode_text, 2, max_text_tokens=0, log=logs.append)
    assert ds.txt.shape[1] == 6 and not any("cut" in l for l in logs)


def test_latent_cache_encodes_each_distinct_caption_once():
    from types import SimpleNamespace
    from lens_jax.data.latent_cache import encode_examples
    from lens_jax.text.prompt_encoding import TextFeatures

    seen = []

    def encode_text(captions):             # features: (caption id, position); valid length = number of words
        seen.extend(captions)
        n = np.array([len(c.split()) for c in captions])
        mask = np.arange(n.max())[None] < n[:, None]
        ids = np.array([sum(map(ord, c)) for c in captions], np.float32)
        f = np.stack([np.broadcast_to(ids[:, None], mask.shape),
                      np.broadcast_to(np.arange(mask.shape[1]), mask.shape)], -1)
        return TextFeatures(f * mask[..., None], mask)

    vae = SimpleNamespace(encode_tokens=lambda x: x.reshape(len(x), 4, -1)[..., :2].astype(np.float32))
    caps = ["a red circle", "two squares", "a red circle", "a blue square on a white background", "two squares"]
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 4, 4, 3), np.float32)
    chunks = [(images[:3], caps[:3]), (images[3:], caps[3:])]
    ds = encode_examples(iter(chunks), vae, encode_text, 5, log=lambda _: None)
    assert sorted(seen) == sorted(set(caps))                       # each distinct caption encoded once
    assert ds.txt.shape[:2] == (5, 7) and ds.mask.sum(1).tolist() == [len(c.split()) for c in caps]
    want = encode_text(caps)                                           # the same features as encoding every row
    np.testing.assert_array_equal(ds.txt, want.features)
    np.testing.assert_array_equal(ds.mask, want.mask)
    np.testing.assert_array_equal(ds.img[:, 0, 0], np.arange(5))      # images keep the stream order


def test_latent_cache_order_is_a_function_of_seed_and_step():
    from lens_jax.data.latent_cache import EncodedDataset
    n = 10
    ds = EncodedDataset(img=np.arange(n)[:, None, None] * np.ones((1, 4, 2)), txt=np.zeros((n, 3, 5)),
                        mask=np.ones((n, 3), bool), grid=(2, 2))
    a = [ds.indices(s, 4, seed=7).tolist() for s in range(6)]
    assert a == [ds.indices(s, 4, seed=7).tolist() for s in range(6)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10))            # first epoch is a permutation
    assert a != [ds.indices(s, 4, seed=8).tolist() for s in range(6)]
    b = ds.batch(3, 4, seed=7)
    assert b["img"].shape == (4, 4, 2) and b["img_pos"].shape == (4, 4, 3)
