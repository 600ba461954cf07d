#!/usr/bin/env python
"""Times the Lens MMDiT forward pass for each attention kernel and prints ms and TFLOP/s.

On a GPU the default is the full `lens_3p8b` model at 1024^2 (4096 image tokens) with a CFG batch of 2
(bf16 weights and compute, random weights), which is one denoising step of the official pipeline. On
CPU it runs the `small` preset at 256^2 so the script can be checked anywhere.

  python tools/bench_dit.py                      # auto: GPU -> lens_3p8b @1024^2, CPU -> small @256^2
  python tools/bench_dit.py --preset=lens_3p8b --resolution=1024 --batch=2 --text_len=256 --attention=xla,cudnn

FLOPs are counted analytically (matmuls only: 2 per multiply-add, attention QK^T and PV); TFLOP/s uses
that count. The analytic count agrees with XLA's cost analysis of an unscanned model to ~1%; the 'XLA
TFLOP' column is shown for reference only, since XLA counts the body of the scanned blocks once.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lens_jax.models import attention as attention_lib  # noqa: E402
from lens_jax.models.flops import forward_flops  # noqa: E402
from lens_jax.models.mmdit import MMDiT, image_positions, mmdit_config  # noqa: E402


def bench(cfg, attention, batch, res, text_len, dtype, iters, warmup):
    h = w = res // 16
    n = h * w
    model = MMDiT(cfg, attention=attention, dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.standard_normal((batch, n, cfg.in_channels)), dtype)
    pos = jnp.broadcast_to(jnp.asarray(image_positions(h, w)), (batch, n, 3))
    txt = jnp.asarray(rng.standard_normal((batch, text_len, cfg.num_text_layers * cfg.text_dim)), dtype)
    # CFG batch: the second half is the unconditional branch (all-false text mask), as in sampling.
    mask = np.ones((batch, text_len), bool)
    mask[batch // 2:] = False if batch > 1 else True
    mask = jnp.asarray(mask)
    sigma = jnp.full((batch,), 0.7, jnp.float32)
    params = jax.jit(lambda k: model.init(k, img, pos, txt, mask, sigma)["params"])(jax.random.key(0))
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    fwd = jax.jit(lambda p, x, s: model.apply({"params": p}, x, pos, txt, mask, s))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, img, sigma).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops")) if ca and ca.get("flops") else None
    except Exception:  # cost analysis is optional and backend-dependent
        pass
    for _ in range(warmup):
        compiled(params, img, sigma).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        compiled(params, img, sigma).block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    flops = forward_flops(cfg, batch, n, text_len)
    return dict(attention=attention, preset_layers=cfg.num_layers, resolution=res, batch=batch, text_len=text_len,
                image_tokens=n, ms=round(ms, 3), min_ms=round(1e3 * min(times), 3),
                tflop=flops / 1e12, tflops_per_s=flops / (ms / 1e3) / 1e12,
                xla_tflop=None if xla_flops is None else float(f"{xla_flops / 1e12:.4g}"),
                compile_s=round(compile_s, 1))


def main(argv=None):
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lens_3p8b" if gpu else "small")
    p.add_argument("--resolution", type=int, default=1024 if gpu else 256, help="square image side in pixels")
    p.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    p.add_argument("--text_len", type=int, default=256 if gpu else 32)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--attention", default="xla,cudnn,einsum" if gpu else "xla,einsum",
                   help="comma-separated kernels from " + ",".join(attention_lib.available()))
    p.add_argument("--iters", type=int, default=20 if gpu else 3)
    p.add_argument("--warmup", type=int, default=3 if gpu else 1)
    p.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    args = p.parse_args(argv)
    if args.resolution % 16:
        p.error("--resolution must be a multiple of 16")
    cfg = mmdit_config(args.preset)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, preset {args.preset}, "
          f"{args.resolution}^2, batch {args.batch}, text {args.text_len}, {args.dtype}")
    if not args.json:
        print("| attention | ms/forward (median) | min ms | TFLOP (analytic) | TFLOP/s | XLA TFLOP | compile s |")
        print("|---|---|---|---|---|---|---|")
    for name in args.attention.split(","):
        name = name.strip()
        try:
            r = bench(cfg, name, args.batch, args.resolution, args.text_len, dtype, args.iters, args.warmup)
        except Exception as e:  # e.g. cuDNN unavailable on this backend: report and continue
            msg = str(e).splitlines()[0][:160]
            print(json.dumps({"attention": name, "error": msg}) if args.json else f"| {name} | failed: {msg} |||||")
            continue
        if args.json:
            print(json.dumps(r))
        else:
            print(f"| {name} | {r['ms']:.2f} | {r['min_ms']:.2f} | {r['tflop']:.4g} | {r['tflops_per_s']:.4g} | "
                  f"{r['xla_tflop']} | {r['compile_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
