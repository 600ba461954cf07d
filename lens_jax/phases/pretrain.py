"""The `pretrain` phase: flow-matching DiT training with periodic samples, checkpoints and evaluation.

Writes into the workdir:
  metrics.jsonl            one JSON object per logged step (loss, norms, lr, skipped, step time, tokens/s, MFU)
  tensorboard/             the same scalars as TensorBoard event files (config.tensorboard)
  checkpoints/             Orbax items per net ('dit': params, optimiser, EMA), train, data_iter, config
  samples/step_XXXXXX.png  sample grids of config.sample.prompts
  eval/                    synthetic GenEval (config.eval.enabled; lens_jax/eval/geneval.py)
  config.json

Data (config.data.source):
  shapes   the synthetic shapes world, encoded once into an in-memory cache (lens_jax/data/latent_cache.py);
           the batch order is a pure function of (seed, step); config.batch_size images per step.
           With config.data.features='online' the examples are kept raw instead (uint8 pixels and tokenised
           captions, lens_jax/data/raw_source.py: same examples, same batch order) and the frozen encoders,
           nets 'vae' and 'text_encoder' of the train state (lens_jax/build.py online_encoding), run inside
           the jitted step.
  shards   ArrayRecord image-caption shards in config.data.path (tools/build_shards.py) through the bucketed
           Grain pipeline (lens_jax/data/shard_pipeline.py), VAE- and text-encoded every step outside
           the jitted step (lens_jax/data/encoded_source.py). A step is a tuple of micro-batches, one per
           scheduled base area, each of per_device_batch[area] x data-parallel size images; text is cut or
           padded to a fixed length (data.max_text_tokens, or the encoder's max_length - txt_offset when 0).
           The iterator state is checkpointed ('data_iter'), so a resumed run continues the data exactly.
           metrics.jsonl rows also hold the data statistics (data/...: padding, buckets, skips, areas).

The phase wires: the DiT Net and its objective (`pretrain_state`, also what compile_only plans), the data
source and the callbacks; the trainer (lens_jax/train/trainer.py) owns the loop, checkpoints and resume.
Several processes (SLURM or JAX_COORDINATOR_ADDRESS) are set up by lens_jax/train/distributed.py, each
feeding its own rows of every global batch. Only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax

from lens_jax import build, phases, reasoner
from lens_jax.configs.base import ConfigError, validate_common, validate_trainer
from lens_jax.diffusion.flow_matching import flow_matching_objective
from lens_jax.models.mmdit import dummy_inputs
from lens_jax.train import distributed
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.loop import LoopOptions, StepIndexedSource
from lens_jax.train.metrics import peak_tflops_per_device, train_flops_per_step
from lens_jax.train.optim import validate_optim
from lens_jax.train.resume import weights_from
from lens_jax.train.state import TrainSpec, param_count
from lens_jax.train.trainer import fit

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
    validate_trainer(config)
    validate_optim(config.optim)
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay={config.ema_decay} must be in [0, 1)")
    if config.peak_tflops < 0:
        raise ConfigError(f"config.peak_tflops={config.peak_tflops} must be >= 0 (0 = from the device kind)")
    if config.init_from and not os.path.exists(config.init_from):
        raise ConfigError(f"config.init_from={config.init_from} does not exist")


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


def pretrain_state(config, model, dummy, online=None, init_from: str = ""):
    """(TrainSpec, [flow-matching Objective], DiT rules) of pretraining: the trainable 'dit' Net (config.optim,
    config.ema_decay, weights from `init_from` when given) plus, with `online` (build.OnlineEncoding), the
    frozen encoder nets. The real run and compile_only both build the step from this."""
    load = None
    if init_from:
        load = weights_from(init_from, "dit", option="config.init_from", kind="lens_dit", model_config=model.config)
    nets = [build.dit_net(config, model, dummy, load=load)] + list(online.nets if online is not None else ())
    rules = build.dit_rules(config)
    t = config.timestep
    objective = flow_matching_objective(
        model, mu=t.mu, mu_rule=dict(mu_lo=t.mu_lo, mu_hi=t.mu_hi, n_lo=t.n_lo, n_hi=t.n_hi), sigma_std=t.std,
        caption_dropout=config.data.caption_dropout, rules=rules,
        encoder=None if online is None else online.encode_fn,
        token_channels=None if online is None else online.token_channels)
    return TrainSpec(nets, seed=config.seed), [objective], rules


def text_length(config, prompt_cfg) -> int:
    """The fixed text length of shard batches: data.max_text_tokens, or the encoder's max_length - txt_offset."""
    n = int(config.data.get("max_text_tokens", 0) or 0)
    return n if n > 0 else int(prompt_cfg.max_length) - int(prompt_cfg.txt_offset)


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


