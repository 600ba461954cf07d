"""Compile-only memory planning (JAX_STYLE rule 7): lower and compile the full-scale train step for a mesh of
fake CPU devices, without data or any allocation, and report per-device memory and FLOPs.

    python -m lens_jax.main --config=experiments/pretrain.py --config.compile_only=True \
        --config.compile_only_devices=64 --config.mesh.shape='(-1,8,1)' --workdir=runs/plan
    python -m lens_jax.main --config=experiments/pretrain.py:stage2 --config.compile_only=True
    python tools/compile_only.py --devices=8,64 --variants=stage1,stage2      # several configs, one table

`compile_only_devices=0` compiles for the machine's real devices instead (e.g. one GPU, mesh (1, 1, 1), cuDNN
attention kept), to check the CPU estimate of activation memory against the GPU compiler.

The device count: JAX must see `compile_only_devices` CPU devices, and that can only be set before its backend
starts. `lens_jax.main` therefore calls `setup_fake_devices` first thing when `--config.compile_only=True`
(it sets `jax_platforms=cpu` and `jax_num_cpu_devices`, the in-process equivalent of
XLA_FLAGS=--xla_force_host_platform_device_count=N); if something already started the backend with another
count it raises and says so. `tools/compile_only.py` runs every configuration in its own process.

What is compiled: the pretraining step the real run uses -- `phases.pretrain.pretrain_state` (the 'dit' net with
the config's preset, remat policy, dtypes, optimiser and policy, EMA; with online encoding the frozen 'vae' and
'text_encoder' nets) through `trainer.jit_step` (the state's and batches' shardings, `donate_argnums=(0,)`), on
abstract inputs (the TrainSpec's abstract state and ShapeDtypeStructs):
  * stage 1 (`data.buckets=''`): one micro-batch of per_device_batch[0] x data-parallel images of
    (resolution/16)^2 tokens;
  * stage 2 (`'lens27'`): one micro-batch per base area (24/10/6 per device) padded to the area's largest
    bucket (1064, 2400, 4232 tokens) with an image mask, accumulated in one step;
  * text: `compile_only_text_len` tokens, default text_encoder.max_length - txt_offset = 512 - 97 = 415, of
    4 x 2880 = 11520 features (in the model's compute dtype).

CPU caveats (printed with the figures): XLA:CPU has no cuDNN flash attention, so the 'cudnn' kernel is
replaced by 'xla', which materialises the [B, heads, T, T] score matrix; the CPU compiler's buffer
assignment, fusion and bf16 handling differ from the GPU compiler's. The parameter / optimiser / EMA bytes
per device are exact (shard shapes), per net; activation (temp) memory is an estimate of what a GPU needs.
With `config.optim.policy` freezing part of the DiT (e.g. `(("proj_out.*", 1.0), (".*", None))`) the frozen
leaves carry no optimiser state or EMA, which the per-net figures show.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

GIB = 1024 ** 3
GPU_BYTES = 80e9          # an "80 GB" A100/H100 (74.5 GiB), the conservative budget


def setup_fake_devices(num_devices: int) -> None:
    """Makes JAX use `num_devices` fake CPU devices. Must run before anything starts the JAX backend."""
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and len(jax.devices()) >= num_devices:
            return
        raise RuntimeError(
            f"compile_only needs {num_devices} CPU devices but JAX already started with "
            f"{len(jax.devices())} {jax.default_backend()} device(s); start a fresh process "
            f"(python -m lens_jax.main ... --config.compile_only=True, or tools/compile_only.py) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} JAX_PLATFORMS=cpu before Python starts")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(num_devices))


def micro_batch_shapes(config, dp: int) -> List[Dict[str, Any]]:
    """[{per_device, global, tokens, height, width, padded}] per micro-batch of one step."""
    from lens_jax.data.buckets import bucket_table
    d = config.data
    table = bucket_table(d.buckets, d.resolution)
    per_device = tuple(d.per_device_batch)
    if len(per_device) < table.num_areas:
        raise ValueError(f"config.data.per_device_batch={per_device} has fewer entries than the "
                         f"{table.num_areas} base areas of buckets={d.buckets!r}")
    out = []
    for a in range(table.num_areas):
        n = table.max_tokens(a)
        w, h = max(table.buckets[a], key=lambda wh: (wh[0] // 16) * (wh[1] // 16))
        out.append(dict(area=table.sides[a], per_device=per_device[a], global_batch=per_device[a] * dp,
                        tokens=n, width=w, height=h, padded=len(table.buckets[a]) > 1))
    return out


def _text_len(config) -> int:
    n = int(config.get("compile_only_text_len", 0) or 0)
    if n > 0:
        return n
    te = config.text_encoder
    offset = te.txt_offset if te.txt_offset >= 0 else 97
    return int(te.max_length) - int(offset)


def run(config, workdir: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Lowers and compiles the config's train step on fake devices; prints and returns the figures."""
    n_dev = int(config.get("compile_only_devices", 8))
    if n_dev > 0:
        setup_fake_devices(n_dev)

    import jax
    import jax.numpy as jnp

    from lens_jax import build
    from lens_jax.configs.base import dtype_of
    from lens_jax.models import attention as attention_lib
    from lens_jax.models.flops import forward_flops
    from lens_jax.models.mmdit import dummy_inputs
    from lens_jax.phases.pretrain import pretrain_state
    from lens_jax.train import sharding as sharding_lib
    from lens_jax.train.state import bytes_per_device
    from lens_jax.train.trainer import jit_step

    devices = jax.devices()
    if n_dev <= 0:                     # compile_only_devices=0: this machine's own devices (e.g. one GPU)
        n_dev = len(devices)
    if len(devices) < n_dev:
        raise RuntimeError(f"compile_only_devices={n_dev} but JAX sees {len(devices)} devices")
    devices = devices[:n_dev]
    sharding_lib.validate_parallel_config(config)
    mesh = sharding_lib.mesh_from_config(config, devices, simulate_granules=True)
    m = config.model
    attention = m.attention
    notes = []
    if attention == "cudnn" and jax.default_backend() != "gpu":
        attention = "xla"
        notes.append("attention 'cudnn' -> 'xla' on CPU: the [B, heads, T, T] scores are materialised "
                     "(cuDNN flash attention on GPU keeps them in SRAM)")
    attention_lib.get_attention(attention)
    model = build.build_dit(config, attention=attention)
    cfg = model.config
    dtype = dtype_of(m.dtype)

    t0 = time.time()
    dp = sharding_lib.data_parallel_size(mesh)
    shapes = micro_batch_shapes(config, dp) if config.phase != "rl" else []
    s_txt = _text_len(config)
    feat = cfg.num_text_layers * cfg.text_dim
    online = config.data.get("features", "cached") == "online"
    k_accum = int(config.get("grad_accum_steps", 1))

    def sds(shape, dt, s):
        return jax.ShapeDtypeStruct(shape, dt, sharding=s)

    def bsh(ndim):
        return sharding_lib.batch_sharding(mesh, ndim)

    rl = distill = None
    if config.phase == "rl":
        rl = _rl_plan(config, model, mesh, dp, s_txt, feat, dtype, sds, bsh)
        shapes, batches, online = rl["shapes"], [rl["batch"]], False
    elif config.phase == "distill":
        distill = _distill_plan(config, model, shapes)
        shapes = distill["shapes"]
        batches = [_pretrain_batch(config, cfg, sh, s_txt, feat, dtype, False, sds, bsh) for sh in shapes]
        online = False
    else:
        batches = [_pretrain_batch(config, cfg, sh, s_txt, feat, dtype, online, sds, bsh) for sh in shapes]
    batch_arg = batches[0] if len(batches) == 1 else tuple(batches)
    if len(batches) > 1 and k_accum > 1:
        raise ValueError("grad_accum_steps > 1 with several base areas: the areas are already micro-batches")

    encoding = None
    if online:
        from lens_jax.models.gpt_oss import gpt_oss_config
        from lens_jax.models.vae import vae_config
        encoding = build.online_encoding(config, vae_config(config.vae.preset),
                                         gpt_oss_config(config.text_encoder.preset), _offset(config), batches[0],
                                         load=False)
    if rl is not None:
        spec, objectives, rules = rl["spec"], rl["objectives"], rl["rules"]
    elif distill is not None:
        spec, objectives, rules = distill["spec"], distill["objectives"], distill["rules"]
    else:
        spec, objectives, rules = pretrain_state(config, model, dummy_inputs(cfg), encoding)
    abstract, _ = spec.abstract(mesh)
    jitted, _ = jit_step(spec, objectives, mesh, sharding_lib.batch_shardings(mesh, batch_arg),
                         grad_accum_steps=k_accum, rules=rules)
    with jax.set_mesh(mesh):
        lowered = jitted.lower(abstract, batch_arg)
        t_lower = time.time() - t0
        t1 = time.time()
        compiled = lowered.compile()
        t_compile = time.time() - t1

    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "host_temp_size_in_bytes")
    ma = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
    total = (ma.get("argument_size_in_bytes", 0) + ma.get("output_size_in_bytes", 0)
             - ma.get("alias_size_in_bytes", 0) + ma.get("temp_size_in_bytes", 0)
             + ma.get("generated_code_size_in_bytes", 0))
    xla_flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops")) if ca and ca.get("flops") is not None else None
    except Exception:  # backend-dependent
        pass
    remat_factor = 4.0 if m.remat_policy == "full" else 3.0
    if rl is not None:
        remat_factor = rl["forward_factor"](remat_factor)
    if distill is not None:
        remat_factor = distill["forward_factor"](remat_factor)
    # per_device_batch is per data-parallel rank: with tensor > 1 the tensor group shares those examples.
    fwd = sum(forward_flops(cfg, sh["per_device"], sh["tokens"], s_txt) for sh in shapes)
    per_net = bytes_per_device(abstract)
    batch_bytes = sharding_lib.shard_bytes(jax.tree.leaves(batch_arg), [x.sharding for x in jax.tree.leaves(batch_arg)])
    total_of = lambda key: sum(v[key] for v in per_net.values()) / GIB  # noqa: E731
    report = dict(
        experiment=config.get("name", ""), preset=m.preset, devices=n_dev, mesh=dict(mesh.shape),
        remat_policy=m.remat_policy, attention=attention, dtype=m.dtype, param_dtype=m.param_dtype,
        ema=config.ema_decay > 0, grad_accum_steps=k_accum, features="online" if online else "cached",
        policy=[list(p) for p in config.optim.get("policy", ()) or ()],
        micro_batches=[dict(area=s["area"], per_device=s["per_device"], global_batch=s["global_batch"],
                            image_tokens=s["tokens"], text_tokens=s_txt) for s in shapes],
        nets={n: {k: v / GIB for k, v in b.items()} for n, b in per_net.items()},
        params_gib=total_of("params"), opt_state_gib=total_of("opt_state"), ema_gib=total_of("ema"),
        batch_gib=batch_bytes / GIB, memory_analysis={k: v / GIB for k, v in ma.items()}, total_gib=total / GIB,
        fits_80gb=bool(total <= GPU_BYTES),
        tflop_per_device_step=fwd * remat_factor * dp / n_dev / 1e12, tflop_global_step=fwd * remat_factor * dp / 1e12,
        xla_tflop=None if xla_flops is None else xla_flops / 1e12,
        lower_s=round(t_lower, 1), compile_s=round(t_compile, 1), backend=jax.default_backend(),
        jax_version=jax.__version__, notes=notes, forward_factor=remat_factor)
    if rl is not None:
        report["rl"] = _rl_rollout_report(config, model, mesh, abstract, rl, s_txt, feat, dtype, sds, bsh, total)
    log(format_report(report))
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "compile_only.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def _pretrain_batch(config, cfg, sh, s_txt, feat, dtype, online, sds, bsh) -> Dict[str, Any]:
    """The abstract pretraining micro-batch of one base area (`micro_batch_shapes` entry `sh`)."""
    import jax.numpy as jnp
    b, n = sh["global_batch"], sh["tokens"]
    if online:
        pix = jnp.uint8 if config.data.get("pixel_dtype", "float32") == "uint8" else jnp.float32
        return dict(pixels=sds((b, sh["height"], sh["width"], 3), pix, bsh(4)),
                    input_ids=sds((b, s_txt + _offset(config)), jnp.int32, bsh(2)),
                    attention_mask=sds((b, s_txt + _offset(config)), jnp.bool_, bsh(2)))
    mb = dict(img=sds((b, n, cfg.in_channels), jnp.float32, bsh(3)), img_pos=sds((b, n, 3), jnp.int32, bsh(3)),
              txt=sds((b, s_txt, feat), dtype, bsh(3)), txt_mask=sds((b, s_txt), jnp.bool_, bsh(2)))
    if sh["padded"]:
        mb["img_mask"] = sds((b, n), jnp.bool_, bsh(2))
    return mb


