"""Distillation to a 4-step Turbo student (LENS_SPEC §10; phase `distill`, lens_jax/phases/distill.py).

Variants:
  lens  the paper's recipe: teacher Lens-RL at CFG 5, student and fake score from the same checkpoint, full
        parameters, AdamW (0.0, 0.9) at LR 5e-7 (student, fake score) and 1e-4 (discriminator), TTUR 4, IDA 0.03,
        lambda_d 0.1 / lambda_g 0.001, approximate R1 (gamma 1.0, alpha 0.1), <= 1K steps, 8 x 80 GB with 4 samples
        per device (global 32) from shards at the 1024² area of the 27 buckets (9 aspect ratios):
          python -m lens_jax.main --config=experiments/distill.py:lens --config.init_from=/ckpt/jax/lens_rl \
              --config.data.path=/data/distill_100k --workdir=runs/distill_lens
        memory plan: --config.compile_only=True (BENCHMARKS.md)
  tiny  the CPU research loop: from the README main job's workdir (runs/tiny, its EMA), the shapes world's
        captions minus the evaluation prompts; ShapesEval of the student at 4 steps / guidance 1 against the
        teacher at 20 steps / CFG 4 and at 4 steps (RESULTS.md):
          python -m lens_jax.main --config=experiments/distill.py:tiny --config.init_from=runs/tiny \
              --workdir=runs/distill_tiny

The Turbo preset for the distilled student: experiments/sample.py:turbo / eval.py:turbo (4 steps, guidance 1,
no unconditional branch computed) with --config.eval.params=student.
"""
import ml_collections

from lens_jax.configs import base

VARIANTS = ("lens", "tiny")


def get_config(arg=None):
    variant = base.parse_variant(arg, VARIANTS, "distill")
    c = base.load_experiment("pretrain", "stage2" if variant == "lens" else "tiny")
    c.phase = "distill"
    c.name = variant
    c.init_from = ""                 # the RL (or pretrain) run / converted lens_dit weights of student and fake score
    c.optim = base.optim_config(5e-7)            # student and fake score
    c.optim.b1, c.optim.b2, c.optim.clip_norm = 0.0, 0.9, 0.0
    c.disc_optim = base.optim_config(1e-4)       # discriminator head
    c.disc_optim.b1, c.disc_optim.b2, c.disc_optim.clip_norm = 0.0, 0.9, 0.0
    c.ema_decay = 0.0
    c.num_steps = 1000
    c.distill = ml_collections.ConfigDict(dict(
        teacher="",                  # the frozen teacher's weights; '' = config.init_from
        teacher_params="",           # which weights of a run: 'dit', 'dit.ema' ('' = the EMA when the run keeps one)
        init_params="",              # the same for the student and fake score
        teacher_dtype="",            # '' = config.model.param_dtype; e.g. bfloat16 for the frozen 4.1B teacher
        guidance=5.0,                # teacher CFG w
        student_steps=4,
        student_mu=-1.0,             # the student's sigma grid: the K-step sampler grid; < 0 = FLUX.2 empirical mu;
                                     # the Turbo preset of sample.py / eval.py samples on this grid
        backward_simulation=True,    # DMD2: student inputs from its own trajectory (else noised real latents)
        cfg_rescale=True,            # CA aims at the guided teacher as the sampler guides it (per-token norm
                                     # rescale, LENS_SPEC §7.3); False = the plain (w - 1)(c - u) of decoupled-DMD
        ttur=4,                      # fake-score / discriminator updates per student update
        ida_mix=0.03,                # SenseFlow IDA: phi <- (1 - m) phi + m theta after each student update
        lambda_d=0.1, lambda_g=1e-3, # L_student = lambda_d (L_DM + L_CA) + lambda_g L_G
        r1_gamma=1.0, r1_alpha=0.1,  # approximate R1 penalty
        normalise=True,              # DMD2 normalisers of the DM / CA steps
        t_dm=(0.02, 0.98), t_ca=(0.02, 0.98), t_fake=(0.02, 0.98), t_adv=(0.02, 0.98),   # uniform draws
        time_mu=0.0,                 # logit shift of those draws (0 = none)
        feature_layers=(11, 23, 35, 47),   # teacher blocks the discriminator reads
        disc_width=256,
        sequential_teacher=False,    # the teacher's 2- and 3-batch calls one batch at a time (activation memory)
        sample_every=100,            # student sample grid every N steps (0 = never)
        eval_runs=("student", "student_ema", "teacher", "teacher_k_steps", "teacher_k_steps_cfg"),  # student_ema:
                                     # when config.ema_decay > 0
    ))
    c.checkpoint_every = 100
    c.log_every = 10
    c.eval.enabled = False
    if variant == "lens":
        c.data.resolution = 512      # lens27's base areas 512 / 768 / 1024; only the 1024² area is drawn
        c.data.per_device_batch = (4, 4, 4)
        c.data.area_mixture = (0.0, 0.0, 1.0)
        c.distill.teacher_dtype = "bfloat16"
        c.distill.sequential_teacher = True   # BENCHMARKS.md, distillation memory plan
        c.mesh.shape = (1, -1, 1)    # FSDP over the 8 devices
        c.compile_only_devices = 8
        c.batch_size = 32            # the student's grid at 1024²: 1.0, 0.967, 0.908, 0.767 (LENS_SPEC §7.1)
    else:
        c.distill.guidance = 4.0     # the tiny teacher's CFG (its evaluation guidance, experiments/pretrain.py:tiny)
        c.distill.feature_layers = (1, 3)
        c.batch_size = 16
        c.optim.lr = 1e-4            # RESULTS.md session 13: 1e-4 with DMD2's uniform 4-step grid 1, .75, .5, .25
        c.distill.student_mu = 0.0   # (the shifted grid 1, .95, .88, .70 of 25 tokens stayed at 0.57)
        c.disc_optim.lr = 1e-3
        c.num_steps = 300
        c.checkpoint_every = 50
        c.log_every = 10
        c.distill.sample_every = 100
        c.eval.enabled = True
    return c
