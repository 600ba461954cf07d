"""The `eval` phase: synthetic GenEval (ShapesEval, LENS_SPEC §11.6) of any run's or converted DiT.

    python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=DIR
    python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=OUT --config.eval.checkpoint=RUN \
        --config.eval.params=dit --config.eval.metadata_file=prompts.jsonl

The weights: config.eval.checkpoint ('' = this workdir; a run workdir, checkpoints dir, step dir or a converted
lens_dit directory) and config.eval.params (which net of a run: 'dit', 'dit.ema', 'student', ...; '' = the
EMA when the run keeps one), restored without optimiser state (lens_jax/build.py `restore_dit`). The model
settings are this experiment's (a checkpoint of another architecture is a clear error). The prompts:
config.eval.metadata_file (GenEval's format) or the built-in ShapesEval sets. Writes into DIR/eval/:
  geneval/<index:05d>/{metadata.jsonl, samples/<k:05d>.png}   GenEval's folder layout
  results.jsonl            GenEval's per-image results (summary_scores.py reads it)
  synthetic_geneval.json   overall, per-task, seen/unseen scores, diagnostics, settings
  samples.png, prompts.txt a grid of the first samples (one row per prompt) and the row prompts
(lens_jax/eval/geneval.py).
"""
from __future__ import annotations

import os

from lens_jax import build


def run(config, workdir: str):
    from lens_jax.eval.geneval import evaluate_pipeline
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)
    source = config.eval.get("checkpoint", "") or workdir
    params, what = build.restore_dit(config, model, source, params=config.eval.get("params", ""))
    print(f"evaluating {what}", flush=True)
    pipeline = build.build_pipeline(model, params, enc)
    return evaluate_pipeline(pipeline, config, os.path.join(workdir, "eval"), source=what)