def _rl_plan(config, model, mesh, dp, s_txt, feat, dtype, sds, bsh) -> Dict[str, Any]:
    """The RL train state (posttrain.rollouts.rl_state: adapters on the frozen base, the old policy as their EMA)
    and one step's abstract batch: prompts_per_step x images_per_prompt rollouts, padded to the rollout
    buckets' largest token count with an image mask when there are several."""
    import jax.numpy as jnp
    from lens_jax import build
    from lens_jax.phases.rl import _without_lora
    from lens_jax.posttrain.rollouts import rl_state, rollout_buckets
    r = config.rl
    nft = r.algorithm == "nft"
    buckets, side = rollout_buckets(config)
    n = max((w // 16) * (h // 16) for w, h in buckets)
    b = int(r.prompts_per_step) * int(r.images_per_prompt)
    if b % dp:
        raise ValueError(f"{b} rollouts per step do not divide over {dp} data-parallel devices")
    c = model.config.in_channels
    batch = dict(img_pos=sds((b, n, 3), jnp.int32, bsh(3)), txt=sds((b, s_txt, feat), dtype, bsh(3)),
                 txt_mask=sds((b, s_txt), jnp.bool_, bsh(2)), weight=sds((b,), jnp.float32, bsh(1)))
    steps = int(r.rollout_steps)
    if nft:
        batch.update(x0=sds((b, n, c), jnp.float32, bsh(3)), r=sds((b,), jnp.float32, bsh(1)))
    else:
        batch.update(x=sds((b, steps - 1, n, c), jnp.float32, bsh(4)),
                     x_next=sds((b, steps - 1, n, c), jnp.float32, bsh(4)),
                     log_prob=sds((b, steps - 1), jnp.float32, bsh(2)), adv=sds((b,), jnp.float32, bsh(1)))
    if len(buckets) > 1:
        batch["img_mask"] = sds((b, n), jnp.bool_, bsh(2))
    plain = build.build_dit(_without_lora(config), attention=model.attention)
    spec, objectives, rules, _ = rl_state(config, model, plain)
    kl = float(config.nft.kl_weight if nft else config.grpo.kl_weight) > 0
    w, h = max(buckets, key=lambda wh: (wh[0] // 16) * (wh[1] // 16))
    shapes = [dict(area=side, per_device=b // dp, global_batch=b, tokens=n, width=w, height=h,
                   padded=len(buckets) > 1)]
    # Forwards per rollout per update, from the policy's forward+backward(+recompute) factor f: NFT f + the old
    # policy's forward + the reference's (KL > 0); GRPO (f + reference) for each of the T - 1 recorded steps.
    if nft:
        factor = lambda f: f + 1.0 + kl  # noqa: E731
    else:
        factor = lambda f: (steps - 1) * (f + kl)  # noqa: E731
    return dict(spec=spec, objectives=objectives, rules=rules, batch=batch, shapes=shapes, forward_factor=factor,
                plain=plain, buckets=buckets, side=side, rollouts=b, tokens=n, nft=nft)


def _distill_plan(config, model, shapes) -> Dict[str, Any]:
    """The distill train state (phases.distill.distill_state: student, fake score, discriminator head, frozen
    teacher) and its micro-batches: the base areas config.data.area_mixture draws (all when empty)."""
    from lens_jax.models.mmdit import dummy_inputs
    from lens_jax.phases.distill import discriminator, distill_state, student_sigmas
    weights = tuple(config.data.area_mixture) or (1.0,) * len(shapes)
    drawn = [sh for sh, w in zip(shapes, weights) if w > 0]
    spec, objectives, rules = distill_state(config, model, discriminator(config, model), dummy_inputs(model.config),
                                            student_sigmas(config))
    d = config.distill
    k, ttur = int(d.student_steps), int(d.ttur)
    # Forwards per example per step from the trained forward+backward(+recompute) factor f: each critic update
    # K student forwards (its sample), the fake score's f, the teacher on real / fake / perturbed real (3); the
    # student update K - 1 simulated forwards and its f, teacher and fake score at t1 (2), the CFG teacher at t2
    # (2) and the adversarial teacher pass with an input gradient (f - 1).
    factor = lambda f: ttur * (k + f + 3) + (k - 1) + f + 4 + (f - 1)  # noqa: E731
    return dict(spec=spec, objectives=objectives, rules=rules, shapes=drawn, forward_factor=factor)


def _rl_rollout_report(config, model, mesh, abstract, rl, s_txt, feat, dtype, sds, bsh, train_total):
    """Compiles one rollout (the ODE / SDE loop of diffusion/rollout.py over the merged plain DiT) for the
    step's rollout batch and reports its memory beside the train step's."""
    import jax
    import jax.numpy as jnp
    from lens_jax.diffusion import rollout as R
    from lens_jax.diffusion.sampler import make_model_fn
    from lens_jax.diffusion.schedules import sampling_sigmas
    from lens_jax.models.flops import forward_flops
    from lens_jax.train.state import bytes_per_device
    r = config.rl
    b, n = int(r.rollout_batch) or rl["rollouts"], rl["tokens"]
    if rl["rollouts"] % b:
        raise ValueError(f"config.rl.rollout_batch={b} does not divide the {rl['rollouts']} rollouts per step")
    c = model.config.in_channels
    from lens_jax.models import lora as lora_lib
    dit = abstract["nets"]["dit"]["params"]
    base_abs = lora_lib.split(dit)[0] if lora_lib.has_lora(dit) else dit     # the merged DiT has its shapes
    sig = sampling_sigmas((rl["side"] // 16) ** 2, int(r.rollout_steps))
    g = float(r.rollout_guidance)
    x = sds((b, n, c), jnp.float32, bsh(3))
    txt = sds((b, s_txt, feat), dtype, bsh(3))
    tmask = sds((b, s_txt), jnp.bool_, bsh(2))
    pos = sds((b, n, 3), jnp.int32, bsh(3))
    imask = sds((b, n), jnp.bool_, bsh(2)) if len(rl["buckets"]) > 1 else None
    fn = make_model_fn(rl["plain"], base_abs)
    static_fn, _ = R._split_model_fn(fn)
    use_cfg = g != 1.0
    if use_cfg:                     # the [cond; uncond] batch the loop sees
        txt2 = sds((2 * b, s_txt, feat), dtype, bsh(3))
        tmask2, pos2 = sds((2 * b, s_txt), jnp.bool_, bsh(2)), sds((2 * b, n, 3), jnp.int32, bsh(3))
        imask2 = None if imask is None else sds((2 * b, n), jnp.bool_, bsh(2))
    else:
        txt2, tmask2, pos2, imask2 = txt, tmask, pos, imask
    from lens_jax.train.step import rules_context
    t0 = time.time()
    with jax.set_mesh(mesh), rules_context(rl["rules"]):
        if rl["nft"]:
            coefs = jnp.asarray(R.dpm2_coefficients(sig))
            lowered = R._ode_loop.lower(static_fn, r.solver, use_cfg, base_abs, x, jnp.asarray(sig, jnp.float32),
                                        coefs, txt2, tmask2, pos2, imask2, jnp.float32(g))
        else:
            co = {k: jnp.asarray(v) for k, v in R.sde_coefficients(sig, float(config.grpo.noise_level)).items()
                  if k in ("cx", "cv", "std", "sigma")}
            lowered = R._sde_loop.lower(static_fn, use_cfg, base_abs, x, jax.random.key(0), co,
                                        (jnp.float32(sig[-2]), jnp.float32(sig[-1])), txt2, tmask2, pos2, imask2,
                                        jnp.float32(g))
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    ma = {f: int(getattr(mem, f, 0) or 0) for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                                   "alias_size_in_bytes", "temp_size_in_bytes")} if mem else {}
    per_net = bytes_per_device(abstract)
    resident = sum(sum(v.values()) for v in per_net.values())       # the train state stays on the devices
    merged = ma.get("argument_size_in_bytes", 0)                     # merged plain DiT + noise + text
    peak = resident + merged + ma.get("output_size_in_bytes", 0) + ma.get("temp_size_in_bytes", 0)
    calls = int(r.rollout_steps) * (2 if r.solver == "heun" and rl["nft"] else 1)
    dp = rl["rollouts"] // rl["shapes"][0]["per_device"]
    fwd = forward_flops(model.config, (2 if use_cfg else 1) * rl["rollouts"] // dp, n, s_txt) * calls
    return dict(rollouts=rl["rollouts"], per_call=b, tokens=n, buckets=[f"{w}x{h}" for w, h in rl["buckets"]],
                steps=int(r.rollout_steps),
                solver=r.solver if rl["nft"] else "sde", guidance=g,
                memory_analysis={k: v / GIB for k, v in ma.items()}, state_resident_gib=resident / GIB,
                peak_gib=peak / GIB, fits_80gb=bool(peak <= GPU_BYTES), train_total_gib=train_total / GIB,
                tflop_per_device=fwd / 1e12, compile_s=round(time.time() - t0, 1))


def _offset(config) -> int:
    te = config.text_encoder
    return int(te.txt_offset if te.txt_offset >= 0 else 97)


def format_report(r: Dict[str, Any]) -> str:
    ma = r["memory_analysis"]
    mb = ", ".join(f"{x['per_device']}x({x['image_tokens']}+{x['text_tokens']} tok)" for x in r["micro_batches"])
    lines = [
        f"compile_only: {r['experiment']} preset {r['preset']} on {r['devices']} fake {r['backend']} devices, "
        f"mesh {r['mesh']}, remat {r['remat_policy']}, attention {r['attention']}, {r['dtype']} compute / "
        f"{r['param_dtype']} params, EMA {r['ema']}, features {r['features']}, grad_accum {r['grad_accum_steps']}",
        f"  micro-batches per data-parallel rank: {mb}",
        f"  per device: params {r['params_gib']:.2f} GiB, optimiser {r['opt_state_gib']:.2f} GiB, "
        f"EMA {r['ema_gib']:.2f} GiB, batch {r['batch_gib']:.2f} GiB"
        + (f"; optimiser policy {r['policy']}" if r["policy"] else ""),
        "  per net (GiB per device): " + "; ".join(
            f"{n} params {b['params']:.3f} / optimiser {b['opt_state']:.3f} / EMA {b['ema']:.3f}"
            for n, b in r["nets"].items()),
        "  memory_analysis per device (GiB): " + ", ".join(
            f"{k.replace('_size_in_bytes', '')} {v:.2f}" for k, v in ma.items()),
        f"  total (argument + output - alias + temp + code): {r['total_gib']:.2f} GiB per device -> "
        f"{'fits' if r['fits_80gb'] else 'does NOT fit'} an 80 GB GPU (74.5 GiB)",
        f"  FLOPs per step: {r['tflop_per_device_step']:.1f} TFLOP per device, {r['tflop_global_step']:.1f} TFLOP "
        f"global (analytic matmuls, x{r.get('forward_factor', 4):g} forward); XLA cost analysis "
        f"{'n/a' if r['xla_tflop'] is None else format(r['xla_tflop'], '.2f')} TFLOP (counts a scanned body once)",
        f"  lower {r['lower_s']} s, compile {r['compile_s']} s (jax {r['jax_version']})",
    ]
    if "rl" in r:
        q = r["rl"]
        lines.append(
            f"  rollout ({q['solver']}, {q['steps']} steps, guidance {q['guidance']:g}): {q['rollouts']} images of "
            f"up to {q['tokens']} tokens ({len(q['buckets'])} buckets), {q['per_call']} per sampler call; memory_analysis "
            "per device (GiB): "
            + ", ".join(f"{k.replace('_size_in_bytes', '')} {v:.2f}" for k, v in q["memory_analysis"].items())
            + f"; with the resident train state {q['state_resident_gib']:.2f} GiB: peak {q['peak_gib']:.2f} GiB -> "
            f"{'fits' if q['fits_80gb'] else 'does NOT fit'} an 80 GB GPU; {q['tflop_per_device']:.1f} TFLOP per "
            f"device per step's rollouts")
    lines += [f"  note: {n}" for n in r["notes"]]
    if r["backend"] == "cpu":
        lines.append("  note: CPU memory_analysis is an estimate of GPU memory (different compiler, buffer "
                     "assignment and fusion); parameter/optimiser/EMA figures are exact")
    return "\n".join(lines)
