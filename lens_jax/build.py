"""The one model builder: the DiT, the frozen VAE and text encoder, their train-state nets and the pipeline, from
config, for every phase and tool.

    enc = load_encoders(config)                   # Encoders: FrozenVAE, prompt encoder, widths, tokenizer
    model = build_dit(config, enc)                # MMDiT whose input widths fit the encoders (+ LoRA: config.lora)
    net = dit_net(config, model, dummy)           # the trainable 'dit' Net (optimizer, schedule, EMA, policy)
    params, what = restore_dit(config, model, source)   # weights for sampling / evaluation
    pipeline = build_pipeline(model, params, enc)

Checkpoint paths are resolved against the working directory, then the repository root (`data/tiny/...`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import jax

from lens_jax.configs.base import ConfigError, dtype_of
from lens_jax.models.mmdit import MMDiT, mmdit_config
from lens_jax.train import sharding as sharding_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str, option: str) -> str:
    """An existing path, trying CWD then the repository root; ConfigError naming `option` otherwise."""
    if not path:
        raise ConfigError(f"{option} is empty; set --{option}=/path/to/checkpoint")
    for p in (path, os.path.join(REPO_ROOT, path)):
        if os.path.exists(p):
            return os.path.abspath(p)
    raise ConfigError(f"{option}={path!r} does not exist")


@dataclasses.dataclass(frozen=True)
class Encoders:
    """The frozen encoders of a config and what the DiT needs to know about them."""
    vae: Any                       # lens_jax.pipeline.FrozenVAE
    encode_text: Callable          # prompts -> TextFeatures(features [B, L, F], mask [B, L])
    prompt: Any                    # PromptEncodingConfig (max_length, txt_offset, pad_id, date)
    tokenizer: Any
    text_config: Any               # GptOssConfig of the encoder

    @property
    def token_channels(self) -> int:
        return self.vae.token_channels

    @property
    def text_dim(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_text_layers(self) -> int:
        return len(self.text_config.selected_layers)


def load_encoders(config) -> Encoders:
    """The VAE of config.vae.checkpoint and the text encoder of config.text_encoder.checkpoint (+ tokenizer)."""
    from lens_jax.pipeline import FrozenVAE
    from lens_jax.text.tiny_encoder import load_text_encoder
    vae = FrozenVAE(resolve_path(config.vae.checkpoint, "config.vae.checkpoint"))
    te = config.text_encoder
    encode_text, tokenizer, prompt_cfg, enc_cfg = load_text_encoder(
        resolve_path(te.checkpoint, "config.text_encoder.checkpoint"), te.tokenizer or None,
        trim_to=te.trim_to or None)
    return Encoders(vae=vae, encode_text=encode_text, prompt=prompt_cfg, tokenizer=tokenizer, text_config=enc_cfg)


def build_dit(config, encoders: Optional[Encoders] = None, *, attention: Optional[str] = None) -> MMDiT:
    """The MMDiT of config.model; with `encoders` its input widths are checked against what they produce.

    attention: override config.model.attention (compile_only on CPU replaces 'cudnn' by 'xla')."""
    try:
        cfg = mmdit_config(config.model.preset)
    except ValueError as e:
        raise ConfigError(f"config.model.preset: {e}") from None
    if encoders is not None:
        want = dict(in_channels=encoders.token_channels, out_channels=encoders.token_channels,
                    text_dim=encoders.text_dim, num_text_layers=encoders.num_text_layers)
        bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
        if bad:
            raise ConfigError(f"config.model.preset={config.model.preset!r} does not fit the encoders: "
                              + ", ".join(f"{k} is {a} but the encoders give {b}" for k, (a, b) in bad.items()))
    m = config.model
    return MMDiT(cfg, attention=attention or m.attention, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                 dtype=dtype_of(m.dtype, "config.model.dtype"), param_dtype=dtype_of(m.param_dtype,
                                                                                     "config.model.param_dtype"),
                 lora=lora_spec(config))


def lora_spec(config):
    """The LoraSpec of config.lora (rank, alpha, targets; lens_jax/models/lora.py), None without one or at rank 0
    (full fine-tuning)."""
    c = config.get("lora")
    if c is None or int(c.rank) == 0:
        return None
    from lens_jax.models.lora import LoraSpec
    try:
        return LoraSpec(rank=int(c.rank), alpha=float(c.alpha), targets=c.targets)
    except ValueError as e:
        raise ConfigError(f"config.lora: {e}") from None


def dit_rules(config) -> Tuple:
    try:
        return sharding_lib.validate_rules(config.sharding.rules)
    except ValueError as e:
        raise ConfigError(f"config.sharding.rules: {e}") from None


def dit_net(config, model: MMDiT, dummy, *, name: str = "dit", load: Optional[Callable] = None):
    """The trainable DiT Net: config.optim (AdamW, schedule, policy) over config.num_steps, config.ema_decay,
    config.sharding.rules; `dummy` = init inputs (models.mmdit.dummy_inputs); `load` = its weight source."""
    from lens_jax.train.optim import make_optimizer
    from lens_jax.train.state import Net
    tx, schedule = make_optimizer(config.optim, config.num_steps)
    return Net(name, init=lambda key: model.init(key, **dummy)["params"], rules=dit_rules(config), optimizer=tx,
               schedule=schedule, policy=tuple(tuple(p) for p in config.optim.get("policy", ()) or ()),
               ema_decay=float(config.ema_decay), load=load)


@dataclasses.dataclass(frozen=True)
class OnlineEncoding:
    """The frozen encoder nets of a train state that encodes raw batches inside the step."""
    nets: Tuple[Any, ...]          # Net('vae'), Net('text_encoder'): frozen, not checkpointed
    encode_fn: Callable            # (encoder params, raw batch) -> DiT inputs (diffusion/flow_matching.py)
    token_channels: int


def online_encoding(config, vae_config, text_config, txt_offset: int, example: dict,
                    load: bool = True) -> OnlineEncoding:
    """Frozen Nets 'vae' and 'text_encoder' and the in-step encoder for raw batches (config.data.features=
    'online'): sharded by config.sharding.vae_rules / text_encoder_rules and, with `load`, restored from
    config.vae.checkpoint / config.text_encoder.checkpoint at every start (without: initialised from the
    presets, for compile_only's abstract plan). txt_offset: the template prefix the encoder output loses;
    example: a raw batch (pixels, input_ids, attention_mask) giving the init shapes."""
    import jax.numpy as jnp

    from lens_jax.checkpoints.orbax_io import restore_weights
    from lens_jax.diffusion.flow_matching import make_online_encoder
    from lens_jax.models.gpt_oss import GptOssEncoder
    from lens_jax.models.vae import FluxVAE
    from lens_jax.train.state import Net

    vae_dtype = dtype_of(config.vae.dtype, "config.vae.dtype")
    te_dtype = dtype_of(config.text_encoder.dtype, "config.text_encoder.dtype")
    vae_model = FluxVAE(vae_config, dtype=vae_dtype)
    te_model = GptOssEncoder(text_config, dtype=te_dtype, param_dtype=te_dtype)
    try:
        vae_rules = sharding_lib.validate_rules(config.sharding.vae_rules)
        te_rules = sharding_lib.validate_rules(config.sharding.text_encoder_rules)
    except ValueError as e:
        raise ConfigError(f"config.sharding: {e}") from None
    px = jnp.zeros((1,) + tuple(example["pixels"].shape[1:]), jnp.float32)
    ids = jnp.zeros((1, example["input_ids"].shape[1]), jnp.int32)
    msk = jnp.ones((1, example["attention_mask"].shape[1]), bool)

    def loader(option, path):
        if not load:
            return None
        path = resolve_path(path, option)

        def load_fn(abstract):
            try:
                return restore_weights(path, abstract)
            except (ValueError, KeyError) as e:
                raise ConfigError(f"{option}={path} does not fit the model built from config: {e}") from None
        return load_fn

    nets = (Net("vae", init=lambda key: vae_model.init(key, px), rules=vae_rules, checkpoint=False,
                load=loader("config.vae.checkpoint", config.vae.checkpoint)),
            Net("text_encoder", init=lambda key: {"params": te_model.init(key, ids, msk)["params"]}, rules=te_rules,
                dtype=te_dtype, checkpoint=False,
                load=loader("config.text_encoder.checkpoint", config.text_encoder.checkpoint)))
    encode_fn = make_online_encoder(vae_model, te_model, txt_offset=int(txt_offset), vae_rules=vae_rules,
                                    text_rules=te_rules, feature_dtype=dtype_of(config.model.dtype))
    return OnlineEncoding(nets=nets, encode_fn=encode_fn, token_channels=vae_config.packed_channels)


def abstract_dit_params(config, model: MMDiT, mesh) -> Any:
    """The DiT's parameters as sharded ShapeDtypeStructs (a restore target; nothing allocated)."""
    import flax.linen as nn

    from lens_jax.models.mmdit import dummy_inputs
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(model.config)))["params"]
    shardings = sharding_lib.logical_shardings(boxed, mesh, dit_rules(config))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                        shardings)


