"""DiT pretraining (LENS_SPEC §6).

Variants:
  (default) stage1  512², global batch 3072, AdamW (0.9, 0.999), constant LR 2e-4, clip 1.0, mu = 1.06
  stage2            the 27 buckets (3 areas x 9 aspect ratios), per-device batch 24/10/6, LR 1e-4,
                    mu from 1.0 at 256 tokens to 1.3 at 4096
  tiny              the CPU research loop: the token-aligned canonical shapes world (80 px, white background,
                    one object size, two-object scenes favoured, brief captions with more relation phrases),
                    the shipped tiny VAE and text encoder, a small DiT; trains, samples and evaluates in
                    9-12 minutes on 2 idle CPU cores (the VM's speed; README)

  python -m lens_jax.main --config=experiments/pretrain.py:tiny --workdir=runs/tiny

Data: source=shards reads ArrayRecord image-caption shards (tools/build_shards.py) through the bucketed Grain
pipeline and encodes every step's micro-batches online with the frozen VAE and text encoder
(lens_jax/data/encoded_source.py); a step holds one micro-batch per scheduled base area, each of
per_device_batch[area] x (data-parallel devices) images. source=shapes (tiny's default) encodes the shapes
world once into an in-memory cache of config.batch_size-image batches.

The tiny experiment from shards (80-px shards of the same token-aligned canonical world, one 80 x 80 bucket,
64 images per step on one device, brief captions in 64 text tokens; ShapesEval still runs at the end):

  python tools/build_shards.py --shapes_world=4096 --image_size=80 --out=/tmp/shapes_shards \
      --shapes_world_options='{"layout": "canonical", "grid_span": 1.2, "jitter": 0, "side_fractions": [0.1375, 0.1625, 0.1875], "backgrounds": ["white"], "sizes": ["medium"], "count_weights": [1, 2, 1, 1], "relation_prob": 0.5}'
  python -m lens_jax.main --config=experiments/pretrain.py:tiny --config.data.source=shards \
      --config.data.path=/tmp/shapes_shards --config.data.max_text_tokens=64 --workdir=runs/tiny_shards

  (several devices: per_device_batch is per device, e.g. --config.data.per_device_batch='(8,)' on 8 devices
  for the same 64 images per step; mixed aspect ratios: --config.data.buckets=ar9 gives the 9 Lens ratios at
  base side 80, 'ar9:32,48,80' three base areas with --config.data.per_device_batch='(a,b,c)')
"""
import ml_collections

