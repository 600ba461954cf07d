"""The `rl` phase: DiffusionNFT (or Flow-GRPO) post-training of the DiT with rubric rewards (LENS_SPEC §8).

Per step the rollout source (posttrain/rollouts.py) draws config.rl.prompts_per_step prompts, samples
config.rl.images_per_prompt images of each from the rollout policy (NFT: the old policy 'dit.ema', a
deterministic ODE, CFG-free by default; GRPO: the current policy through the SDE with log-probs), decodes
them, has the judge (config.judge) answer every rubric of the prompt for every image, maps the rewards to
group-relative weights (NFT) or advantages (GRPO) and hands the batch to the trainer's jitted step. The
trainer owns the loop, checkpoints (adapters, optimiser, old policy) and resume.

Writes into the workdir:
  metrics.jsonl / tensorboard/   losses, KL, reward mean/std, per-rubric pass rates (pass/...),
                                 zero_std_ratio, judge counts, rollout images/s
  rollouts/step_XXXXXX.png       a rollout grid (a row per prompt, its judged rewards in rollouts/*.txt)
  eval_before/, eval/            ShapesEval (GenEval protocol) of the start and the end (config.eval.enabled)
  rl_prompts.jsonl               the prompt set used (generated from config.rl.taxonomy when rl.prompts is '')
  checkpoints/, config.json

The DiT: config.lora.rank > 0 trains low-rank adapters (the base frozen, no optimiser state; the reference
policy of the KL term is the base with adapters off); rank 0 fine-tunes every weight against a frozen 'ref'
copy. tools/merge_lora.py writes the merged DiT for `sample` / `eval` / the official-layout exporter.
"""
from __future__ import annotations

import copy
import os
import sys
import time

import jax

from lens_jax import build, phases
from lens_jax.configs.base import ConfigError, validate_common, validate_trainer
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.loop import LoopOptions
from lens_jax.train.optim import validate_optim

ALGORITHMS = ("nft", "grpo")


def validate(config) -> None:
    validate_common(config)
    r = config.rl
    if r.algorithm not in ALGORITHMS:
        raise ConfigError(f"config.rl.algorithm={r.algorithm!r}; choose one of {ALGORITHMS}")
    for k in ("prompts_per_step", "images_per_prompt", "rollout_steps"):
        if int(r[k]) < (2 if k == "images_per_prompt" else 1):
            raise ConfigError(f"config.rl.{k}={r[k]} is too small")
    if not config.init_from:
        raise ConfigError("config.init_from is empty: set it to a pretrain workdir or converted Lens-Base weights")
    if not os.path.exists(config.init_from):
        raise ConfigError(f"config.init_from={config.init_from} does not exist")
    if not r.prompts and not r.taxonomy:
        raise ConfigError("set config.rl.prompts (a prompt JSONL, tools/make_rl_prompts.py) or config.rl.taxonomy")
    if config.judge.kind not in ("rule", "api"):
        raise ConfigError(f"config.judge.kind={config.judge.kind!r}; choose 'rule' or 'api'")
    if config.judge.kind == "api" and not (config.judge.base_url and config.judge.model):
        raise ConfigError("config.judge.kind='api' needs config.judge.base_url and config.judge.model")
    validate_trainer(config)
    validate_optim(config.optim)


def prompt_set(config, workdir: str, world, say):
    """The RL prompt records, checked disjoint from every evaluation prompt set."""
    from lens_jax.posttrain import prompts as P
    r = config.rl
    path = r.prompts
    if not path:
        from lens_jax.posttrain.shapes_prompts import write_shapes_prompts
        path = os.path.join(workdir, "rl_prompts.jsonl")
        summary = write_shapes_prompts(build.resolve_path(r.taxonomy, "config.rl.taxonomy"), path, seed=config.seed,
                                       limit=int(r.num_prompts), world=world)
        say(f"RL prompts: {summary['written']} from {r.taxonomy} {summary['per_category']} -> {path}")
    records = P.load_rl_prompts(build.resolve_path(path, "config.rl.prompts"), add_global=bool(r.global_rubric))
    eval_sets = P.shapes_eval_sets(world) if config.data.get("source", "") == "shapes" else []
    files = [f for f in ([config.eval.get("metadata_file", "")] + list(r.disjoint_from)) if f]
    eval_sets += [P.metadata_file_set(build.resolve_path(f, "config.rl.disjoint_from")) for f in files]
    try:
        P.assert_disjoint(records, eval_sets)
    except ValueError as e:
        raise ConfigError(f"config.rl.prompts: {e}") from None
    say(f"RL prompts: {len(records)} {P.category_counts(records)}; disjoint from {len(eval_sets)} evaluation "
        f"set(s) ({sum(len(p) for _, p in eval_sets)} prompts)")
    return records


