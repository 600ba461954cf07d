#!/usr/bin/env python
"""Scores a folder in GenEval's layout with ShapesEval and writes GenEval's per-image results JSONL.

    python tools/score_geneval_folder.py runs/tiny/eval/geneval
    python tools/score_geneval_folder.py OUT --results=OUT/results.jsonl --experiment=pretrain:tiny --no_integrity

FOLDER holds `<index:05d>/metadata.jsonl` (one GenEval metadata line) and `<index:05d>/samples/<k:05d>.png`, as
GenEval's generation script and lens_jax's eval phase write it. Every image is scored by ShapesEval against
its prompt in the shapes world of the experiment (default pretrain:tiny: its shapes are the classes, its
palette the colours). Writes `results.jsonl` (default beside FOLDER; GenEval's `evaluation/summary_scores.py`
reads it) and the ShapesEval summary beside it (`results.summary.json`), and prints GenEval's summary. Unreadable images are counted
and left out; a malformed metadata line is an error naming the file.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="GenEval layout: <index:05d>/metadata.jsonl and <index:05d>/samples/<k:05d>.png")
    p.add_argument("--results", default="", help="results JSONL to write (default: FOLDER/../results.jsonl)")
    p.add_argument("--experiment", default="pretrain:tiny",
                   help="experiment[:variant] whose shapes world (classes, colours) scores the images")
    p.add_argument("--no_integrity", action="store_true",
                   help="GenEval's rules only (no ShapesEval integrity gate on spurious blobs / clutter)")
    args = p.parse_args(argv)

    from lens_jax.configs.base import ConfigError, load_experiment
    from lens_jax.data.synthetic import world_config
    from lens_jax.eval.geneval import format_summary, score_folder

    name, _, variant = args.experiment.partition(":")
    try:
        config = load_experiment(name, variant or None)
        world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
        summary = score_folder(args.folder, world, args.results or None, integrity=not args.no_integrity)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.splitext(summary["results"])[0] + ".summary.json"
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"Total images: {summary['num_images']} ({summary['skipped_images']} unreadable, left out)")
    print(f"Total prompts: {summary['num_prompts']}")
    for t, v in summary["tasks"].items():
        print(f"{t:<16} = {100 * v:.2f}%")
    print(f"Overall score (avg. over tasks): {summary['overall']:.5f}")
    print(format_summary(summary))
    print(f"wrote {summary['results']} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
