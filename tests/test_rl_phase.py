"""The rl phase end to end on a micro configuration: NFT and GRPO steps on the trainer, rollout grids, eval
before/after, merge_lora -> eval, resume, the VLM-judge path through the rule-judge server, judge outages and
bad inputs."""
import json
import os

import numpy as np
import pytest

from lens_jax import main as lens_main
from lens_jax.configs.base import ConfigError, load_experiment
from fake_openai import FakeOpenAI, Reply, Status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from test_research_loop import micro_config
    workdir = str(tmp_path_factory.mktemp("base"))
    c = micro_config()
    c.eval.enabled = False
    lens_main.run(c, workdir)
    return workdir


def rl_config(base, variant="tiny", **over):
    c = load_experiment("rl", variant)
    c.init_from = base
    c.rl.num_prompts = 24
    c.rl.prompts_per_step = 4
    c.rl.images_per_prompt = 2
    c.rl.rollout_steps = 3
    c.nft.updates_per_step = 1       # one update per step: step 1's KL is the reference's (0)
    c.rl.grid_every = 2
    c.rl.eval_guidances = (1.0,)
    c.num_steps = 3
    c.checkpoint_every = 2
    c.log_every = 1
    c.eval.prompts_per_task = 1
    c.eval.samples_per_prompt = 1
    c.eval.num_steps = 2
    for k, v in over.items():
        obj = c
        *path, last = k.split(".")
        for p in path:
            obj = obj[p]
        obj[last] = v
    return c


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.mark.slow
def test_nft_run_writes_metrics_grids_evals_and_a_mergeable_checkpoint(base_run, tmp_path):
    wd = str(tmp_path / "rl")
    res = lens_main.run(rl_config(base_run), wd)
    assert res.step == 3
    r = rows(wd)
    assert [x["step"] for x in r] == [1, 2, 3]
    for key in ("reward/mean", "reward/std", "zero_std_ratio", "nft/kl", "nft/loss_pos", "nft/loss_neg",
                "pass/Structural Integrity", "rollout/images_per_s", "loss", "grad_norm"):
        assert all(np.isfinite(x[key]) for x in r), key
    assert r[0]["nft/kl"] == 0.0                     # adapters start at zero: the policy is the reference
    assert os.path.exists(os.path.join(wd, "rollouts", "step_000000.png"))
    for d in ("eval_before", "eval"):
        s = json.load(open(os.path.join(wd, d, "synthetic_geneval.json")))
        assert 0.0 <= s["overall"] <= 1.0
    from tools.merge_lora import merge_run
    out = str(tmp_path / "merged")
    meta = merge_run(wd, out, "dit", log=lambda *_: None)
    assert meta["lora"]["rank"] == 16
    c = load_experiment("eval", "tiny")
    c.eval.checkpoint, c.eval.prompts_per_task, c.eval.samples_per_prompt, c.eval.num_steps = out, 1, 1, 2
    c.eval.guidance = 1.0
    lens_main.run(c, str(tmp_path / "eval_merged"))
    merged = json.load(open(tmp_path / "eval_merged" / "eval" / "synthetic_geneval.json"))
    after = json.load(open(os.path.join(wd, "eval", "synthetic_geneval.json")))
    assert merged["per_prompt"] == after["per_prompt"]   # the merged checkpoint renders what the run evaluated
    # distillation from this RL run merges its adapters first (phases/distill.dit_source)
    from lens_jax.checkpoints import orbax_io
    from lens_jax.phases import distill as distill_phase
    dc = load_experiment("distill", "tiny")
    dc.init_from = wd
    os.makedirs(tmp_path / "distill")
    path, net, part = distill_phase.dit_source(dc, wd, "", "config.init_from", str(tmp_path / "distill"),
                                               lambda *_: None)
    assert (net, part) == ("dit", "params") and path.startswith(str(tmp_path / "distill"))
    assert orbax_io.load_meta(path)["lora"]["rank"] == 16
    # a rerun with more steps resumes from the checkpoint
    res2 = lens_main.run(rl_config(base_run, num_steps=4, **{"eval.enabled": False}), wd)
    assert res2.start.step == 3 and res2.step == 4


