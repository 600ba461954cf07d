"""The `pretrain` phase: flow-matching DiT training with periodic samples, checkpoints and evaluation.

Writes into the workdir:
  metrics.jsonl            one JSON object per logged step (loss, norms, lr, step time, tokens/s)
  checkpoints/             Orbax CheckpointManager (items 'state' and 'config'); a rerun resumes
  samples/step_XXXXXX.png  sample grids of config.sample.prompts
  eval/synthetic_geneval.json and eval/samples.png   (config.eval.enabled, shapes world)
  config.json
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.configs.base import ConfigError, validate_common
from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.checkpoints import TrainCheckpointer
from lens_jax.train.metrics import MetricsWriter, Progress
from lens_jax.train.optim import make_optimizer
from lens_jax.train.state import abstract_train_state, create_train_state, param_count
from lens_jax.train.step import make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate(config) -> None:
    validate_common(config)
    d = config.data
    if d.source == "shards":
        if not d.path:
            raise ConfigError("experiment needs a dataset: set --config.data.path=/path/to/shards "
                              "(or --config.data.source=shapes for the synthetic world)")
        raise ConfigError("config.data.source='shards' (ArrayRecord image-caption shards) is not implemented "
                          "yet; use --config.data.source=shapes")
    if d.source != "shapes":
        raise ConfigError(f"config.data.source={d.source!r}; choose 'shards' or 'shapes'")
    if d.caption not in ("dense", "brief", "mixed"):
        raise ConfigError(f"config.data.caption={d.caption!r}; choose dense, brief or mixed")
    if not 0.0 <= d.caption_dropout <= 1.0:
        raise ConfigError(f"config.data.caption_dropout={d.caption_dropout} must be in [0, 1]")
    if d.image_size % 16:
        raise ConfigError(f"config.data.image_size={d.image_size} must be a multiple of 16")
    if config.batch_size <= 0 or config.num_steps < 0:
        raise ConfigError("config.batch_size must be positive and config.num_steps non-negative")
    if d.num_examples < config.batch_size:
        raise ConfigError(f"config.data.num_examples={d.num_examples} is smaller than the batch "
                          f"({config.batch_size})")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")


def build_dit(config, token_channels: int, text_dim: int, num_text_layers: int) -> MMDiT:
    """The DiT from its preset; the preset must match what the frozen encoders produce."""
    try:
        cfg = mmdit_config(config.model.preset)
    except ValueError as e:
        raise ConfigError(f"config.model.preset: {e}") from None
    want = dict(in_channels=token_channels, out_channels=token_channels, text_dim=text_dim,
                num_text_layers=num_text_layers)
    bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ConfigError(f"config.model.preset={config.model.preset!r} does not fit the encoders: "
                          + ", ".join(f"{k} is {a} but the encoders give {b}" for k, (a, b) in bad.items()))
    m = config.model
    return MMDiT(cfg, attention=m.attention, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                 dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype])


def load_encoders(config):
    """(FrozenVAE, encode_text, text feature width E, number of text layers)."""
    from lens_jax.pipeline import FrozenVAE, load_text_encoder, resolve_path
    vae = FrozenVAE(resolve_path(config.vae.checkpoint, "config.vae.checkpoint"))
    encode_text, hidden, n_layers = load_text_encoder(
        resolve_path(config.text_encoder.checkpoint, "config.text_encoder.checkpoint"),
        config.text_encoder.tokenizer, config.text_encoder.trim_to)
    return vae, encode_text, hidden, n_layers


def sample_grid(pipeline, config, params, path: str) -> None:
    from lens_jax.eval.shapes_eval import save_grid
    prompts = [p for p in config.sample.prompts.split(";") if p.strip()]
    if not prompts:
        return
    pipeline.params = params
    n = 4
    imgs = pipeline.generate([p for p in prompts for _ in range(n)], config.sample.height, config.sample.width,
                             config.sample.num_steps, config.sample.guidance, seed=config.sample.seed,
                             mu=None if config.sample.mu < 0 else config.sample.mu)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_grid(list(imgs), path, ncol=n, scale=max(1, 256 // config.sample.width))


def run(config, workdir: str):
    validate(config)
    t_start = time.time()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    # Frozen encoders and the training data (encoded once into a cache: research scale).
    from lens_jax.data.latent_cache import build_shapes_cache
    vae, encode_text, hidden, n_layers = load_encoders(config)
    print(f"encoding {config.data.num_examples} shapes-world examples ({config.data.caption} captions)...", flush=True)
    data = build_shapes_cache(config, vae, encode_text)
    print(f"  cache: image tokens {data.img.shape}, text {data.txt.shape} in {time.time() - t_start:.1f}s", flush=True)

    model = build_dit(config, vae.token_channels, hidden, n_layers)
    mesh = sharding_lib.make_mesh(config.mesh.shape)
    rules = sharding_lib.validate_rules(config.sharding.rules)
    optimizer, schedule = make_optimizer(config.optim, config.num_steps)
    use_ema = config.ema_decay > 0
    dummy = dummy_inputs(model.config, batch=1, h=data.grid[0], w=data.grid[1], text_len=data.txt.shape[1])

    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                             save_interval_steps=config.checkpoint_every)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract, shardings = abstract_train_state(model, optimizer, dummy, mesh, rules, use_ema)
        state = ckpt.restore(latest, abstract)
        print(f"resumed from {ckpt.directory} step {latest}", flush=True)
    else:
        state, shardings = create_train_state(model, optimizer, dummy, mesh, rules, config.seed, use_ema)
    print(f"DiT {config.model.preset}: {param_count(state):,} parameters; mesh {dict(mesh.shape)}", flush=True)

    mu_rule = dict(mu_lo=config.timestep.mu_lo, mu_hi=config.timestep.mu_hi, n_lo=config.timestep.n_lo,
                   n_hi=config.timestep.n_hi)
    step_fn = make_train_step(model, optimizer, schedule, mu=config.timestep.mu, mu_rule=mu_rule,
                              sigma_std=config.timestep.std, caption_dropout=config.data.caption_dropout,
                              ema_decay=config.ema_decay)
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim + 0) for k, v in data.example_batch(1).items()}
    with jax.set_mesh(mesh):
        train_step = jax.jit(step_fn, in_shardings=(shardings, batch_shardings),
                             out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))

    from lens_jax.pipeline import LensPipeline
    pipeline = LensPipeline(model, None, encode_text, vae)
    writer = MetricsWriter(workdir)
    step = int(jax.device_get(state["step"]))
    progress = Progress(config.num_steps, start=step)
    tokens_per_step = config.batch_size * (data.img.shape[1] + data.txt.shape[1])
    t_last, last_step = time.time(), step
    while step < config.num_steps:
        batch = data.batch(step, config.batch_size, config.seed)
        batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
        with jax.set_mesh(mesh):
            state, metrics = train_step(state, batch)
        step += 1
        if step % config.log_every == 0 or step == config.num_steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = (time.time() - t_last) / max(1, step - last_step)
            t_last, last_step = time.time(), step
            m.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            writer.write(step, m)
            progress.print(step, loss=m["loss"], grad_norm=m["grad_norm"], lr=m["lr"])
            if not np.isfinite(m["loss"]):
                print(f"warning: non-finite loss at step {step} (update skipped)", flush=True)
        if ckpt.should_save(step):
            ckpt.save(step, state, config.to_json_best_effort())
        if config.sample_every and step % config.sample_every == 0 and step < config.num_steps:
            sample_grid(pipeline, config, state["ema_params"] if use_ema else state["params"],
                        os.path.join(workdir, "samples", f"step_{step:06d}.png"))
    ckpt.save(step, state, config.to_json_best_effort(), force=True)
    ckpt.close()
    writer.close()
    print(f"training done at step {step} in {time.time() - t_start:.0f}s; checkpoint in {ckpt.directory}", flush=True)

    final_params = state["ema_params"] if use_ema else state["params"]
    sample_grid(pipeline, config, final_params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))
    result = None
    if config.eval.enabled:
        from lens_jax.phases.evaluate import evaluate_shapes
        pipeline.params = final_params
        result = evaluate_shapes(pipeline, config, os.path.join(workdir, "eval"))
    print(f"total {time.time() - t_start:.0f}s", flush=True)
    return result
