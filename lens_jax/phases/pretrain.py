"""The `pretrain` phase: flow-matching DiT training with periodic samples, checkpoints and evaluation.

Writes into the workdir:
  metrics.jsonl            one JSON object per logged step (loss, norms, lr, skipped, step time, tokens/s, MFU)
  tensorboard/             the same scalars as TensorBoard event files (config.tensorboard)
  checkpoints/             Orbax CheckpointManager (items 'state', 'data_iter', 'config'); a rerun resumes
  samples/step_XXXXXX.png  sample grids of config.sample.prompts
  eval/synthetic_geneval.json and eval/samples.png   (config.eval.enabled, shapes world)
  config.json

Data (config.data.source):
  shapes   the synthetic shapes world, encoded once into an in-memory cache (lens_jax/data/latent_cache.py);
           the batch order is a pure function of (seed, step); config.batch_size images per step.
           With config.data.features='online' the examples are kept raw instead (uint8 pixels and tokenised
           captions, lens_jax/data/raw_source.py: same examples, same batch order) and the frozen encoders,
           restored into sharded targets (config.sharding.vae_rules / text_encoder_rules), run inside the
           jitted step (lens_jax/train/step.py make_online_encoder).
  shards   ArrayRecord image-caption shards in config.data.path (tools/build_shards.py) through the bucketed
           Grain pipeline (lens_jax/data/shard_pipeline.py), VAE- and text-encoded online every step outside
           the jitted step (lens_jax/data/encoded_source.py). A step is a tuple of micro-batches, one per
           scheduled base area, each of per_device_batch[area] x data-parallel size images; text is cut or
           padded to a fixed length (data.max_text_tokens, or the encoder's max_length - txt_offset when 0).
           The iterator state is checkpointed ('data_iter'), so a resumed run continues the data exactly.
           metrics.jsonl rows also hold the data statistics (data/...: padding, buckets, skips, areas).

The loop itself (metrics, checkpoints, SIGTERM, non-finite abort) is lens_jax/train/loop.py; where a run
starts from (this workdir, config.resume_from, config.init_from, scratch) is lens_jax/train/resume.py;
several processes (SLURM or JAX_COORDINATOR_ADDRESS) are set up by lens_jax/train/distributed.py, each
feeding its own rows of every global batch. Only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from lens_jax.configs.base import ConfigError, validate_common
from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config
from lens_jax.train import distributed
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.checkpoints import TrainCheckpointer
from lens_jax.train.loop import LoopOptions, StepIndexedSource, train_loop
from lens_jax.train.metrics import MetricsWriter, Progress, peak_tflops_per_device, train_flops_per_step
from lens_jax.train.optim import make_optimizer
from lens_jax.train.resume import resolve_start
from lens_jax.train.state import abstract_train_state, create_train_state, param_count
from lens_jax.train.step import make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate(config) -> None:
    validate_common(config)
    d = config.data
    if d.source not in ("shards", "shapes"):
        raise ConfigError(f"config.data.source={d.source!r}; choose 'shards' or 'shapes'")
    if d.caption not in ("dense", "brief", "mixed"):
        raise ConfigError(f"config.data.caption={d.caption!r}; choose dense, brief or mixed")
    if not 0.0 <= d.caption_dropout <= 1.0:
        raise ConfigError(f"config.data.caption_dropout={d.caption_dropout} must be in [0, 1]")
    if d.get("max_text_tokens", 0) < 0:
        raise ConfigError(f"config.data.max_text_tokens={d.max_text_tokens} must be >= 0")
    try:
        sharding_lib.validate_parallel_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.source == "shards":
        validate_shards(config)
    else:
        k = int(config.get("grad_accum_steps", 1))
        if config.batch_size % k:
            raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                              f"config.grad_accum_steps={k}")
        if d.image_size % 16:
            raise ConfigError(f"config.data.image_size={d.image_size} must be a multiple of 16")
        from lens_jax.data.synthetic import world_config
        try:
            world_config(d.world, image_size=int(d.image_size), seed=int(config.seed))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.data.world: {e}") from None
        if config.batch_size <= 0:
            raise ConfigError("config.batch_size must be positive")
        if d.num_examples < config.batch_size:
            raise ConfigError(f"config.data.num_examples={d.num_examples} is smaller than the batch "
                              f"({config.batch_size})")
    if config.num_steps < 0:
        raise ConfigError("config.num_steps must be non-negative")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
    if config.log_every <= 0:
        raise ConfigError(f"config.log_every={config.log_every} must be positive")
    if config.checkpoint_every < 0 or config.keep_every < 0:
        raise ConfigError("config.checkpoint_every and config.keep_every must be >= 0 (0 = off)")
    if config.keep_checkpoints < 1:
        raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints} must be at least 1")
    if config.max_nonfinite_steps < 0:
        raise ConfigError(f"config.max_nonfinite_steps={config.max_nonfinite_steps} must be >= 0 (0 = never abort)")
    if config.peak_tflops < 0:
        raise ConfigError(f"config.peak_tflops={config.peak_tflops} must be >= 0 (0 = from the device kind)")
    for key in ("resume_from", "init_from"):
        if config[key] and not os.path.exists(config[key]):
            raise ConfigError(f"config.{key}={config[key]} does not exist")


def validate_shards(config) -> None:
    """config.data for source='shards': a path with shards, a bucket table and one batch size per area."""
    from lens_jax.data import buckets as buckets_lib
    from lens_jax.data.shard_pipeline import list_shard_files
    d = config.data
    if d.get("features", "cached") != "cached":
        raise ConfigError(f"config.data.features={d.features!r} is not supported with config.data.source=shards: a "
                          "shard step's micro-batches mix aspect-ratio buckets of different pixel sizes, which "
                          "cannot go through one jitted encode, so shard batches are VAE- and text-encoded on "
                          "the host (lens_jax/data/encoded_source.py); use --config.data.features=cached "
                          "(online encoding works with --config.data.source=shapes)")
    if int(config.get("grad_accum_steps", 1)) > 1:
        raise ConfigError(f"config.grad_accum_steps={config.grad_accum_steps} does not apply to "
                          "config.data.source=shards: a shard step is already a tuple of accumulated "
                          "micro-batches; lower config.data.per_device_batch (or raise "
                          "config.data.micro_batches_per_step) instead and keep grad_accum_steps=1")
    if not d.path:
        raise ConfigError("experiment needs a dataset: set --config.data.path=/path/to/shards "
                          "(or --config.data.source=shapes for the synthetic world)")
    try:
        table = buckets_lib.bucket_table(d.buckets, d.resolution)
    except ValueError as e:
        raise ConfigError(f"config.data.buckets={d.buckets!r} / resolution={d.resolution}: {e}") from None
    pdb = tuple(d.per_device_batch)
    if len(pdb) != table.num_areas or any(int(b) <= 0 for b in pdb):
        raise ConfigError(f"config.data.per_device_batch={pdb} needs one positive size per base area "
                          f"{table.sides} of config.data.buckets={d.buckets!r}")
    if d.area_mixture and len(d.area_mixture) != table.num_areas:
        raise ConfigError(f"config.data.area_mixture={tuple(d.area_mixture)} needs one weight per base area "
                          f"{table.sides}")
    if d.min_area < 0 or d.max_upscale <= 0:
        raise ConfigError("config.data.min_area must be >= 0 and config.data.max_upscale positive")
    try:
        list_shard_files(d.path)
    except FileNotFoundError as e:
        raise ConfigError(f"config.data.path={d.path!r} holds no shards ({e}); build them with "
                          "tools/build_shards.py") from None


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
    return _load_encoders(config)[:4]


def _load_encoders(config):
    """load_encoders plus the text encoder's PromptEncodingConfig (max_length, txt_offset), its tokenizer
    and its GptOssConfig."""
    from lens_jax.pipeline import FrozenVAE, resolve_path
    from lens_jax.text.tiny_encoder import load_text_encoder
    vae = FrozenVAE(resolve_path(config.vae.checkpoint, "config.vae.checkpoint"))
    te = config.text_encoder
    encode_text, tokenizer, prompt_cfg, enc_cfg = load_text_encoder(
        resolve_path(te.checkpoint, "config.text_encoder.checkpoint"), te.tokenizer or None,
        trim_to=te.trim_to or None)
    return vae, encode_text, enc_cfg.hidden_size, len(enc_cfg.selected_layers), prompt_cfg, tokenizer, enc_cfg


def online_encoders(config, mesh, vae, enc_cfg, prompt_cfg, example):
    """(encode_fn, encoder_params, encoder_shardings) for data.features='online': the frozen VAE and text
    encoder restored from their checkpoints straight into sharded targets (config.sharding.vae_rules /
    text_encoder_rules), run inside the jitted step by `make_online_encoder`.

    example: a raw batch (pixels, input_ids, attention_mask) giving the init shapes.
    """
    from lens_jax.checkpoints.orbax_io import restore_weights
    from lens_jax.models.gpt_oss import GptOssEncoder
    from lens_jax.models.vae import FluxVAE
    from lens_jax.pipeline import resolve_path
    from lens_jax.train.state import abstract_frozen_variables
    from lens_jax.train.step import make_online_encoder

    vae_dtype, te_dtype = DTYPES[config.vae.dtype], DTYPES[config.text_encoder.dtype]
    vae_model = FluxVAE(vae.config, dtype=vae_dtype)
    te_model = GptOssEncoder(enc_cfg, dtype=te_dtype, param_dtype=te_dtype)
    try:
        vae_rules = sharding_lib.validate_rules(config.sharding.vae_rules)
        te_rules = sharding_lib.validate_rules(config.sharding.text_encoder_rules)
    except ValueError as e:
        raise ConfigError(f"config.sharding: {e}") from None
    px = jax.ShapeDtypeStruct((1,) + example["pixels"].shape[1:], jnp.float32)
    ids = jax.ShapeDtypeStruct((1, example["input_ids"].shape[1]), jnp.int32)
    msk = jax.ShapeDtypeStruct((1, example["attention_mask"].shape[1]), jnp.bool_)
    a_vae, s_vae = abstract_frozen_variables(vae_model, (px,), mesh, vae_rules)
    a_te, s_te = abstract_frozen_variables(te_model, (ids, msk), mesh, te_rules, dtype=te_dtype,
                                           collections=("params",))
    vae_dir = resolve_path(config.vae.checkpoint, "config.vae.checkpoint")
    te_dir = resolve_path(config.text_encoder.checkpoint, "config.text_encoder.checkpoint")
    try:
        params = dict(vae=restore_weights(vae_dir, a_vae), text_encoder=restore_weights(te_dir, a_te))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"the frozen encoder checkpoints ({vae_dir}, {te_dir}) do not fit the models built "
                          f"from config.vae / config.text_encoder: {e}") from None
    encode_fn = make_online_encoder(vae_model, te_model, txt_offset=int(prompt_cfg.txt_offset),
                                    vae_rules=vae_rules, text_rules=te_rules,
                                    feature_dtype=DTYPES[config.model.dtype])
    return encode_fn, params, dict(vae=s_vae, text_encoder=s_te)


def text_length(config, prompt_cfg) -> int:
    """The fixed text length of shard batches: data.max_text_tokens, or the encoder's max_length - txt_offset."""
    n = int(config.data.get("max_text_tokens", 0) or 0)
    return n if n > 0 else int(prompt_cfg.max_length) - int(prompt_cfg.txt_offset)


