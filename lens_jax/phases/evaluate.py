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
(lens_jax/eval/geneval.py). With a reasoner (--config.reasoner.backend=rules|api|local) the same prompts are also
rendered from its rewrites into DIR/eval_reasoner/ (rewrites.jsonl, geneval/<index>/rewritten_prompt.txt,
reasoner_comparison.json: the two side by side); a searched system prompt's development prompts are left out of both.
"""
from __future__ import annotations

import os

from lens_jax import build


def run(config, workdir: str):
    from lens_jax import reasoner
    from lens_jax.eval.geneval import evaluate_with_reasoner
    reasoner.validate(config)
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)
    source = config.eval.get("checkpoint", "") or workdir
    params, what = build.restore_dit(config, model, source, params=config.eval.get("params", ""))
    print(f"evaluating {what}", flush=True)
    pipeline = build.build_pipeline(model, params, enc)
    rewriter = reasoner.build_rewriter(config, enc, workdir)
    return evaluate_with_reasoner(pipeline, config, workdir, rewriter, source=what,
                                  exclude_prompts=reasoner.dev_prompts(config))
