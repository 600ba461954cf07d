"""Merge an RL run's LoRA adapters into its DiT and write a converted `lens_dit` weights checkpoint.

    python tools/merge_lora.py --run=runs/rl_tiny --out=runs/rl_tiny/merged [--params=dit|dit.ema] [--step=N]

The output is what tools/convert_checkpoint.py writes for official weights (lens_jax.json + Orbax weights), so
`sample` / `eval` read it with --config.eval.checkpoint=OUT (or --config.sample.checkpoint=OUT) and
lens_jax/checkpoints/lens_convert.export_official writes it in the official layout. The run's config.json
gives the model preset and the LoRA spec; --params picks the trained policy ('dit', default) or the old
policy ('dit.ema'). A run without adapters (full fine-tuning) is written as is.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_jax.posttrain.merge_lora import merge_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="rl workdir (or its checkpoints/ or a step directory)")
    p.add_argument("--out", required=True, help="output directory (converted lens_dit weights)")
    p.add_argument("--params", default="dit", help="'dit' (the trained policy) or 'dit.ema' (the old policy)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from lens_jax.configs.base import ConfigError
    try:
        merge_run(a.run, a.out, a.params, a.step, a.overwrite)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
