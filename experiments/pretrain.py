"""DiT pretraining (LENS_SPEC §6).

Variants:
  (default) stage1  512², global batch 3072, AdamW (0.9, 0.999), constant LR 2e-4, clip 1.0, mu = 1.06
  stage2            the 27 buckets (3 areas x 9 aspect ratios), per-device batch 24/10/6, LR 1e-4,
                    mu from 1.0 at 256 tokens to 1.3 at 4096
  tiny              the CPU research loop: shapes world (brief captions), the shipped tiny VAE and text
                    encoder, a small DiT; trains, samples and evaluates in ~7 minutes on 2 CPU cores

  python -m lens_jax.main --config=experiments/pretrain.py:tiny --workdir=runs/tiny
"""
import ml_collections

from lens_jax.configs import base
from lens_jax.train.sharding import DEFAULT_RULES

VARIANTS = ("stage1", "stage2", "tiny")


def get_config(arg=None):
    variant = base.parse_variant(arg, VARIANTS, "pretrain")
    c = ml_collections.ConfigDict()
    c.phase = "pretrain"
    c.name = variant
    c.seed = 0
    c.model = base.model_config("lens_3p8b")
    c.vae = base.vae_config()
    c.text_encoder = base.text_encoder_config()
    c.data = ml_collections.ConfigDict(dict(
        source="shards",            # shards (ArrayRecord image-caption shards) | shapes (synthetic world)
        path="",                    # shard directory for source=shards
        resolution=512,             # base area side in pixels (stage 1)
        buckets="",                 # '' = fixed square resolution; 'lens27' = the 27 stage-2 buckets
        per_device_batch=(24,),     # per base area, in bucket-area order
        caption="dense",            # dense | brief | mixed (the Figure-4 switch)
        caption_dropout=0.1,        # whole-caption drop to zeros + all-false mask (CFG)
        num_examples=0,             # shapes world: examples encoded into the training cache
        image_size=64,              # shapes world: image side in pixels
        max_text_tokens=0,          # > 0 truncates cached text features (after the offset strip)
    ))
    c.batch_size = 3072
    c.num_steps = 400_000
    c.optim = base.optim_config(2e-4)
    c.timestep = base.timestep_config()
    c.timestep.mu = 1.06
    c.ema_decay = 0.0               # 0 = no EMA (not used by Lens; LENS_SPEC §12.2)
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    c.log_every = 100
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    c.sample_every = 5000
    c.sample = base.sample_config(num_steps=20, guidance=5.0)
    c.sample.height = c.sample.width = 512
    c.sample.prompts = "a photo of a cat;a red bicycle leaning against a blue wall"
    c.eval = ml_collections.ConfigDict(dict(
        enabled=False,              # synthetic GenEval at the end (shapes world only)
        prompts_per_task=0,         # 0 = GenEval's task sizes (553 prompts)
        samples_per_prompt=4,
        num_steps=20,
        guidance=5.0,
        mu=-1.0,                    # sigma-schedule shift; < 0 = FLUX.2 empirical mu
        seed=1234,
        batch_size=64,
    ))

    if variant == "stage2":
        c.name = "stage2"
        c.data.buckets = "lens27"
        c.data.per_device_batch = (24, 10, 6)
        c.optim.lr = 1e-4
        c.timestep.mu = -1.0        # the token-count rule
        c.num_steps = 400_000
    elif variant == "tiny":
        c.model.preset = "shapes_tiny"
        c.model.attention = "xla"
        c.model.remat_policy = "none"
        c.model.dtype = "float32"
        c.vae.checkpoint = "data/tiny/vae"
        c.vae.preset = "tiny"
        c.vae.dtype = "float32"
        c.text_encoder.checkpoint = "data/tiny/text_encoder"
        c.text_encoder.preset = "tiny"
        c.text_encoder.dtype = "float32"
        c.data.source = "shapes"
        c.data.resolution = 64
        c.data.image_size = 64
        c.data.caption = "brief"    # GenEval-style, in distribution with the eval prompts; ~45 text tokens
        c.data.num_examples = 12288
        c.batch_size = 64
        # Shorter runs score higher (0.29-0.32 at 250-300 steps) but only because ShapesEval credits
        # the blob-covered images of an undertrained model; 1100 steps gives clean shapes (RESULTS.md).
        c.num_steps = 1100
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 50
        c.optim.schedule = "cosine"
        c.timestep.mu = -1.0
        c.ema_decay = 0.995
        c.log_every = 50
        c.checkpoint_every = 0
        c.sample_every = 400
        c.sample.num_steps = 20
        c.sample.guidance = 4.0
        c.sample.height = c.sample.width = 64
        c.sample.prompts = "a photo of a red circle;a photo of two blue squares;a photo of a green triangle left of a yellow circle"
        c.eval.enabled = True
        c.eval.prompts_per_task = 24
        c.eval.samples_per_prompt = 4
        c.eval.guidance = 4.0
        c.eval.num_steps = 20
    return c