@dataclasses.dataclass
class TrainingData:
    """What a phase training on image-caption data needs from `training_data`."""
    n_txt: int                       # text tokens per example
    grid: tuple                      # (h, w) token grid of the init's dummy image
    batch_shardings: dict            # the loop's: every (micro-)batch's fields
    jit_batch_shardings: Any         # the step's batch argument (a tuple for shard micro-batches)
    terms: list                      # [(micro-batches per step, global batch, image tokens)] (loop_options)
    online: Any                      # build.OnlineEncoding or None
    make_source: Callable            # Start -> the batch source
    cache: Any = None                # the shapes-world EncodedDataset (source=shapes, features=cached)


def training_data(config, enc, mesh, say, t_start: float, select: Optional[Callable] = None) -> TrainingData:
    """The batches of config.data (module docstring): shards through the bucketed pipeline, the shapes world kept
    raw for online encoding, or the shapes world encoded once into a cache. select: cache -> cache (the cached
    shapes world only; e.g. distillation leaves out captions that are evaluation prompts)."""
    shards = config.data.source == "shards"
    online = None
    data = pipe = None
    if shards:
        # Image-caption shards, encoded online per step (lens_jax/data/encoded_source.py).
        from lens_jax.data.buckets import token_grid
        pipe = shard_pipeline(config, mesh, say)
        table, opts = pipe.opts.table, pipe.opts
        n_txt = text_length(config, enc.prompt)
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
    elif config.data.get("features", "cached") == "online":
        # The shapes world kept raw (uint8 images, tokenised captions); the frozen encoders run inside the
        # jitted step. Same examples and batch order as the cache below.
        from lens_jax.data.raw_source import build_shapes_raw
        say(f"tokenising {config.data.num_examples} shapes-world examples ({config.data.caption} captions) for "
            "online encoding...")
        data = build_shapes_raw(config, enc.tokenizer, enc.prompt)
        say(f"  raw: pixels {data.pixels.shape} uint8, token ids {data.input_ids.shape} "
            f"(text {data.text_len} tokens after the offset) in {time.time() - t_start:.1f}s")
        n_txt, grid = data.text_len, data.grid
        example = data.example_batch(1)
        batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in example.items()}
        jit_batch_shardings = batch_shardings
        terms = [(1.0, config.batch_size, grid[0] * grid[1])]
        online = build.online_encoding(config, enc.vae.config, enc.text_config, enc.prompt.txt_offset, example)
    else:
        # The shapes world, encoded once into a cache (research scale; every process encodes the same cache
        # and feeds its own rows of each global batch).
        from lens_jax.data.latent_cache import build_shapes_cache
        say(f"encoding {config.data.num_examples} shapes-world examples ({config.data.caption} captions)...")
        data = build_shapes_cache(config, enc.vae, enc.encode_text)
        say(f"  cache: image tokens {data.img.shape}, text {data.txt.shape} in {time.time() - t_start:.1f}s")
        if select is not None:
            data = select(data)
        n_txt, grid = data.txt.shape[1], data.grid
        batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in data.example_batch(1).items()}
        jit_batch_shardings = batch_shardings
        terms = [(1.0, config.batch_size, data.img.shape[1])]

    def make_source(start):
        if shards:
            from lens_jax.data.encoded_source import EncodedSource
            source = EncodedSource(iter(pipe), enc.vae.encode_tokens, enc.encode_text, n_txt)
            if start.data_state is not None:
                try:
                    source.set_state(start.data_state)
                except (ValueError, KeyError) as e:
                    source.close()
                    raise ConfigError(f"the checkpoint's data iterator state does not fit this shard pipeline: "
                                      f"{e}. Resume with the same data settings, or start a new workdir "
                                      "(config.init_from for weights only)") from None
            elif start.step > 0:
                say(f"warning: the checkpoint of step {start.step} has no shard iterator state; the data start "
                    "over")
            return source
        # This process's rows of every global batch; the batch order is a pure function of (seed, step).
        # Possibly strided rows (BATCH_AXES = ('fsdp', 'data')), in global order (distributed.rows_of_devices).
        rows = distributed.process_rows(batch_shardings["img_pos"], config.batch_size)
        source = StepIndexedSource(
            lambda step: distributed.take_rows(data.batch(step, config.batch_size, config.seed), rows,
                                               config.batch_size), step=start.step)
        if start.data_state is not None:
            source.set_state(start.data_state)
        return source

    return TrainingData(n_txt=n_txt, grid=grid, batch_shardings=batch_shardings,
                        jit_batch_shardings=jit_batch_shardings, terms=terms, online=online, make_source=make_source,
                        cache=data if (not shards and online is None) else None)


