"""Does a trained shapes-world DiT read its prompt? Caption-loss gaps and image-to-text attention.

    python tools/probe_conditioning.py --workdir=runs/tiny [--config=experiments/pretrain.py:tiny] \
        [--num_examples=256] [--sigmas=0.3,0.6,0.8,0.95] [--attention_sigma=0.8]

Restores the trained parameters of WORKDIR (the EMA copy when the run keeps one), then prints

1. the flow-matching loss on held-out shapes-world examples (a world seed the run never trained on) with the true
   caption, another example's caption and no caption, per noise level; `gain` = shuffled - correct;
2. per DiT layer, the attention mass of image tokens on all text tokens and on the colour and shape words of
   GenEval colour prompts ("a photo of a red circle", ground-truth renders noised to --attention_sigma), against
   the share uniform attention would give those words (`ratio` 1 = no preference).

and writes both to WORKDIR/eval/conditioning.json. See lens_jax/eval/conditioning.py.
"""
from __future__ import annotations

import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(_REPO, "experiments", "pretrain.py") + ":tiny",
                                "Experiment file[:variant] the workdir was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "Pretrain workdir (its checkpoints/ is restored).", required=True)
flags.DEFINE_integer("num_examples", 256, "Held-out shapes-world examples for the loss gaps.")
flags.DEFINE_string("sigmas", "0.3,0.6,0.8,0.95", "Comma-separated noise levels for the loss gaps.")
flags.DEFINE_float("attention_sigma", 0.8, "Noise level of the attention probe.")
flags.DEFINE_integer("num_prompts", 16, "GenEval colour prompts for the attention probe.")
flags.DEFINE_integer("world_seed_offset", 10_000, "Held-out world seed = config.seed + this.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np

    from lens_jax.configs.base import ConfigError
    from lens_jax.data.latent_cache import build_shapes_cache
    from lens_jax.data.synthetic import COLORS, SHAPES, world_config
    from lens_jax.eval import conditioning
    from lens_jax.eval.shapes_eval import make_eval_prompts, render_prompt_ground_truth
    from lens_jax import build
    from lens_jax.text.prompt_encoding import tokenize_prompts

    config = FLAGS.config
    if config.data.source != "shapes":
        raise app.UsageError("probe_conditioning needs a shapes-world run (config.data.source=shapes)")
    try:
        sigmas = [float(s) for s in FLAGS.sigmas.split(",") if s.strip()]
    except ValueError:
        raise app.UsageError(f"--sigmas must be comma-separated numbers; got {FLAGS.sigmas!r}") from None
    enc = build.load_encoders(config)
    vae, encode_text, prompt_cfg, tokenizer = enc.vae, enc.encode_text, enc.prompt, enc.tokenizer
    model = build.build_dit(config, enc)
    try:
        params, step = build.restore_dit(config, model, FLAGS.workdir)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    print(f"restored {step}")

    held = config.copy_and_resolve_references()
    with held.unlocked():
        held.seed = config.seed + FLAGS.world_seed_offset
        held.data.num_examples = FLAGS.num_examples
    data = build_shapes_cache(held, vae, encode_text)
    gaps = conditioning.caption_loss_gaps(model, params, data.example_batch(len(data)), sigmas)
    print(f"\nloss on {len(data)} held-out examples ({config.data.caption} captions)")
    print("  sigma  correct  shuffled    null    gain")
    for r in gaps:
        print(f"  {r['sigma']:5.2f}  {r['correct']:7.4f}  {r['shuffled']:8.4f}  {r['null']:6.4f}  {r['caption_gain']:+.4f}")

    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    prompts = make_eval_prompts(world, seed=FLAGS.world_seed_offset, per_task=FLAGS.num_prompts)
    prompts = [p for p in prompts if p["tag"] == "colors"][:FLAGS.num_prompts]
    rng = np.random.default_rng(FLAGS.world_seed_offset)
    images = np.stack([render_prompt_ground_truth(p, rng, world) for p in prompts]).astype(np.float32) / 127.5 - 1
    texts = [p["prompt"] for p in prompts]
    tf = encode_text(texts)
    ids, _ = tokenize_prompts(tokenizer, texts, prompt_cfg)
    focus = conditioning.word_token_mask(tokenizer, ids, list(COLORS) + list(SHAPES), prompt_cfg.txt_offset,
                                         length=tf.mask.shape[1]) & np.asarray(tf.mask, bool)
    x0 = vae.encode_tokens(images)
    side = config.data.image_size // 16
    pos = np.broadcast_to(data.example_batch(1)["img_pos"][0], (len(texts), side * side, 3))
    attn = conditioning.attention_to_text(model, params, x0, pos, tf.features, tf.mask, focus,
                                          FLAGS.attention_sigma)
    print(f"\nimage -> text attention at sigma {FLAGS.attention_sigma} on {len(texts)} colour prompts "
          f"(focus = colour and shape words, {int(focus.sum())} tokens)")
    print("  layer  text mass  focus mass  uniform  ratio")
    for r in attn:
        print(f"  {r['layer']:5d}  {r['text_mass']:9.3f}  {r['focus_mass']:10.3f}  {r['focus_uniform']:7.3f}  "
              f"{r['focus_ratio']:5.2f}")
    out = os.path.join(FLAGS.workdir, "eval", "conditioning.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(step=step, loss_gaps=gaps, attention=attn, attention_sigma=FLAGS.attention_sigma,
                       prompts=texts), f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    app.run(main)
