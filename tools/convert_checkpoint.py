#!/usr/bin/env python
"""Convert official safetensors checkpoints (local files only) into lens_jax Orbax checkpoints.

Examples:
  python tools/convert_checkpoint.py --kind=lens_dit  --src=/ckpt/Lens/transformer --dst=/ckpt/jax/lens_dit
  python tools/convert_checkpoint.py --kind=flux2_vae --src=/ckpt/Lens/vae          --dst=/ckpt/jax/vae --dtype=float32
  python tools/convert_checkpoint.py --kind=gpt_oss   --src=/ckpt/gpt-oss-20b       --dst=/ckpt/jax/gpt_oss
  python tools/convert_checkpoint.py --kind=gpt_oss   --src=/ckpt/gpt-oss-20b       --dst=/ckpt/jax/gpt_oss --gpt_oss_full

--src takes a .safetensors file, a *.safetensors.index.json, or a directory holding either. Names and
shapes are checked against the chosen preset before any tensor is read; a mismatch lists every
missing, unexpected and mis-shaped tensor.

--gpt_oss_full converts the whole causal LM (every layer, model.norm, lm_head) into the text-encoder layout:
<dst>/ holds the encoder weights (kind 'gpt_oss', embedding + all layers) and <dst>/lm_head/ the final norm and
LM head (kind 'gpt_oss_lm_head'), which `lens_jax.models.gpt_oss_decode.load_lm` reads for the local reasoner.
The preset's selected_layers must end at the last layer (true for gpt_oss_20b).
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_jax.checkpoints.convert import DEFAULT_PRESETS, DTYPES, KINDS, convert_to_orbax, model_config  # noqa: E402
from lens_jax.checkpoints.keys import CheckpointKeyError  # noqa: E402
from lens_jax.checkpoints.safetensors_io import SafetensorsError, open_checkpoint  # noqa: E402


def convert_gpt_oss_full(src, dst, preset=None, dtype="bfloat16", overwrite=False, log=print):
    """The full GPT-OSS causal LM -> <dst>/ (encoder weights, kind 'gpt_oss') + <dst>/lm_head/ (kind
    'gpt_oss_lm_head', {'params': {final_norm, lm_head}}). Returns the encoder meta."""
    import jax
    import ml_dtypes
    import numpy as np

    from lens_jax.checkpoints import orbax_io
    from lens_jax.checkpoints.gpt_oss_convert import convert_gpt_oss
    from lens_jax.models.gpt_oss_decode import LM_HEAD_DIR, LM_HEAD_KIND
    from lens_jax.models.gpt_oss_lm import encoder_params, lm_head_params

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    preset = preset or DEFAULT_PRESETS["gpt_oss"]
    cfg = model_config("gpt_oss", preset)
    if cfg.selected_layers[-1] != cfg.num_layers - 1:
        raise ValueError(f"--gpt_oss_full needs a preset whose selected_layers end at the last layer "
                         f"({cfg.num_layers - 1}); {preset!r} has {cfg.selected_layers}")
    head_dst = os.path.join(dst, LM_HEAD_DIR)
    for d in (dst, head_dst):
        if os.path.exists(os.path.join(d, orbax_io.TREE_DIR)) and not overwrite:
            raise FileExistsError(f"{d} already holds a checkpoint; pass --overwrite to replace it")
    t0 = time.time()
    reader = open_checkpoint(src)
    out_dtype = DTYPES[dtype] or np.dtype(ml_dtypes.bfloat16)
    params = convert_gpt_oss(reader, cfg, dtype=out_dtype, full=True)["params"]
    enc, head = encoder_params(params, cfg), lm_head_params(params)
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    meta = {"kind": "gpt_oss", "preset": preset, "config": dataclasses.asdict(cfg), "source": os.path.abspath(src),
            "dtype": dtype, "num_source_tensors": len(reader), "num_parameters": n, "lm_head": LM_HEAD_DIR}
    log(f"read {len(reader)} tensors, {n:,} values, in {time.time() - t0:.1f}s; writing {dst} and {head_dst}")
    orbax_io.save_weights(dst, {"params": enc}, meta, overwrite=overwrite)
    orbax_io.save_weights(head_dst, {"params": head}, {"kind": LM_HEAD_KIND, "config": dataclasses.asdict(cfg)},
                          overwrite=overwrite)
    log(f"done in {time.time() - t0:.1f}s")
    return meta


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
    p.add_argument("--gpt_oss_full", action="store_true",
                   help="gpt_oss only: convert the whole LM (all layers, final norm, lm_head) into the text-encoder "
                        "layout (<dst>/ + <dst>/lm_head/) for the local reasoner")
    args = p.parse_args(argv)
    if args.gpt_oss_full and args.kind != "gpt_oss":
        p.error("--gpt_oss_full needs --kind=gpt_oss")
    try:
        if args.gpt_oss_full:
            convert_gpt_oss_full(args.src, args.dst, args.preset, args.dtype, args.overwrite)
        else:
            convert_to_orbax(args.kind, args.src, args.dst, args.preset, args.dtype, args.overwrite)
    except (CheckpointKeyError, SafetensorsError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