def restore_trained_params(config, model, ckpt_dir: str):
    """(EMA parameters if config.ema_decay > 0 else the raw ones, step) of the newest checkpoint in ckpt_dir.

    The abstract train state of this config (one-host mesh) is the restore target; raises ConfigError when
    the directory holds no complete checkpoint.
    """
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {ckpt_dir}: run the pretrain phase first")
    mesh = sharding_lib.make_mesh(config.mesh.shape)
    optimizer, _ = make_optimizer(config.optim, config.num_steps)
    use_ema = config.ema_decay > 0
    abstract, _ = abstract_train_state(model, optimizer, dummy_inputs(model.config), mesh,
                                       sharding_lib.validate_rules(config.sharding.rules), use_ema)
    ckpt = TrainCheckpointer(ckpt_dir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}")
        state = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return (state["ema_params"] if use_ema else state["params"]), step


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


def loop_options(config, dit_config, n_img: int = 0, n_txt: int = 0, log=print, terms=None) -> LoopOptions:
    """Loop settings from the config, with tokens per step and the MFU inputs (model FLOPs, peak FLOP/s).

    terms: [(expected micro-batches per step, global batch, image tokens)] of a step's micro-batches;
    default one batch of config.batch_size x n_img.
    """
    terms = terms or [(1.0, config.batch_size, n_img)]
    parts = [(q, train_flops_per_step(dit_config, b, n, n_txt)) for q, b, n in terms]
    flops = sum(q * f for q, f in parts) if all(f for _, f in parts) else None
    dev = jax.devices()[0]
    peak = peak_tflops_per_device(dev.device_kind, dev.platform, config.peak_tflops)
    peak_flops = peak * 1e12 * jax.device_count() if peak else None
    if flops:
        log(f"model FLOPs per step {flops:.4g} (3x analytic forward); MFU "
            + (f"against {peak:g} TFLOP/s x {jax.device_count()} devices" if peak_flops
               else f"not reported ({dev.device_kind}: set config.peak_tflops)"))
    return LoopOptions(num_steps=config.num_steps, log_every=config.log_every,
                       max_nonfinite_steps=config.max_nonfinite_steps,
                       tokens_per_step=sum(q * b * (n + n_txt) for q, b, n in terms), flops_per_step=flops,
                       peak_flops=peak_flops)


