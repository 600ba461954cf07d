"""The `eval` phase: synthetic GenEval (ShapesEval, LENS_SPEC §11.6) of a trained DiT.

`python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=DIR` restores the latest checkpoint in
DIR/checkpoints (written by the pretrain phase with the same model settings), renders
`eval.samples_per_prompt` images for every evaluation prompt and writes
  DIR/eval/synthetic_geneval.json   overall, per-task, seen/unseen scores and the settings
  DIR/eval/samples.png              a grid of the first samples (one row per prompt)
  DIR/eval/prompts.txt              the prompts of the grid rows, in order
  DIR/eval/images.npz               every rendered image (uint8) and the prompts, for offline re-scoring
"""
from __future__ import annotations

import json
import os
import time

import numpy as np


def evaluate_shapes(pipeline, config, outdir: str) -> dict:
    from lens_jax.data.synthetic import world_config
    from lens_jax.eval.shapes_eval import evaluate, make_eval_prompts, save_grid

    e = config.eval
    os.makedirs(outdir, exist_ok=True)
    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    prompts = make_eval_prompts(world, seed=e.seed, per_task=e.prompts_per_task or None)
    k = e.samples_per_prompt
    texts = [p["prompt"] for p in prompts for _ in range(k)]
    t0 = time.time()

    def progress(done, total):
        print(f"  eval: rendered {done}/{total} images ({time.time() - t0:.0f}s)", flush=True)

    size = config.data.image_size
    images = pipeline.generate(texts, size, size, e.num_steps, e.guidance, seed=e.seed, batch_size=e.batch_size,
                               mu=None if e.mu < 0 else e.mu, progress=progress)
    per_prompt = [list(images[i * k:(i + 1) * k]) for i in range(len(prompts))]
    result = evaluate(per_prompt, prompts, integrity=e.integrity)
    summary = {key: result[key] for key in ("overall", "tasks", "overall_rules_only", "tasks_rules_only",
                                            "integrity", "clutter", "seen", "unseen", "seen_all", "partial",
                                            "num_images", "num_prompts", "diagnostics")}
    summary["settings"] = dict(num_steps=e.num_steps, guidance=e.guidance, mu=e.mu, samples_per_prompt=k, seed=e.seed,
                               image_size=size, caption=config.data.caption, model=config.model.preset,
                               integrity_gate=bool(e.integrity))
    summary["per_prompt"] = [dict(prompt=p["prompt"], tag=p["tag"], unseen=p["unseen"], accuracy=a)
                             for p, a in zip(prompts, result["per_prompt"])]
    with open(os.path.join(outdir, "synthetic_geneval.json"), "w") as f:
        json.dump(summary, f, indent=2)
    # Every rendered image, so a run can be re-scored offline (images[i] belongs to prompts[i // k]).
    np.savez_compressed(os.path.join(outdir, "images.npz"), images=images, samples_per_prompt=k,
                        prompts=np.array([json.dumps(p) for p in prompts]))
    # One row per prompt (its k samples), for a spread of tasks: every n-th prompt, at most 24 rows.
    rows = list(range(0, len(prompts), max(1, len(prompts) // 24)))[:24]
    save_grid([im for r in rows for im in per_prompt[r]], os.path.join(outdir, "samples.png"), ncol=k,
              scale=max(1, 128 // size))
    with open(os.path.join(outdir, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts[r]["prompt"] for r in rows) + "\n")
    tasks = " ".join(f"{t}={v:.3f}" for t, v in result["tasks"].items())
    print(f"synthetic GenEval overall={result['overall']:.3f} ({tasks}) unseen={result['unseen']:.3f} "
          f"integrity={result['integrity']:.3f} rules-only={result['overall_rules_only']:.3f} "
          f"in {time.time() - t0:.0f}s -> {outdir}", flush=True)
    d = result["diagnostics"]
    print("  what the images honour: " + " ".join(f"{k}={v:.3f}" for k, v in d.items())
          + "  (blank = no object; *_present = the prompt's shapes / colours appear at all)", flush=True)
    return summary


def run(config, workdir: str):
    from lens_jax.configs.base import ConfigError
    from lens_jax.phases.pretrain import build_dit, load_encoders, restore_trained_params
    from lens_jax.pipeline import LensPipeline

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {ckpt_dir}: run the pretrain phase with --workdir={workdir} first")
    vae, encode_text, hidden, n_layers = load_encoders(config)
    model = build_dit(config, vae.token_channels, hidden, n_layers)
    params, step = restore_trained_params(config, model, ckpt_dir)
    print(f"evaluating step {step} ({'EMA' if config.ema_decay > 0 else 'raw'} parameters)", flush=True)
    pipeline = LensPipeline(model, params, encode_text, vae)
    return evaluate_shapes(pipeline, config, os.path.join(workdir, "eval"))