@pytest.mark.slow
def test_grpo_and_the_vlm_judge_path_through_the_rule_judge_server(base_run, tmp_path):
    from lens_jax.posttrain.judge_server import make_server
    # GRPO on mixed aspect-ratio rollouts: the 5 buckets of Lens's ratios at 64² area, one per prompt
    lens_main.run(rl_config(base_run, "grpo", num_steps=2, **{"eval.enabled": False, "data.buckets": "ar9:64",
                                                              "data.resolution": 64}), str(tmp_path / "grpo"))
    g = rows(str(tmp_path / "grpo"))
    assert all(np.isfinite(x["grpo/policy_loss"]) for x in g) and g[0]["grpo/kl"] == 0.0
    assert all(x["judge/missing"] == 0 for x in g)
    with open(tmp_path / "grpo" / "rollouts" / "step_000000.txt") as f:
        sizes = [json.loads(line)["size"] for line in f]
    assert len(sizes) == 4 and set(sizes) <= {"48x96", "48x80", "64x64", "80x48", "96x48"} and len(set(sizes)) > 1

    lens_main.run(rl_config(base_run, num_steps=1, **{"eval.enabled": False}), str(tmp_path / "rule"))
    server = make_server("127.0.0.1", 0)
    import threading
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = rl_config(base_run, num_steps=1, **{"eval.enabled": False, "judge.kind": "api",
                                               "judge.base_url": server.url, "judge.model": "rule-judge",
                                               "judge.cache_dir": str(tmp_path / "cache")})
        lens_main.run(c, str(tmp_path / "api"))
    finally:
        server.shutdown()
        server.server_close()
    a, b = rows(str(tmp_path / "rule"))[0], rows(str(tmp_path / "api"))[0]
    assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6)   # same rollouts, same verdicts
    assert b["judge/missing"] == 0


@pytest.mark.slow
def test_a_judge_outage_stops_cleanly_with_a_checkpoint_and_the_rerun_resumes(base_run, tmp_path):
    fake = FakeOpenAI(default=Reply("1")).start()
    try:
        n_per_step = 4 * 2 * 8                         # prompts x images x rubrics (at most)
        calls = {"n": 0}

        def behaviour(body):
            calls["n"] += 1
            return Reply("1") if calls["n"] <= n_per_step * 1 else Status(500)
        fake.default = behaviour
        c = rl_config(base_run, num_steps=3, **{
            "eval.enabled": False, "judge.kind": "api", "judge.base_url": fake.url, "judge.model": "m",
            "judge.max_retries": 1, "judge.backoff_s": 0.0, "judge.timeout_s": 5.0,
            "rl.judge_retries": 1, "rl.judge_retry_wait_s": 0.0})
        wd = str(tmp_path / "outage")
        with pytest.raises(SystemExit) as e:
            lens_main.run(c, wd)
        assert e.value.code == 3
        saved = [int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
        assert saved and 1 <= max(saved) < 3              # the steps done before the outage are on disk
        assert len(rows(wd)) == max(saved)
        fake.default = Reply("0")
        res = lens_main.run(c, wd)
        assert res.start.step == max(saved) and res.step == 3
    finally:
        fake.stop()


def test_bad_inputs_give_clear_errors(base_run, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        lens_main.run(rl_config(""), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="config.init_from"):
        lens_main.run(rl_config(os.path.join(REPO, "data", "tiny", "vae")), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="config.judge"):
        lens_main.run(rl_config(base_run, **{"judge.kind": "api", "judge.base_url": "http://127.0.0.1:9/v1",
                                            "judge.timeout_s": 2.0}), str(tmp_path / "c"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "two red circles", "category": "counting", "rubrics": {}}) + "\n")
    with pytest.raises(ConfigError, match="line 1"):
        lens_main.run(rl_config(base_run, **{"rl.prompts": str(bad)}), str(tmp_path / "d"))
