"""The tiny VAE and text-encoder recipes on the shared trainer: SIGKILL mid-run, rerun the same command, and
the losses after the resume are bit-identical to an uninterrupted run's."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MICRO = {
    "vae": ["--config=experiments/vae.py:tiny", "--config.num_steps=6", "--config.batch_size=2",
            "--config.stats_examples=4", "--config.eval_batch_size=4", "--config.num_png_images=2",
            "--config.data.num_examples=8", "--config.data.eval_examples=2",
            "--config.ceiling_prompts_per_task=1"],
    "text_encoder": ["--config=experiments/text_encoder.py:tiny", "--config.num_steps=6",
                     "--config.data.num_examples=64", "--config.data.tokenizer_examples=64",
                     "--config.data.eval_examples=4", "--config.data.template_repeats=20",
                     "--config.tokenizer.vocab_size=300", "--config.tokenizer.byte_fallback=False",
                     "--config.model.hidden_size=16", "--config.model.num_heads=2",
                     "--config.model.num_kv_heads=1", "--config.model.head_dim=8",
                     "--config.model.num_experts=4", "--config.model.intermediate_size=8",
                     "--config.seq_buckets=(384,)", "--config.max_length=384", "--config.batch_size=4",
                     "--config.eval_batch_size=4"],
}


def _run(recipe, workdir, fault=""):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LENS_JAX_FAULT")}
    env["JAX_PLATFORMS"] = "cpu"
    if fault:
        env["LENS_JAX_FAULT"] = fault
    config, *overrides = MICRO[recipe]
    r = subprocess.run([sys.executable, "-m", "lens_jax.main", config, f"--workdir={workdir}", "--config.log_every=1",
                        "--config.checkpoint_every=2", *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vae", "text_encoder"])
def test_sigkill_and_rerun_continue_bit_identically(recipe, tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    rc, out = _run(recipe, ref)
    assert rc == 0, out[-3000:]
    rc, out = _run(recipe, killed, fault="5:KILL")
    assert rc == -9, out[-3000:]
    assert max(_losses(killed)) <= 5
    rc, out = _run(recipe, killed)
    assert rc == 0, out[-3000:]
    import re
    m = re.search(r"resumed from \S+ step (\d+)", out)
    assert m and int(m.group(1)) in (2, 4), out[-2000:]                  # continued, did not start over
    expected, got = _losses(ref), _losses(killed)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got == expected                                          # exact float equality, every step
