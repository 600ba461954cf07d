"""RL post-training (LENS_SPEC §8): DiffusionNFT with rubric rewards, or Flow-GRPO.

Variants:
  lens  the paper's recipe on Lens-Base: LoRA rank 64 / alpha 128, 48 prompts x 24 images per step, 180 steps,
        AdamW LR 3e-4 (weight decay 1e-4), NFT beta 1, KL 1e-4, old policy 'type1', CFG-free 10-step ODE
        rollouts at 1024² (9 aspect ratios), a VLM judge (GPT-4.1-mini class) over an OpenAI-compatible API:
          python -m lens_jax.main --config=experiments/rl.py:lens --config.init_from=/ckpt/lens_base \
              --config.rl.prompts=lens_rl.jsonl --config.judge.base_url=http://127.0.0.1:8000/v1 \
              --config.judge.model=Qwen2.5-VL-7B-Instruct --workdir=runs/rl_lens
  tiny  the CPU research loop: from the README main job's workdir (runs/tiny), prompts generated from
        data/rl/shapes_taxonomy.json (compositions ShapesEval never asks for), the rule judge in-process;
        ShapesEval before and after (RESULTS.md):
          python -m lens_jax.main --config=experiments/rl.py:tiny --config.init_from=runs/tiny --workdir=runs/rl_tiny
        the same through the VLM-judge path: start `python tools/serve_rule_judge.py --port 8011` and add
          --config.judge.kind=api --config.judge.base_url=http://127.0.0.1:8011/v1 --config.judge.model=rules
  grpo  tiny with Flow-GRPO (SDE rollouts with log-probs, clipped ratio, KL 0.04) at the same budget
"""
import ml_collections

from lens_jax.configs.base import load_experiment
from lens_jax.models.lora import DEFAULT_TARGETS

VARIANTS = ("lens", "tiny", "grpo")


def get_config(arg=None):
    from lens_jax.configs.base import parse_variant
    variant = parse_variant(arg, VARIANTS, "rl")
    c = load_experiment("pretrain", "stage1" if variant == "lens" else "tiny")
    c.phase = "rl"
    c.name = variant
    c.init_from = ""                 # Lens-Base: converted lens_dit weights, or a pretrain workdir
    c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=128.0, targets=DEFAULT_TARGETS))  # rank 0 = full FT
    c.optim.lr = 3e-4
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 1.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.num_steps = 180
    c.ema_decay = 0.0                # the NFT old policy is the EMA (nft.old_policy), not this
    c.rl = ml_collections.ConfigDict(dict(
        algorithm="nft",             # nft (DiffusionNFT) | grpo (Flow-GRPO)
        prompts="",                  # prompt/rubric JSONL (tools/make_rl_prompts.py); '' = generate from taxonomy
        taxonomy="",                 # shapes world: composition taxonomy for generated prompts
        num_prompts=0,               # generated prompts (0 = all), equal shares per category
        disjoint_from=(),            # more GenEval metadata files the prompts must not overlap
        global_rubric=True,          # append "Structural Integrity (Overall)" to every prompt's rubrics
        global_weight=1.0,           # its weight in the verdict mean
        gate_global=False,           # cap an image's reward at gate_cap when the global rubric fails
        gate_cap=0.0,
        balance_categories=False,    # equal shares of every step's prompts per category
        prompts_per_step=48,
        images_per_prompt=24,
        rollout_steps=10,
        rollout_batch=0,             # rollouts per sampler call (memory; divides the step's, over the devices); 0 = all
        solver="dpm2",               # NFT rollouts: dpm2 | heun | euler (diffusion/rollout.py)
        rollout_guidance=1.0,        # 1 = CFG-free
        rollout_mu=-1.0,             # sigma shift of the rollout grid; < 0 = FLUX.2 empirical mu
        init_params="dit.ema",       # which weights of a pretrain run start RL ('dit' or 'dit.ema')
        max_missing_frac=0.5,        # judge outage: more rollouts than this without any verdict ...
        judge_retries=3,             # ... re-judged this many times, judge_retry_wait_s apart, then the run
        judge_retry_wait_s=10.0,     # stops cleanly with a checkpoint
        grid_every=10,               # rollout grid PNG every N steps (0 = never)
        eval_before=True,            # ShapesEval of the start (eval_before/)
        eval_guidances=(),           # guidances evaluated before and after; () = config.eval.guidance
        eval_params="dit",           # which weights are evaluated at the end: 'dit' or 'dit.ema' (old policy)
    ))
    c.nft = ml_collections.ConfigDict(dict(
        beta=1.0, kl_weight=1e-4, space="x0", loss_scale=1.0, t_min=0.0, t_max=1.0,
        reward_mapping="lens",       # lens (global std, clip +-1) | reference (group std, A/10 + 1/2)
        old_policy="type1",          # type1 | type2 | constant:<eta>
        updates_per_step=1,          # optimiser updates per rollout batch (strided mini-batches)
    ))
    c.grpo = ml_collections.ConfigDict(dict(
        clip_range=1e-4, kl_weight=0.04, noise_level=0.7, adv_clip=5.0, global_std=False,
    ))
    c.judge = ml_collections.ConfigDict(dict(
        kind="api",                  # rule (shapes world, in-process) | api (OpenAI-compatible chat endpoint)
        base_url="", model="gpt-4.1-mini",
        api_key_env="OPENAI_API_KEY",  # the key's environment variable (never stored)
        timeout_s=60.0, max_retries=5, backoff_s=1.0, concurrency=32,
        cache_dir="",                # verdict cache (image hash, prompt, rubric, model); '' = WORKDIR-less, none
    ))
    c.checkpoint_every = 20
    c.log_every = 1
    c.eval.enabled = False
    if variant == "lens":
        c.data.buckets = "lens27"    # its 1024² area: 736x1472 ... 1472x736 (LENS_SPEC §8.5)
        c.data.resolution = 1024
        c.data.image_size = 1024
        # 64 x 80 GB (8 hosts x 8): FSDP inside a host; the 1152 rollouts as 3 micro-batches of 6 per device
        # in the update and 3 sampler calls of 384 (BENCHMARKS.md, RL memory plan)
        c.mesh.shape = (-1, 8, 1)
        c.compile_only_devices = 64
        c.grad_accum_steps = 3
        c.rl.rollout_batch = 384
    else:
        c.rl.taxonomy = "data/rl/shapes_taxonomy.json"
        c.judge.kind = "rule"
        c.lora.rank, c.lora.alpha = 16, 32.0
        c.rl.prompts_per_step = 16
        c.rl.balance_categories = True
        c.rl.images_per_prompt = 8
        c.rl.rollout_steps = 6       # RESULTS.md session 11: 6-step rollouts and 8 updates per batch beat
        c.nft.updates_per_step = 8   # 10 steps x 1 update at the same wall time
        c.rl.grid_every = 25
        c.optim.lr = 5e-4
        c.num_steps = 230
        c.checkpoint_every = 25
        c.log_every = 5
        c.eval.enabled = True
        c.eval.guidance = 1.0
        c.rl.eval_guidances = (1.0, 4.0)
        if variant == "grpo":
            c.rl.algorithm = "grpo"
            c.num_steps = 100        # ~7.6 s per step on 2 cores: the NFT default's wall time
    return c