def restore_dit(config, model: MMDiT, source: str, params: str = "", mesh=None) -> Tuple[Any, str]:
    """(DiT parameters, description) from `source` for sampling and evaluation; never reads optimiser state.

    source: a converted weights directory (tools/convert_checkpoint.py --kind=lens_dit), or a run workdir /
    checkpoints directory / checkpoint step directory. params: which weights of a run: '<net>' (e.g. 'dit',
    'student') or '<net>.ema'; '' = 'dit.ema' when that run keeps an EMA of 'dit', else 'dit' ('student' for a
    distill run, which has no 'dit').
    """
    from lens_jax.checkpoints import orbax_io
    from lens_jax.train.checkpoints import CheckpointMismatchError
    from lens_jax.train.resume import open_run
    from lens_jax.train.state import EMA_SUFFIX
    mesh = mesh or sharding_lib.make_mesh(config.mesh.shape)
    target = abstract_dit_params(config, model, mesh)
    src = os.path.abspath(source)
    if os.path.exists(os.path.join(src, orbax_io.META_FILE)):
        from lens_jax.train.resume import weights_from
        if params:
            raise ConfigError(f"{src} is a converted weights checkpoint (one set of weights); params={params!r} "
                              "names weights of a training run")
        return weights_from(src, "dit", option="checkpoint", kind="lens_dit", model_config=model.config,
                            log=lambda *_: None)(target), f"converted weights {src}"
    ckpt_dir, step, ckpt = open_run(src, "checkpoint")
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}: run a training phase first")
        choice = params
        if not choice:      # a distill run holds no 'dit': its 'student' is the model it trained
            net = "student" if not ckpt.has_item(step, "dit") and ckpt.has_item(step, "student") else "dit"
            choice = f"{net}.ema" if ckpt.has_item(step, net) and _has_ema(ckpt, step, net) else net
        net, part = (choice[:-len(EMA_SUFFIX)], "ema") if choice.endswith(EMA_SUFFIX) else (choice, "params")
        if not ckpt.has_item(step, net):
            raise ConfigError(f"{ckpt_dir} step {step} holds no net {net!r} (it holds {ckpt.nets_at(step)}); "
                              "choose one of those (or '<net>.ema')")
        try:
            weights = ckpt.restore_weights(step, net, target, part=part)
        except CheckpointMismatchError:
            raise
        return weights, f"{choice} of {ckpt_dir} step {step}"
    finally:
        ckpt.close()


def _has_ema(ckpt, step: int, net: str) -> bool:
    try:
        return "ema" in (getattr(ckpt.manager.item_metadata(step)[net], "tree", None) or {})
    except Exception:   # noqa: BLE001 - unreadable metadata: take the raw weights
        return False


def build_pipeline(model: MMDiT, params, encoders: Encoders):
    """The text-to-image pipeline (lens_jax/pipeline.py) of a DiT and the encoders."""
    from lens_jax.pipeline import LensPipeline
    return LensPipeline(model, params, encoders.encode_text, encoders.vae)