def run(config, workdir: str):
    validate(config)
    primary, say = phases.start(config, workdir)
    t_start = time.time()

    enc = build.load_encoders(config)
    # Built before training, so a bad reasoner setting (missing system-prompt file, unreachable endpoint) fails now.
    rewriter = reasoner.build_rewriter(config, enc, workdir) if config.eval.enabled and primary else None
    model = build.build_dit(config, enc)
    mesh = sharding_lib.mesh_from_config(config)
    data = training_data(config, enc, mesh, say, t_start)
    n_txt, grid, online = data.n_txt, data.grid, data.online
    batch_shardings, jit_batch_shardings, terms = data.batch_shardings, data.jit_batch_shardings, data.terms
    dummy = dummy_inputs(model.config, batch=1, h=grid[0], w=grid[1], text_len=n_txt)
    spec, objectives, rules = pretrain_state(config, model, dummy, online, init_from=config.init_from)

    def on_start(start):
        say(f"DiT {config.model.preset}: {param_count(start.state, 'dit'):,} parameters; mesh {dict(mesh.shape)}")

    options = loop_options(config, model.config, n_txt=n_txt, log=say, terms=terms)
    pipeline = build.build_pipeline(model, None, enc)
    eval_net = "dit.ema" if config.ema_decay > 0 else "dit"

    def eval_params(state):
        return distributed.host_tree(spec.eval_params(state, eval_net))

    def on_step(step, state):
        if config.sample_every and step % config.sample_every == 0 and step < config.num_steps:
            params = eval_params(state)
            if primary:
                sample_grid(pipeline, config, params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))

    result = fit(config, workdir, spec, objectives, data.make_source, mesh=mesh, batch_shardings=batch_shardings,
                 jit_batch_shardings=jit_batch_shardings, options=options, rules=rules, on_step=on_step,
                 on_start=on_start, say=say)
    state, step = result.state, result.step
    if result.preempted:
        say(f"stopped by SIGTERM at step {step} after {time.time() - t_start:.0f}s; rerun the same command to resume")
        return dict(preempted=True, step=step)
    say(f"training done at step {step} in {time.time() - t_start:.0f}s; checkpoint in "
        f"{os.path.join(workdir, 'checkpoints')}")

    final_params = eval_params(state)
    if not primary:
        return None
    sample_grid(pipeline, config, final_params, os.path.join(workdir, "samples", f"step_{step:06d}.png"))
    summary = None
    if config.eval.enabled:
        # ShapesEval needs only the pipeline (prompts come from the world or a metadata file), so it also runs
        # after training on shapes-world shards.
        from lens_jax.eval.geneval import evaluate_with_reasoner
        pipeline.params = final_params
        summary = evaluate_with_reasoner(pipeline, config, workdir, rewriter, source=f"{eval_net} of step {step}",
                                         exclude_prompts=reasoner.dev_prompts(config))
    say(f"total {time.time() - t_start:.0f}s")
    return summary
