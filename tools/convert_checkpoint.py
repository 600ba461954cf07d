#!/usr/bin/env python
"""Convert official safetensors checkpoints (local files only) into lens_jax Orbax checkpoints.

Examples:
  python tools/convert_checkpoint.py --kind=lens_dit  --src=/ckpt/Lens/transformer --dst=/ckpt/jax/lens_dit
  python tools/convert_checkpoint.py --kind=flux2_vae --src=/ckpt/Lens/vae          --dst=/ckpt/jax/vae --dtype=float32
  python tools/convert_checkpoint.py --kind=gpt_oss   --src=/ckpt/gpt-oss-20b       --dst=/ckpt/jax/gpt_oss

--src takes a .safetensors file, a *.safetensors.index.json, or a directory holding either. Names and
shapes are checked against the chosen preset before any tensor is read; a mismatch lists every
missing, unexpected and mis-shaped tensor.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_jax.checkpoints.convert import DEFAULT_PRESETS, DTYPES, KINDS, convert_to_orbax  # noqa: E402
from lens_jax.checkpoints.keys import CheckpointKeyError  # noqa: E402
from lens_jax.checkpoints.safetensors_io import SafetensorsError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--src", required=True, help="safetensors file, index json or directory")
    p.add_argument("--dst", required=True, help="output directory (Orbax tree + lens_jax.json)")
    p.add_argument("--preset", default=None,
                   help=f"architecture preset (defaults: {DEFAULT_PRESETS}; the VAE reads config.json if present)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="stored dtype ('source' keeps the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --dst")
    args = p.parse_args(argv)
    try:
        convert_to_orbax(args.kind, args.src, args.dst, args.preset, args.dtype, args.overwrite)
    except (CheckpointKeyError, SafetensorsError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
