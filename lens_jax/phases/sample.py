"""The `sample` phase: render prompts with a trained (or converted) DiT.

Prompts come from `config.sample.prompt_file` (one per line) or `config.sample.prompts` (';'-separated).
The DiT comes from `config.sample.checkpoint`: a converted weights directory (tools/convert_checkpoint.py
--kind=lens_dit) or a run workdir / checkpoints dir / step dir; empty means this workdir. `config.sample.params`
names the weights of a run ('dit', 'dit.ema', ...; '' = the EMA when kept); no optimiser state is read.
With a reasoner (--config.reasoner.backend=rules|api|local) the images are rendered from its rewrites; each PNG's
text chunks and settings.json hold the prompt, the rewritten prompt and the seed.
Writes DIR/samples/NNNN.png (one per prompt and seed) and DIR/samples/settings.json.
"""
from __future__ import annotations

import json
import os

from PIL import Image, PngImagePlugin

from lens_jax.configs.base import ConfigError


def read_prompts(sample_cfg):
    if sample_cfg.prompt_file:
        if not os.path.exists(sample_cfg.prompt_file):
            raise ConfigError(f"config.sample.prompt_file={sample_cfg.prompt_file!r} does not exist")
        with open(sample_cfg.prompt_file) as f:
            lines = f.read().splitlines()
        while lines and not lines[-1].strip():   # a trailing newline is fine
            lines.pop()
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise ConfigError(f"{sample_cfg.prompt_file}: empty prompt on line(s) {empty}")
        prompts = [line.strip() for line in lines]
    else:
        prompts = [p.strip() for p in sample_cfg.prompts.split(";")]
        if any(not p for p in prompts):
            raise ConfigError("config.sample.prompts has an empty prompt (check for ';;' or a trailing ';')")
    if not prompts:
        raise ConfigError("no prompts: set --config.sample.prompts='a;b' or --config.sample.prompt_file=FILE")
    return prompts


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 16:
            raise ConfigError(f"config.sample.{name}={v} must be a positive multiple of 16")


def run(config, workdir: str):
    from lens_jax import build, reasoner
    s = config.sample
    prompts = read_prompts(s)
    check_size(s.height, s.width)
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)
    params, origin = build.restore_dit(config, model, s.checkpoint or workdir, params=s.get("params", ""))
    pipeline = build.build_pipeline(model, params, enc)
    rewriter = reasoner.build_rewriter(config, enc, workdir)
    rendered = prompts
    if rewriter is not None:
        rewrites = rewriter.rewrite_records(prompts)
        rendered = [r.rewrite for r in rewrites]
        print(rewriter.summary(), flush=True)
    outdir = os.path.join(workdir, "samples")
    os.makedirs(outdir, exist_ok=True)
    images = pipeline.generate(rendered, s.height, s.width, s.num_steps, s.guidance, seed=s.seed,
                               negative_prompt=s.negative_prompt, batch_size=s.batch_size,
                               mu=None if s.mu < 0 else s.mu)
    records = []
    for i, (p, im) in enumerate(zip(prompts, images)):
        name = f"{i:04d}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", p)
        info.add_text("seed", str(s.seed))
        rec = dict(file=name, prompt=p, seed=s.seed, noise_index=i)
        if rewriter is not None:
            info.add_text("rewritten_prompt", rendered[i])
            rec.update(rewritten_prompt=rendered[i], rewrite_status=rewrites[i].status)
        Image.fromarray(im).save(os.path.join(outdir, name), pnginfo=info)
        records.append(rec)
    settings = dict(dit=origin, model=config.model.preset, height=s.height, width=s.width, num_steps=s.num_steps,
                    guidance=s.guidance, negative_prompt=s.negative_prompt, images=records,
                    reasoner=None if rewriter is None else dict(rewriter.describe(), stats=rewriter.stats.as_dict()),
                    note="image i uses noise key fold_in(PRNGKey(seed), i)")
    with open(os.path.join(outdir, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    print(f"wrote {len(records)} images to {outdir}", flush=True)
    return settings
