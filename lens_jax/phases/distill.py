"""The `distill` phase: a few-step Turbo student from a teacher DiT (LENS_SPEC §10; lens_jax/posttrain/distill.py).

Nets of the one sharded train state: 'student' and 'fake' (both from config.init_from: a pretrain or RL workdir,
or converted lens_dit weights; an RL run's LoRA adapters are merged first), 'disc' (the head on teacher
features, fresh), 'teacher' (frozen, from config.distill.teacher, '' = config.init_from; not checkpointed). The
real images and captions come from config.data exactly as in pretraining (shapes world or shards through the
bucketed pipeline); with the shapes world, examples whose caption is one of the evaluation prompts are left out
(counted), so the student is evaluated on prompts it never distilled on.

Writes into the workdir:
  metrics.jsonl / tensorboard/   critic/{fake_loss, disc_loss, r1, d_real, d_fake, d_real_acc, d_fake_acc},
                                 student/{dm_loss, ca_loss, gen_adv_loss, g_dm_rms, g_ca_rms, n1, n2, d_student},
                                 grad / update / param norms and learning rates per net
  distill_curves.png             those curves against the step
  samples/step_XXXXXX.png        student samples at its K steps, guidance 1, every config.distill.sample_every
  eval/<run>/                    ShapesEval of the student (K steps, guidance 1: the Turbo setting; its EMA too when
                                 config.ema_decay > 0), the teacher at
                                 config.eval's steps and guidance, and the teacher at K steps with and without CFG
                                 (config.distill.eval_runs); eval/comparison.json and comparison.md side by side
  checkpoints/, config.json
"""
from __future__ import annotations

import copy
import json
import os
import re
import time

from lens_jax import build, phases
from lens_jax.configs.base import ConfigError
from lens_jax.train import distributed
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.optim import validate_optim

CURVES = (("discriminator logits", ("critic/d_real", "critic/d_fake", "student/d_student")),
          ("critic losses", ("critic/fake_loss", "critic/disc_loss", "critic/r1")),
          ("student losses", ("student/dm_loss", "student/ca_loss", "student/gen_adv_loss")),
          ("DMD steps (rms, x0 units)", ("student/g_dm_rms", "student/g_ca_rms", "student/n1", "student/n2")))
EVAL_RUNS = ("student", "student_ema", "teacher", "teacher_k_steps", "teacher_k_steps_cfg")


def validate(config) -> None:
    from lens_jax.phases import pretrain
    pretrain.validate(config)
    d = config.distill
    if config.data.get("features", "cached") != "cached":
        raise ConfigError("config.data.features must be 'cached' for distill (the teacher reads encoded latents)")
    try:
        ttur = int(d.ttur)
    except (TypeError, ValueError):
        raise ConfigError(f"config.distill.ttur={d.ttur!r} must be a positive integer") from None
    if ttur < 1 or ttur != d.ttur:
        raise ConfigError(f"config.distill.ttur={d.ttur}: the fake-score / discriminator updates per student update "
                          "must be a positive integer (the recipe: 4)")
    if int(d.student_steps) < 1:
        raise ConfigError(f"config.distill.student_steps={d.student_steps} must be >= 1")
    if not config.init_from:
        raise ConfigError("config.init_from is empty: set it to the RL or pretrain workdir (or converted lens_dit "
                          "weights) the student and fake score start from")
    for option, path in (("config.init_from", config.init_from), ("config.distill.teacher", d.teacher)):
        if path and not os.path.exists(path):
            raise ConfigError(f"{option}={path} does not exist")
    from lens_jax.models.mmdit import mmdit_config
    layers = mmdit_config(config.model.preset).num_layers
    fl = tuple(int(i) for i in d.feature_layers)
    if not fl or any(not 0 <= i < layers for i in fl) or len(set(fl)) != len(fl):
        raise ConfigError(f"config.distill.feature_layers={tuple(d.feature_layers)}: distinct teacher block indices "
                          f"in [0, {layers}) expected")
    bad = [r for r in d.eval_runs if r not in EVAL_RUNS]
    if bad:
        raise ConfigError(f"config.distill.eval_runs has {bad}; choose from {EVAL_RUNS}")
    validate_optim(config.disc_optim, "config.disc_optim")
    try:
        recipe(config, [1.0])
    except ValueError as e:
        raise ConfigError(f"config.distill: {e}") from None