from lens_jax.configs import base
from lens_jax.train.sharding import DEFAULT_RULES, TEXT_ENCODER_RULES, VAE_RULES

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
        world=base.shapes_world_config(),  # shapes world: layout and geometry (configs/base.py)
        max_text_tokens=0,          # > 0 truncates cached text features (after the offset strip); shards: the fixed
                                    # text length of every batch (cut or zero-padded; 0 = the text encoder's
                                    # max_length - txt_offset, e.g. 512 - 97 = 415 for GPT-OSS)
        features="cached",          # cached: batches carry VAE tokens + text features | online: raw pixels and
                                    # token ids, encoded inside the train step by the frozen, sharded encoders
        # Shard pipeline (lens_jax/data/shard_pipeline.py; source=shards). The bucket table is `buckets` at
        # `resolution` ('' = one resolution x resolution bucket; 'lens27'; 'ar9'; 'ar9:S1,S2,...', see
        # lens_jax/data/buckets.py); per_device_batch has one entry per base area:
        area_mixture=(),            # per-area weights of micro-batches per step; () = equal (one of each area)
        micro_batches_per_step=0,   # micro-batches accumulated per step; 0 = areas with a positive weight
        min_area=384 ** 2,          # skip (and count) images with fewer pixels (LENS_SPEC §5.2 step 2)
        max_upscale=1.0,            # an image is used at a base area only if upscaled <= this; else a smaller area
        num_threads=0,              # Grain reader threads per area stream; 0 = min(16, CPU count)
        prefetch=64,                # elements buffered per area stream
        num_workers=0,              # > 0: Grain mp_prefetch worker processes per area stream
        jpeg_draft=True,            # JPEG DCT-domain downscale (1/2..1/8) before the bicubic resize
        pixel_dtype="float32",      # pixels handed to the trainer: float32 in [-1, 1] | uint8
    ))
    c.batch_size = 3072
    c.num_steps = 400_000
    c.optim = base.optim_config(2e-4)
    c.timestep = base.timestep_config()
    c.timestep.mu = 1.06
    c.ema_decay = 0.0               # 0 = no EMA (not used by Lens; LENS_SPEC §12.2)
    c.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),           # (data, fsdp, tensor) within a slice/host (ICI); one -1 = the rest
        dcn_shape=(1, 1, 1),        # across slices/hosts (DCN); global mesh = shape * dcn_shape elementwise
    ))
    c.sharding = ml_collections.ConfigDict(dict(
        rules=DEFAULT_RULES,                    # DiT logical axis -> mesh axes (lens_jax/train/sharding.py)
        vae_rules=VAE_RULES,                    # frozen VAE for data.features=online: replicated
        text_encoder_rules=TEXT_ENCODER_RULES,  # frozen GPT-OSS for data.features=online: FSDP + tensor
    ))
    c.grad_accum_steps = 1          # split each (dict) batch into k equal micro-batches inside the step (memory;
                                    # same gradient); per-device batch must divide by k
    c.compile_only = False          # lower + compile the full-scale step on fake CPU devices, print per-device
                                    # memory and FLOPs, then exit (no data, nothing allocated)
    c.compile_only_devices = 8      # fake CPU device count for compile_only (mesh.shape's -1 is filled from it);
                                    # 0 = this machine's own devices (e.g. one GPU, to check the CPU estimate)
    c.compile_only_text_len = 0     # text tokens per example for compile_only; 0 = text_encoder.max_length - txt_offset
    base.trainer_config(c, checkpoint_every=5000, log_every=100)
    c.init_from = ""                # fresh start: DiT weights from a converted lens_dit checkpoint
                                    # (tools/convert_checkpoint.py) or another run (its 'dit' params)
    c.peak_tflops = 0.0             # peak TFLOP/s per device for MFU; 0 = from the device kind (none on CPU)
    c.sample_every = 5000
    c.sample = base.sample_config(num_steps=20, guidance=5.0)
    c.sample.height = c.sample.width = 512
    c.sample.prompts = "a photo of a cat;a red bicycle leaning against a blue wall"
    c.reasoner = base.reasoner_config()
    c.eval = ml_collections.ConfigDict(dict(
        enabled=False,              # synthetic GenEval at the end (shapes world only)
        metadata_file="",           # GenEval evaluation_metadata.jsonl of prompts; '' = built-in ShapesEval sets
        scorer="shapes",            # shapes (ShapesEval) | none (only write the GenEval folder)
        prompts_per_task=0,         # built-in sets: prompts per task; 0 = GenEval's task sizes (553 prompts)
        samples_per_prompt=4,
        num_steps=20,
        guidance=5.0,
        mu=-1.0,                    # sigma-schedule shift; < 0 = FLUX.2 empirical mu
        seed=1234,
        batch_size=64,
        integrity=True,             # an image also has to be clean (no spurious blobs / clutter) to count
        with_and_without_reasoner=True,  # with config.reasoner on: also evaluate the raw prompts, side by side
    ))

    if variant == "stage2":
        c.name = "stage2"
        c.data.buckets = "lens27"
        c.data.per_device_batch = (24, 10, 6)
        c.optim.lr = 1e-4
        c.timestep.mu = -1.0        # the token-count rule
        c.num_steps = 400_000
    elif variant == "tiny":
        # The CPU research loop; every choice below is measured in RESULTS.md (sessions 6-8).
        c.model.preset = "shapes_tiny"
        c.model.attention = "xla"
        c.model.remat_policy = "none"
        c.model.dtype = "float32"
        c.model.scan_layers = False     # unrolled: 21% faster step on 2 CPU cores (BENCHMARKS.md)
        c.vae.checkpoint = "data/tiny/vae"
        c.vae.preset = "tiny"
        c.vae.dtype = "float32"
        c.text_encoder.checkpoint = "data/tiny/text_encoder"
        c.text_encoder.preset = "tiny"
        c.text_encoder.dtype = "float32"
        c.data.source = "shapes"
        # The token-aligned canonical world: 80 px = 5 x 5 DiT tokens, each object inside one token, cells
        # following the object count and caption order.
        c.data.resolution = 80
        c.data.image_size = 80
        c.data.world.layout = "canonical"
        c.data.world.grid_span = 1.2
        c.data.world.jitter = 0.0
        c.data.world.side_fractions = (11 / 80, 13 / 80, 15 / 80)
        c.data.world.backgrounds = ("white",)   # what captions leave open the DiT must model without the prompt
        c.data.world.sizes = ("medium",)
        c.data.world.count_weights = (1.0, 2.0, 1.0, 1.0)   # three of GenEval's six tasks have two objects
        c.data.world.relation_prob = 0.5        # relation captions teach the direction words
        c.data.caption = "brief"        # GenEval-style, in distribution with the evaluation prompts
        c.data.num_examples = 6144
        c.batch_size = 64
        c.num_steps = 1700
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 50
        c.optim.schedule = "cosine"
        c.timestep.mu = -1.0
        c.ema_decay = 0.995
        c.log_every = 50
        c.checkpoint_every = 0
        c.sample_every = 500
        c.sample.num_steps = 20
        c.sample.guidance = 4.0
        c.sample.height = c.sample.width = 80
        c.sample.prompts = "a photo of a red circle;a photo of two blue squares;a photo of a green triangle left of a yellow circle"
        c.eval.enabled = True
        c.eval.prompts_per_task = 24
        c.eval.samples_per_prompt = 4
        c.eval.guidance = 4.0
        c.eval.num_steps = 20
        # For --config.data.source=shards (see the module docstring): no minimum area, 64 images per step on
        # one device; shards need a fixed text length: --config.data.max_text_tokens=64 fits brief captions.
        c.data.min_area = 0
        c.data.per_device_batch = (64,)
    return c
