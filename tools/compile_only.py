#!/usr/bin/env python
"""Memory plan for several meshes / stages: runs `lens_jax.main --config.compile_only=True` once per
configuration (each in a fresh process, since the fake device count is fixed when JAX starts) and prints a
markdown table of the per-device figures (see lens_jax/train/compile_only.py).

  python tools/compile_only.py                                   # stage1 + stage2, 8 and 64 devices
  python tools/compile_only.py --variants=stage1 --plans='8:(-1,1,1);8:(1,-1,1);64:(1,-1,1)'
  python tools/compile_only.py --plans='128:(1,-1,1)/(16,1,1)' --remat=full,dots_no_batch
  python tools/compile_only.py --set=config.grad_accum_steps=2 --set=config.data.features=online

A plan is DEVICES:MESH_SHAPE[/DCN_SHAPE]. Each run also writes WORKDIR/<name>/compile_only.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLANS = "8:(-1,1,1);8:(1,-1,1);64:(1,-1,1);128:(1,-1,1)/(16,1,1)"


def run_one(variant, devices, mesh, dcn, remat, extra, workdir, timeout):
    cfg = f"experiments/pretrain.py:{variant}"
    args = [sys.executable, "-m", "lens_jax.main", f"--config={cfg}", "--config.compile_only=True",
            f"--config.compile_only_devices={devices}", f"--config.mesh.shape={mesh}",
            f"--workdir={workdir}"]
    if dcn:
        args.append(f"--config.mesh.dcn_shape={dcn}")
    if remat:
        args.append(f"--config.model.remat_policy={remat}")
    args += [f"--{e}" if not e.startswith("--") else e for e in extra]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    path = os.path.join(workdir, "compile_only.json")
    if r.returncode != 0 or not os.path.exists(path):
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return None, " | ".join(tail)
    with open(path) as f:
        return json.load(f), r.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="stage1,stage2")
    p.add_argument("--plans", default=DEFAULT_PLANS, help="';'-separated DEVICES:MESH[/DCN]")
    p.add_argument("--remat", default="", help="comma-separated remat policies (default: the config's)")
    p.add_argument("--set", action="append", default=[], help="extra override, e.g. config.grad_accum_steps=2")
    p.add_argument("--workdir", default="")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--verbose", action="store_true", help="print each run's full report")
    args = p.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="compile_only_")
    rows = []
    print("| stage | devices | mesh (data, fsdp, tensor) | remat | params | opt | EMA | batch | temp | "
          "total / device | fits 80 GB | TFLOP / device / step | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for plan in args.plans.split(";"):
            devices, shape = plan.split(":", 1)
            mesh, _, dcn = shape.partition("/")
            for remat in (args.remat.split(",") if args.remat else [""]):
                name = f"{variant}_{devices}_{mesh}_{dcn}_{remat}".replace("(", "").replace(")", "").replace(",", "x")
                wd = os.path.join(root, name)
                r, out = run_one(variant, int(devices), mesh, dcn, remat, args.set, wd, args.timeout)
                if r is None:
                    print(f"| {variant} | {devices} | {mesh} {dcn} | {remat or '-'} | failed: {out[:300]} |")
                    continue
                if args.verbose:
                    print(out, file=sys.stderr)
                rows.append(r)
                m = r["mesh"]
                ma = r["memory_analysis"]
                print(f"| {variant} | {devices} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['remat_policy']} | "
                      f"{r['params_gib']:.2f} | {r['opt_state_gib']:.2f} | {r['ema_gib']:.2f} | {r['batch_gib']:.2f} | "
                      f"{ma.get('temp_size_in_bytes', 0):.2f} | **{r['total_gib']:.2f} GiB** | "
                      f"{'yes' if r['fits_80gb'] else 'no'} | {r['tflop_per_device_step']:.0f} | {r['compile_s']} |",
                      flush=True)
    print(f"\n(GiB per device; JSON reports under {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
