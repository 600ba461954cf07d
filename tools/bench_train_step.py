#!/usr/bin/env python
"""Times the jitted pretraining step of an experiment (random batch of its shapes) and prints ms per step.

For the CPU research loop, where the step is what the 10-minute budget is spent on:

  python tools/bench_train_step.py                                  # pretrain:tiny, scan_layers True and False
  python tools/bench_train_step.py --variants=scan_layers=False --batch=128 --text_len=44

Each variant (comma-separated `field=value` settings of config.model, or `default`) builds the experiment's DiT,
AdamW and EMA exactly as the pretrain phase does (`pretrain_state` and the trainer's `jit_step`, one device) and times `--iters` steps after
`--warmup` steps on one fixed batch: image tokens [batch, (side/16)^2, C], text features [batch, text_len, F] with
the last quarter of the text padded (mask False), as in the brief-caption shapes cache. Model FLOPs per step are the
analytic matmul count of lens_jax/models/flops.py times 3 (forward + backward).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lens_jax.configs.base import load_experiment  # noqa: E402
from lens_jax.models.mmdit import dummy_inputs, image_positions  # noqa: E402
from lens_jax import build  # noqa: E402
from lens_jax.models.flops import forward_flops  # noqa: E402
from lens_jax.phases.pretrain import pretrain_state  # noqa: E402
from lens_jax.train import sharding as sharding_lib  # noqa: E402
from lens_jax.train.trainer import jit_step  # noqa: E402


def parse_variant(spec: str) -> dict:
    """'scan_layers=False,attention=einsum' -> {'scan_layers': False, 'attention': 'einsum'}; 'default' -> {}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if part == "default":
            continue
        if "=" not in part:
            raise ValueError(f"variant setting {part!r} is not field=value")
        k, v = part.split("=", 1)
        out[k.strip()] = {"true": True, "false": False}.get(v.strip().lower(), v.strip())
    return out


def bench(config, overrides: dict, batch: int, text_len: int, iters: int, warmup: int) -> dict:
    config = config.copy_and_resolve_references()
    for k, v in overrides.items():
        if k not in config.model:
            raise ValueError(f"config.model has no field {k!r}; fields: {sorted(config.model.keys())}")
        config.model[k] = type(config.model[k])(v)
    model = build.build_dit(config, build.load_encoders(config))   # input widths checked against the encoders
    side = config.data.resolution // 16
    n_img = side * side
    mesh = sharding_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    dummy = dummy_inputs(model.config, batch=1, h=side, w=side, text_len=text_len)
    spec, objectives, rules = pretrain_state(config, model, dummy)
    state = spec.create(mesh)
    rng = np.random.default_rng(0)
    mask = np.arange(text_len)[None] < np.full((batch, 1), max(1, (3 * text_len) // 4))
    feats = model.config.num_text_layers * model.config.text_dim
    data = dict(img=rng.standard_normal((batch, n_img, model.config.in_channels)).astype(np.float32),
                img_pos=np.broadcast_to(image_positions(side, side), (batch, n_img, 3)).copy(),
                txt=(rng.standard_normal((batch, text_len, feats)) * mask[..., None]).astype(np.float32),
                txt_mask=mask)
    step, _ = jit_step(spec, objectives, mesh, sharding_lib.batch_shardings(mesh, data), rules=rules)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    flops = 3 * forward_flops(model.config, batch, n_img, text_len)
    return dict(variant=";".join(f"{k}={v}" for k, v in overrides.items()) or "default",
                scan_layers=bool(config.model.scan_layers), batch=batch, image_tokens=n_img, text_len=text_len,
                ms=round(ms, 2), min_ms=round(1e3 * min(times), 2), gflop=round(flops / 1e9, 2),
                gflops_per_s=round(flops / (ms / 1e3) / 1e9, 1), compile_s=round(compile_s, 1),
                loss=float(metrics["loss"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="pretrain:tiny", help="experiments/<name>.py[:variant]")
    p.add_argument("--variants", default="scan_layers=True,scan_layers=False",
                   help="comma-separated variants; each is 'default' or ';'-joined config.model field=value")
    p.add_argument("--batch", type=int, default=0, help="0 = the experiment's batch_size")
    p.add_argument("--text_len", type=int, default=44, help="text tokens per example (brief shapes captions: 44)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object per variant")
    args = p.parse_args(argv)
    name, _, variant = args.experiment.partition(":")
    config = load_experiment(name, variant or None)
    if config.phase != "pretrain":
        p.error(f"--experiment={args.experiment} is phase {config.phase!r}; a pretrain experiment is needed")
    batch = args.batch or config.batch_size
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}, {os.cpu_count()} CPUs), jax {jax.__version__}, "
          f"{args.experiment} preset {config.model.preset}, batch {batch}, text {args.text_len}, "
          f"{config.model.dtype}")
    if not args.json:
        print("| variant | ms/step (median) | min ms | GFLOP/step | GFLOP/s | compile s |")
        print("|---|---|---|---|---|---|")
    for spec in args.variants.split(","):
        r = bench(config, parse_variant(spec), batch, args.text_len, args.iters, args.warmup)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"| {r['variant']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['gflop']:.3g} | {r['gflops_per_s']:.1f} "
                  f"| {r['compile_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