def shard_pipeline(config, mesh, say):
    """The shard pipeline of this process (data parallel size of the mesh, this process's slice)."""
    from lens_jax.data.shard_pipeline import build_pipeline
    dp = sharding_lib.data_parallel_size(mesh)
    try:
        pipe = build_pipeline(config.data, data_parallel=dp, seed=config.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
    except ValueError as e:
        raise ConfigError(f"config.data (shard pipeline): {e}") from None
    o, table = pipe.opts, pipe.opts.table
    say(f"shards: {len(pipe.source)} records in {len(pipe.source.files)} shard(s) of {config.data.path}"
        + (f" ({len(pipe.source.bad_shards)} unreadable, left out)" if pipe.source.bad_shards else "")
        + f"; areas {list(table.sides)} with {[len(b) for b in table.buckets]} buckets, global micro-batches "
        f"{list(o.global_sizes())} (per device {list(o.per_device_batch)} x {dp}), "
        f"{pipe.plan.k} micro-batch(es) per step")
    return pipe


def run(config, workdir: str):
    validate(config)
    distributed.initialize_from_env()
    primary = distributed.is_primary()
    say = (lambda msg: print(msg, flush=True)) if primary else (lambda msg: None)
    t_start = time.time()
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    vae, encode_text, hidden, n_layers, prompt_cfg, tokenizer, enc_cfg = _load_encoders(config)
    model = build_dit(config, vae.token_channels, hidden, n_layers)
    mesh = sharding_lib.mesh_from_config(config)
    rules = sharding_lib.validate_rules(config.sharding.rules)
    shards = config.data.source == "shards"
    online = config.data.get("features", "cached") == "online"
    encode_fn = encoder_params = encoder_shardings = None

    if shards:
        # Image-caption shards, encoded online per step (lens_jax/data/encoded_source.py).
        from lens_jax.data.buckets import token_grid
        pipe = shard_pipeline(config, mesh, say)
        table, opts = pipe.opts.table, pipe.opts
        n_txt = text_length(config, prompt_cfg)
        grid = token_grid(*table.buckets[0][0])                      # (h, w): the init's dummy image
        field_shardings = {k: sharding_lib.batch_sharding(mesh, nd)
                           for k, nd in (("img", 3), ("img_pos", 3), ("txt", 3), ("txt_mask", 2), ("img_mask", 2))}
        batch_shardings = field_shardings                             # the loop: every micro-batch's fields
        jit_batch_shardings = tuple(field_shardings for _ in range(pipe.plan.k))
        for g, l in zip(opts.global_sizes(), opts.local_sizes()):
            n_rows = len(distributed.process_rows(field_shardings["img"], g))
            if n_rows != l:
                raise ConfigError(f"this process holds {n_rows} rows of a global micro-batch of {g} but the "
                                  f"pipeline gives it {l}; check config.mesh against the processes")
        terms = [(float(q), g, table.max_tokens(a))
                 for a, (q, g) in enumerate(zip(pipe.plan.quotas, opts.global_sizes())) if q > 0]
        say(f"  text: {n_txt} tokens per caption (fixed); image tokens per area "
            f"{[table.max_tokens(a) for a in range(table.num_areas)]}")
    elif online:
        # The shapes world kept raw (uint8 images, tokenised captions); the frozen encoders run inside the
        # jitted step. Same examples and batch order as the cache below.
        from lens_jax.data.raw_source import build_shapes_raw
        say(f"tokenising {config.data.num_examples} shapes-world examples ({config.data.caption} captions) for "
            "online encoding...")
        data = build_shapes_raw(config, tokenizer, prompt_cfg)
        say(f"  raw: pixels {data.pixels.shape} uint8, token ids {data.input_ids.shape} "
            f"(text {data.text_len} tokens after the offset) in {time.time() - t_start:.1f}s")
        n_txt, grid = data.text_len, data.grid
        example = data.example_batch(1)
        batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in example.items()}
        jit_batch_shardings = batch_shardings
        terms = [(1.0, config.batch_size, grid[0] * grid[1])]
        encode_fn, encoder_params, encoder_shardings = online_encoders(config, mesh, vae, enc_cfg, prompt_cfg,
                                                                       example)
    else:
        # The shapes world, encoded once into a cache (research scale; every process encodes the same cache
        # and feeds its own rows of each global batch).
        from lens_jax.data.latent_cache import build_shapes_cache
        say(f"encoding {config.data.num_examples} shapes-world examples ({config.data.caption} captions)...")
        data = build_shapes_cache(config, vae, encode_text)
        say(f"  cache: image tokens {data.img.shape}, text {data.txt.shape} in {time.time() - t_start:.1f}s")
        n_txt, grid = data.txt.shape[1], data.grid
        batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in data.example_batch(1).items()}
        jit_batch_shardings = batch_shardings
        terms = [(1.0, config.batch_size, data.img.shape[1])]

    optimizer, schedule = make_optimizer(config.optim, config.num_steps)
    use_ema = config.ema_decay > 0
    dummy = dummy_inputs(model.config, batch=1, h=grid[0], w=grid[1], text_len=n_txt)

    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                             save_interval_steps=config.checkpoint_every, keep_every=config.keep_every,
                             cleanup_tmp=True)
    abstract, shardings = abstract_train_state(model, optimizer, dummy, mesh, rules, use_ema)
    start = resolve_start(ckpt, abstract,
                          lambda: create_train_state(model, optimizer, dummy, mesh, rules, config.seed, use_ema)[0],
                          resume_from=config.resume_from, init_from=config.init_from, model_config=model.config,
                          log=say)
    state = start.state
    if start.origin != "scratch":
        say(start.description)
    say(f"DiT {config.model.preset}: {param_count(state):,} parameters; mesh {dict(mesh.shape)}")

    mu_rule = dict(mu_lo=config.timestep.mu_lo, mu_hi=config.timestep.mu_hi, n_lo=config.timestep.n_lo,
                   n_hi=config.timestep.n_hi)
    step_fn = make_train_step(model, optimizer, schedule, mu=config.timestep.mu, mu_rule=mu_rule,
                              sigma_std=config.timestep.std, caption_dropout=config.data.caption_dropout,
                              ema_decay=config.ema_decay, rules=rules,
                              grad_accum_steps=int(config.get("grad_accum_steps", 1)), encode_fn=encode_fn)
    in_shardings = (shardings, jit_batch_shardings) + (() if encode_fn is None else (encoder_shardings,))
    with jax.set_mesh(mesh):
        jit_step = jax.jit(step_fn, in_shardings=in_shardings,
                           out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
    if encode_fn is None:
        train_step = jit_step
    else:
        def train_step(state, batch):
            return jit_step(state, batch, encoder_params)

    if shards:
        from lens_jax.data.encoded_source import EncodedSource
        source = EncodedSource(iter(pipe), vae.encode_tokens, encode_text, n_txt)
        if start.data_state is not None:
            try:
                source.set_state(start.data_state)
            except (ValueError, KeyError) as e:
                source.close()
                raise ConfigError(f"the checkpoint's data iterator state does not fit this shard pipeline: {e}. "
                                  "Resume with the same data settings, or start a new workdir "
                                  "(config.init_from for weights only)") from None
        elif start.step > 0:
            say(f"warning: the checkpoint of step {start.step} has no shard iterator state; the data start over")
    else:
        # This process's rows of every global batch; the batch order is a pure function of (seed, step).
        # Possibly strided rows (BATCH_AXES = ('fsdp', 'data')), in global order (distributed.rows_of_devices).
        rows = distributed.process_rows(batch_shardings["img_pos"], config.batch_size)

        def batch_fn(step):
            return distributed.take_rows(data.batch(step, config.batch_size, config.seed), rows, config.batch_size)

        source = StepIndexedSource(batch_fn, step=start.step)
        if start.data_state is not None:
            source.set_state(start.data_state)

    options = loop_options(config, model.config, n_txt=n_txt, log=say, terms=terms)

    from lens_jax.pipeline import LensPipeline
    pipeline = LensPipeline(model, None, encode_text, vae)

    def eval_params(state):
        return distributed.host_tree(state["ema_params"] if use_ema else state["params"])

    def on_step(step, state):
        if config.sample_every and step % config.sample_every == 0 and step < config.num_steps:
            params = eval_params(state)
            if primary:
                sample_grid(pipeline, config, params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))

    writer = MetricsWriter(workdir, tensorboard=config.tensorboard, resume_at=start.step, log=say) if primary else None
    progress = Progress(config.num_steps, start=start.step) if primary else None
    try:
        result = train_loop(state, train_step, source, mesh=mesh, batch_shardings=batch_shardings, options=options,
                            checkpointer=ckpt, config_json=config.to_json_best_effort(), writer=writer,
                            progress=progress, on_step=on_step, log=say)
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()
        if hasattr(source, "close"):
            source.close()
    state, step = result.state, result.step
    if result.preempted:
        say(f"stopped by SIGTERM at step {step} after {time.time() - t_start:.0f}s; rerun the same command to resume")
        return dict(preempted=True, step=step)
    say(f"training done at step {step} in {time.time() - t_start:.0f}s; checkpoint in {ckpt.directory}")

    final_params = eval_params(state)
    if not primary:
        return None
    sample_grid(pipeline, config, final_params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))
    result = None
    if config.eval.enabled:
        # ShapesEval needs only the pipeline (prompts are generated), so it also runs after training on
        # shapes-world shards.
        from lens_jax.phases.evaluate import evaluate_shapes
        pipeline.params = final_params
        result = evaluate_shapes(pipeline, config, os.path.join(workdir, "eval"))
    say(f"total {time.time() - t_start:.0f}s")
    return result
