"""The `vae` phase: train a small FLUX.2-architecture VAE on the shapes world (LENS_SPEC §3, §11.6).

  python -m lens_jax.main --config=experiments/vae.py:tiny --workdir=/tmp/vae_tiny

The released FLUX.2 VAE (336 MB) is far too large for the research loop, so the research-scale runs use
the same architecture (8x downsampling, quant convs, mid-block attention, 2x2-patchified latent with
frozen BatchNorm statistics) at a small width, trained from scratch on shapes-world renders. The phase
writes an Orbax weights checkpoint of kind `flux2_vae` that `lens_jax.checkpoints.convert.load_converted`
restores, with the latent statistics filled in.

Variants:
  tiny   64 px images, preset 'tiny' VAE (0.27 M parameters, 16 latent channels -> 64 packed channels),
         4000 AdamW steps at batch 8; ships as data/tiny/vae (~1 MB). Its figures: RESULTS.md, session 3.

Override any value from the command line, e.g. `--config.num_steps=3 --config.batch_size=2`.
"""
import ml_collections

from lens_jax.configs import base

VARIANTS = ("tiny",)


def parse_arg(arg):
    return base.parse_variant(arg, VARIANTS, "vae")


def get_config(arg=None):
    variant = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.phase = "vae"
    c.name = variant
    c.seed = 0

    # Architecture: a preset of lens_jax.models.vae.PRESETS; every other key is a VAEConfig field override.
    c.vae = ml_collections.ConfigDict(dict(
        preset="tiny",
        latent_channels=16,              # packed (DiT token) width = 4 * latent_channels = 64
    ))

    # Shapes-world training images (lens_jax.data.synthetic.ShapesWorldConfig), scaled to [-1, 1].
    c.data = ml_collections.ConfigDict(dict(
        image_size=64,                   # pixels; a multiple of 16 (8x VAE x 2x2 patch)
        num_examples=8192,               # training set: example indices [0, num_examples)
        eval_examples=64,                # held-out images: indices [num_examples, num_examples + eval_examples)
        seed=0,                          # ShapesWorldConfig.seed
        world=base.shapes_world_config(),  # layout and geometry (configs/base.py)
    ))

    c.optim = base.optim_config(lr=2e-3)
    c.optim.schedule = "cosine"          # warmup then cosine decay to final_lr_fraction * lr
    c.optim.warmup_steps = 50
    c.optim.final_lr_fraction = 0.05

    # Reconstruction: l1 * |x - x'| + l2 * (x - x')^2 (means over pixels, images in [-1, 1]) plus
    # kl * KL(q(z|x) || N(0, I)) summed over latent elements and averaged over the batch. No perceptual loss.
    c.loss = ml_collections.ConfigDict(dict(
        l1_weight=1.0,
        l2_weight=4.0,                   # squared error weighs most: colours stay apart (RESULTS.md, session 9)
        kl_weight=1e-6,
        sample_posterior=False,          # decode the posterior mode, as the DiT pipeline encodes (LENS_SPEC §3.3)
    ))

    c.batch_size = 8
    c.num_steps = 4000
    base.trainer_config(c, checkpoint_every=1000, log_every=100)
    c.stats_examples = 1024              # training images encoded for the latent BatchNorm statistics
    c.eval_batch_size = 64               # batch size for statistics and held-out evaluation
    c.num_png_images = 8                 # columns of vae_reconstructions.png
    c.ceiling_prompts_per_task = 40      # ShapesEval of reconstructed ground truth (the DiT's ceiling); 0 = skip
    c.output_dir = ""                    # checkpoint directory; '' = <workdir>/vae
    return c