def make_judge(config):
    """The judge of config.judge: the in-process rule judge, or a VLM judge over an OpenAI-compatible API."""
    j = config.judge
    if j.kind == "rule":
        from lens_jax.posttrain.rewards import RuleJudge
        return RuleJudge()
    from lens_jax.posttrain.chat import ChatConfig, ChatService, JudgeUnavailableError
    from lens_jax.posttrain.vlm_judge import VLMJudge
    chat = ChatService(ChatConfig(base_url=j.base_url, model=j.model, api_key_env=j.api_key_env,
                                  timeout_s=float(j.timeout_s), max_retries=int(j.max_retries),
                                  backoff_s=float(j.backoff_s), concurrency=int(j.concurrency),
                                  cache_dir=j.cache_dir, progress=False))
    try:
        chat.check_reachable(timeout_s=float(j.timeout_s))
    except JudgeUnavailableError as e:
        chat.close()
        raise ConfigError(f"config.judge: {e}") from None
    return VLMJudge(chat)


def evaluate(config, model, params, enc, outdir: str, label: str, say):
    """ShapesEval of `params` (plain DiT weights) at every guidance of config.rl.eval_guidances."""
    from lens_jax.eval.geneval import evaluate_pipeline
    out = {}
    for g in config.rl.eval_guidances or (config.eval.guidance,):
        c = copy.deepcopy(config)
        c.eval.guidance = float(g)
        sub = outdir if len(config.rl.eval_guidances or ()) <= 1 else os.path.join(outdir, f"guidance_{g:g}")
        say(f"{label} (guidance {g:g}):")
        out[float(g)] = evaluate_pipeline(build.build_pipeline(model, params, enc), c, sub, source=label, log=say)
    return out


def run(config, workdir: str):
    from lens_jax.data.synthetic import world_config
    from lens_jax.posttrain.rollouts import RolloutSource, rl_state
    from lens_jax.train.trainer import fit

    validate(config)
    primary, say = phases.start(config, workdir)
    t0 = time.time()
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)                     # with adapters when config.lora.rank > 0
    plain = build.build_dit(_without_lora(config), enc)   # the same DiT without adapters
    mesh = sharding_lib.mesh_from_config(config)
    world = world_config(config.data.world, image_size=int(config.data.image_size), seed=int(config.seed))
    records = prompt_set(config, workdir, world, say)
    judge = make_judge(config)
    spec, objectives, rules, to_plain = rl_state(config, model, plain)
    say(f"RL ({config.rl.algorithm}): {config.rl.prompts_per_step} prompts x {config.rl.images_per_prompt} images per "
        f"step, {config.rl.rollout_steps} rollout steps ({config.rl.solver if config.rl.algorithm == 'nft' else 'sde'},"
        f" guidance {config.rl.rollout_guidance:g}), judge {config.judge.kind}; "
        + (f"LoRA rank {config.lora.rank} alpha {config.lora.alpha:g}" if build.lora_spec(config) else
           "full fine-tuning"))
    source = RolloutSource(config, workdir, spec, plain, to_plain, enc, records, judge, mesh, say=say, rules=rules)

    def on_start(start):
        source.attach(start.state, start.step)
        if start.step == 0 and config.eval.enabled and config.rl.eval_before and primary:
            evaluate(config, plain, to_plain(spec.eval_params(start.state, "dit")), enc,
                     os.path.join(workdir, "eval_before"), "before RL", say)

    batch_shardings = source.batch_shardings()
    options = LoopOptions(num_steps=config.num_steps, log_every=config.log_every,
                          max_nonfinite_steps=config.max_nonfinite_steps)
    try:
        result = fit(config, workdir, spec, objectives, lambda start: source, mesh=mesh,
                     batch_shardings=batch_shardings, options=options, rules=rules, on_start=on_start,
                     on_step=lambda s, st: source.attach(st, s), say=say, progress_label="rl step")
    finally:
        if hasattr(judge, "close"):
            judge.close()
    if result.loop.stopped:
        say(f"stopped at step {result.step} with a checkpoint: {result.loop.stopped}; rerun the same command to "
            "resume once the cause is fixed")
        sys.exit(3)
    if result.preempted:
        return result
    if config.eval.enabled and primary:
        final = to_plain(spec.eval_params(result.state, config.rl.eval_params))
        evaluate(config, plain, final, enc, os.path.join(workdir, "eval"), f"after RL ({config.rl.eval_params})", say)
    say(f"rl done in {time.time() - t0:.0f}s -> {workdir}")
    return result


def _without_lora(config):
    c = copy.deepcopy(config)
    if c.get("lora") is not None:
        c.lora.rank = 0
    return c