def student_sigmas(config):
    """The student's K start levels: the sampler's K-step grid (config.distill.student_mu; < 0 = FLUX.2's empirical
    mu) at the base area's token count (shapes: data.image_size; shards: the largest base area drawn), without its
    final 0 -- the grid the Turbo preset samples on."""
    from lens_jax.diffusion.schedules import sampling_sigmas
    d = config.data
    if d.source == "shapes":
        side = int(d.image_size)
    else:
        from lens_jax.data.buckets import bucket_table
        sides = bucket_table(d.buckets, int(d.resolution)).sides
        weights = tuple(d.area_mixture) or (1.0,) * len(sides)
        side = max(s for s, w in zip(sides, weights) if w > 0)
    mu = None if config.distill.student_mu < 0 else float(config.distill.student_mu)
    return tuple(float(s) for s in sampling_sigmas((side // 16) ** 2, int(config.distill.student_steps), mu)[:-1])


def recipe(config, sigmas):
    from lens_jax.posttrain.distill import DistillConfig
    d = config.distill
    return DistillConfig(student_sigmas=tuple(sigmas), feature_layers=tuple(int(i) for i in d.feature_layers),
                         guidance=float(d.guidance), lambda_d=float(d.lambda_d), lambda_g=float(d.lambda_g),
                         r1_gamma=float(d.r1_gamma), r1_alpha=float(d.r1_alpha),
                         backward_simulation=bool(d.backward_simulation), cfg_rescale=bool(d.cfg_rescale),
                         normalise=bool(d.normalise),
                         t_dm=tuple(d.t_dm), t_ca=tuple(d.t_ca), t_fake=tuple(d.t_fake), t_adv=tuple(d.t_adv),
                         time_mu=float(d.time_mu), ida_mix=float(d.ida_mix),
                         sequential_teacher=bool(d.sequential_teacher))


def _run_config(path: str):
    """The config.json of the run at (or above) `path`, or None (converted weights, a bare checkpoint dir)."""
    import ml_collections
    p = os.path.abspath(path)
    for cand in (p, os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
        f = os.path.join(cand, "config.json")
        if os.path.exists(f) and os.path.isdir(os.path.join(cand, "checkpoints")):
            with open(f) as fh:
                return ml_collections.ConfigDict(json.load(fh))
    return None


def check_same_dit(config, path: str, option: str, run_config=None) -> None:
    """Raises ConfigError if the DiT saved at `path` (a run's config.json -- `run_config` when already read -- or a
    converted checkpoint's meta) is not the architecture of config.model."""
    from lens_jax.checkpoints import orbax_io
    from lens_jax.models.mmdit import mmdit_config
    mine = mmdit_config(config.model.preset)
    p = os.path.abspath(path)
    if os.path.exists(os.path.join(p, orbax_io.META_FILE)):
        theirs_preset = orbax_io.load_meta(p).get("preset")
    else:
        rc = run_config if run_config is not None else _run_config(p)
        if rc is None:
            return                   # a bare checkpoint: the restore's shape check reports a mismatch
        theirs_preset = rc.get("model", {}).get("preset")
    try:
        theirs = mmdit_config(theirs_preset)
    except ValueError:
        theirs = None
    if theirs != mine:
        raise ConfigError(f"{option}={path} holds a DiT of preset {theirs_preset!r}, but this run's student is "
                          f"config.model.preset={config.model.preset!r}: the teacher, student and fake score must be "
                          "one architecture (set config.model.preset to the checkpoint's)")


def dit_source(config, path: str, params: str, option: str, workdir: str, say):
    """(path, net, part) to load DiT weights from; an RL run with LoRA adapters is merged into
    WORKDIR/merged_<option>/ first (tools/merge_lora.py)."""
    rc = _run_config(path)
    check_same_dit(config, path, option, run_config=rc)
    choice = params or ("dit.ema" if rc is not None and float(rc.get("ema_decay", 0.0) or 0.0) > 0 else "dit")
    if rc is not None and rc.get("phase") == "rl" and int((rc.get("lora") or {}).get("rank", 0) or 0) > 0:
        out = os.path.join(workdir, "merged_" + re.sub(r"\W", "_", option.replace("config.", "")))
        if not os.path.exists(out):
            from lens_jax.posttrain.merge_lora import merge_run
            merge_run(path, out, params=choice, log=say)
        return out, "dit", "params"
    net, part = (choice[:-4], "ema") if choice.endswith(".ema") else (choice, "params")
    return path, net, part


def _loader(path, net, part, option, model):
    from lens_jax.train.checkpoints import CheckpointMismatchError
    from lens_jax.train.resume import weights_from
    inner = weights_from(path, net, option=option, part=part, kind="lens_dit", model_config=model.config)

    def load(abstract):
        try:
            return inner(abstract)
        except CheckpointMismatchError as e:
            raise ConfigError(f"{option}={path}: its DiT does not match the student's config.model: {e}") from None
    return load


def distill_state(config, model, disc_model, dummy, sigmas, loads=None):
    """(TrainSpec of student / fake / disc / teacher, [critic, student] objectives, rules). `loads`: {'init':
    Net.load, 'teacher': Net.load} (None: nothing loaded, e.g. compile_only)."""
    import jax.numpy as jnp

    from lens_jax.configs.base import dtype_of
    from lens_jax.posttrain.distill import distill_objectives
    from lens_jax.train.optim import make_optimizer
    from lens_jax.train.state import Net, TrainSpec
    loads = loads or {}
    rules = build.dit_rules(config)
    d = config.distill
    tx, schedule = make_optimizer(config.optim, config.num_steps)
    dtx, dschedule = make_optimizer(config.disc_optim, config.num_steps)
    init = lambda key: model.init(key, **dummy)["params"]  # noqa: E731
    b, n = dummy["img"].shape[:2]
    feats = [jnp.zeros((b, n, model.config.hidden), jnp.float32)] * len(d.feature_layers)
    disc_init = lambda key: disc_model.init(key, feats, jnp.zeros((b,), jnp.float32))["params"]  # noqa: E731
    nets = [Net("student", init=init, rules=rules, optimizer=tx, schedule=schedule, load=loads.get("init"),
                ema_decay=float(config.ema_decay)),
            Net("fake", init=init, rules=rules, optimizer=tx, schedule=schedule, load=loads.get("init")),
            Net("disc", init=disc_init, rules=rules, optimizer=dtx, schedule=dschedule),
            Net("teacher", init=init, rules=rules, load=loads.get("teacher"), checkpoint=False,
                dtype=dtype_of(d.teacher_dtype, "config.distill.teacher_dtype") if d.teacher_dtype else None)]
    objectives = distill_objectives(model, disc_model, recipe(config, sigmas), ttur=int(d.ttur), rules=rules)
    return TrainSpec(nets, seed=config.seed), objectives, rules


def discriminator(config, model):
    from lens_jax.posttrain.distill import FeatureDiscriminator
    return FeatureDiscriminator(num_features=len(config.distill.feature_layers), width=int(config.distill.disc_width))


def caption_key(text: str) -> str:
    """A caption or prompt compared by content: lowercase, punctuation, a leading 'a photo of' and a trailing
    'on a <colour> background' removed."""
    from lens_jax.posttrain.prompts import normalise_text
    return re.sub(r" on an? \w+ background$", "", normalise_text(text))


def without_eval_prompts(config, world, say):
    """cache -> cache without the examples whose caption is an evaluation prompt (counted and reported)."""
    from lens_jax.eval.geneval import evaluation_prompts

    def select(cache):
        import numpy as np
        if cache.captions is None:
            raise ConfigError("the shapes cache holds no captions, so the evaluation prompts cannot be left out")
        prompts, origin = evaluation_prompts(config, world)
        held = {caption_key(p["prompt"]) for p in prompts}
        keep = np.array([i for i, c in enumerate(cache.captions) if caption_key(c) not in held], np.int64)
        dropped = len(cache.captions) - len(keep)
        say(f"distillation data: {dropped} of {len(cache.captions)} examples left out because their caption is one of "
            f"the {len(held)} evaluation prompts ({origin}); {len(keep)} remain")
        if len(keep) < config.batch_size:
            raise ConfigError(f"only {len(keep)} distillation examples remain after leaving out the evaluation "
                              f"prompts; raise config.data.num_examples")
        return cache.subset(keep)
    return select


def evaluate_runs(config, model, spec, state, enc, workdir: str, say, exclude=()):
    """ShapesEval of config.distill.eval_runs into WORKDIR/eval/<run>/ and the side-by-side comparison."""
    from lens_jax.eval.geneval import evaluate_pipeline
    k = int(config.distill.student_steps)
    plans = {"student": ("student", k, 1.0), "student_ema": ("student.ema", k, 1.0), "teacher": ("teacher", int(config.eval.num_steps),
                                                          float(config.eval.guidance)),
             "teacher_k_steps": ("teacher", k, 1.0), "teacher_k_steps_cfg": ("teacher", k, float(config.eval.guidance))}
    rows = {}
    for name in config.distill.eval_runs:
        net, steps, guidance = plans[name]
        if net.endswith(".ema") and not config.ema_decay > 0:
            say(f"eval {name}: skipped (config.ema_decay is 0, so the student keeps no EMA)")
            continue
        c = copy.deepcopy(config)
        c.eval.num_steps, c.eval.guidance = steps, guidance
        if steps == k:              # K-step runs sample on the student's grid
            c.eval.mu = float(config.distill.student_mu)
        params = distributed.host_tree(spec.eval_params(state, net))
        t0 = time.time()
        say(f"eval {name}: {net}, {steps} steps, guidance {guidance:g}")
        s = evaluate_pipeline(build.build_pipeline(model, params, enc), c, os.path.join(workdir, "eval", name),
                              source=f"{net} ({name})", log=say, exclude_prompts=exclude)
        if s is not None:
            rows[name] = dict(net=net, steps=steps, guidance=guidance, overall=s["overall"], tasks=s["tasks"],
                              unseen=s.get("unseen"), integrity=s.get("integrity"), seconds=round(time.time() - t0, 1))
    if rows:
        with open(os.path.join(workdir, "eval", "comparison.json"), "w") as f:
            json.dump(rows, f, indent=2)
        table = comparison_table(rows)
        with open(os.path.join(workdir, "eval", "comparison.md"), "w") as f:
            f.write(table + "\n")
        say(table)
    return rows


def comparison_table(rows) -> str:
    tasks = sorted({t for r in rows.values() for t in r["tasks"]})
    head = "| run | net | steps | CFG | overall | " + " | ".join(tasks) + " | eval s |"
    lines = [head, "|" + "---|" * (6 + len(tasks))]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['net']} | {r['steps']} | {r['guidance']:g} | {r['overall']:.3f} | "
                     + " | ".join(f"{r['tasks'].get(t, float('nan')):.3f}" for t in tasks) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run(config, workdir: str):
    from lens_jax.data.synthetic import world_config
    from lens_jax.models.mmdit import dummy_inputs
    from lens_jax.phases.pretrain import sample_grid, training_data
    from lens_jax.train.loop import LoopOptions
    from lens_jax.train.metrics import plot_metrics
    from lens_jax.train.state import param_count
    from lens_jax.train.trainer import fit

    validate(config)
    primary, say = phases.start(config, workdir)
    t_start = time.time()
    d = config.distill
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)
    disc_model = discriminator(config, model)
    mesh = sharding_lib.mesh_from_config(config)
    sources = {"init": dit_source(config, config.init_from, d.init_params, "config.init_from", workdir, say),
               "teacher": dit_source(config, d.teacher or config.init_from, d.teacher_params,
                                     "config.distill.teacher", workdir, say)}
    loads = {k: _loader(p, net, part, "config.init_from" if k == "init" else "config.distill.teacher", model)
             for k, (p, net, part) in sources.items()}
    world = world_config(config.data.world, image_size=int(config.data.image_size), seed=int(config.seed))
    select = without_eval_prompts(config, world, say) if config.data.source == "shapes" and config.eval.enabled \
        else None
    if config.data.source == "shards":
        say("note: shard captions are not checked against the evaluation prompts (the shapes world's are)")
    data = training_data(config, enc, mesh, say, t_start, select=select)
    sigmas = student_sigmas(config)
    dummy = dummy_inputs(model.config, batch=1, h=data.grid[0], w=data.grid[1], text_len=data.n_txt)
    spec, objectives, rules = distill_state(config, model, disc_model, dummy, sigmas, loads)
    say(f"distill: student {d.student_steps} steps on sigmas {[round(s, 4) for s in sigmas]} "
        f"({'backward simulation' if d.backward_simulation else 'noised real latents'}), teacher CFG {d.guidance:g}, "
        f"TTUR {d.ttur}, IDA {d.ida_mix:g}, lambda_d {d.lambda_d:g}, lambda_g {d.lambda_g:g}, R1 gamma {d.r1_gamma:g} "
        f"alpha {d.r1_alpha:g}; discriminator on teacher blocks {tuple(d.feature_layers)}; student from "
        f"{sources['init'][0]} ({sources['init'][1]} {sources['init'][2]}), teacher from {sources['teacher'][0]} "
        f"({sources['teacher'][1]} {sources['teacher'][2]})")

    def on_start(start):
        say("nets: " + ", ".join(f"{n} {param_count(start.state, n):,}" for n in spec.names)
            + f" parameters; mesh {dict(mesh.shape)}")

    pipeline = build.build_pipeline(model, None, enc)
    turbo = copy.deepcopy(config)
    turbo.sample.num_steps, turbo.sample.guidance, turbo.sample.mu = int(d.student_steps), 1.0, float(d.student_mu)

    def on_step(step, state):
        if d.sample_every and step % d.sample_every == 0:
            params = distributed.host_tree(spec.eval_params(state, "student"))
            if primary:
                sample_grid(pipeline, turbo, params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))

    options = LoopOptions(num_steps=config.num_steps, log_every=config.log_every,
                          max_nonfinite_steps=config.max_nonfinite_steps)
    result = fit(config, workdir, spec, objectives, data.make_source, mesh=mesh, batch_shardings=data.batch_shardings,
                 jit_batch_shardings=data.jit_batch_shardings, options=options, rules=rules, on_step=on_step,
                 on_start=on_start, say=say, progress_label="distill step")
    if result.preempted:
        say(f"stopped by SIGTERM at step {result.step}; rerun the same command to resume")
        return dict(preempted=True, step=result.step)
    say(f"distillation done at step {result.step} in {time.time() - t_start:.0f}s")
    if primary:
        plot_metrics(workdir, CURVES, os.path.join(workdir, "distill_curves.png"))
    rows = {}
    if config.eval.enabled and primary:
        rows = evaluate_runs(config, model, spec, result.state, enc, workdir, say)
    say(f"total {time.time() - t_start:.0f}s -> {workdir}")
    return rows
