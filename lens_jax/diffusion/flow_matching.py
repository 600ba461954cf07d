"""DiT pretraining as an objective of the generic trainer (LENS_SPEC §6.2): rectified flow with logit-normal
sigmas, caption dropout and the token-weighted MSE, optionally encoding raw batches in the step.

    objective = flow_matching_objective(model, mu=-1.0, mu_rule=..., sigma_std=1.0, caption_dropout=0.1,
                                        rules=dit_rules)
    train_step = make_train_step(spec, [objective], grad_accum_steps=k)       # lens_jax/train/step.py

A batch (one micro-batch, leading axis = its batch B) holds DiT inputs
  img [B, N, C] normalised packed latents (x0), img_pos [B, N, 3] int32, txt [B, S, F] text features,
  txt_mask [B, S] bool (right-padded), img_mask [B, N] optional bool (padded aspect-ratio buckets);
or, with `encoder` (see `make_online_encoder`), raw inputs pixels [B, H, W, 3] in [-1, 1] or uint8,
input_ids [B, L] int32, attention_mask [B, L] bool (img_mask / img_pos pass through), which the frozen nets
'vae' and 'text_encoder' of the train state encode inside the step under stop_gradient.

Random draws (prepare_fn, before any micro-batch split):
  * a dict batch: one key split three ways for the whole batch (sigma, eps, caption keep), so
    grad_accum_steps only changes memory, never the draws;
  * micro-batch e of a tuple: per example from fold_in(key, offset + j), offset = examples before it, so a
    step's draws do not depend on how its examples are grouped into micro-batches.
sigma = sigmoid(mu + std n) with mu fixed or from each sample's image-token count (`mu < 0`: the stage-2
rule), x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0; caption dropout replaces a whole caption by
zero features and an all-false mask (the CFG unconditional branch). Loss: MSE over valid image tokens x
channels; a micro-batch weighs its valid element count, so accumulation gives the loss of the concatenated
batch. Metrics: sigma_mean, loss_hi_noise (mean per-example loss of the samples with sigma > 0.5).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from lens_jax.diffusion import objective as fm
from lens_jax.train.step import Mean, Objective, rules_context

FEATURE_KEYS = ("img", "img_pos", "txt", "txt_mask")
RAW_KEYS = ("pixels", "input_ids", "attention_mask")


def flow_matching_objective(model, *, mu: float, mu_rule, sigma_std: float, caption_dropout: float,
                            rules: Optional[Sequence] = None, net: str = "dit", encoder: Optional[Callable] = None,
                            token_channels: Optional[int] = None) -> Objective:
    """The pretraining Objective for net `net` (an MMDiT).

    mu < 0 selects the token-count rule `mu_rule` (dict mu_lo, mu_hi, n_lo, n_hi). rules: the DiT's logical-axis
    rules (activation constraints active inside the model). encoder: `make_online_encoder(...)`; then batches
    are raw and `token_channels` (the VAE's packed channels) gives the latent shape for the draws.
    """
    if not 0.0 <= float(caption_dropout) <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1]; got {caption_dropout}")
    if encoder is not None and not token_channels:
        raise ValueError("online encoding needs token_channels (the VAE's packed channels)")

    def mu_of(b, n_tokens, img_mask):
        if mu >= 0:
            return jnp.full((b,), mu, jnp.float32)
        n = (jnp.full((b,), n_tokens, jnp.float32) if img_mask is None
             else jnp.sum(img_mask, axis=1).astype(jnp.float32))
        return fm.timestep_mu(n, **mu_rule)

    def latent_shape(batch):
        if encoder is None:
            return batch["img"].shape
        b, h, w, _ = batch["pixels"].shape
        return (b, (h // 16) * (w // 16), int(token_channels))

    def check(batch):
        keys = RAW_KEYS if encoder is not None else FEATURE_KEYS
        missing = [k for k in keys if k not in batch]
        if missing:
            hint = ("" if encoder is not None else "; raw pixels / token ids need "
                    "flow_matching_objective(..., encoder=make_online_encoder(...))")
            raise ValueError(f"batch lacks {missing} (has {sorted(batch)}){hint}")

    def prepare(batch, key, offset):
        check(batch)
        shape = latent_shape(batch)
        b, img_mask = shape[0], batch.get("img_mask")
        mus = mu_of(b, shape[1], img_mask)
        if offset is None:
            k_sigma, k_eps, k_drop = jax.random.split(key, 3)
            sigma = fm.sample_sigma(k_sigma, b, mus, sigma_std)
            eps = jax.random.normal(k_eps, shape, jnp.float32)
            keep = jax.random.uniform(k_drop, (b,)) >= caption_dropout      # as objective.caption_dropout
        else:
            keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(offset + jnp.arange(b, dtype=jnp.uint32))
            ks = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
            n = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(ks[:, 0])
            sigma = jax.nn.sigmoid(mus + sigma_std * n)
            eps = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(ks[:, 1])
            keep = jax.vmap(lambda k: jax.random.uniform(k, ()))(ks[:, 2]) >= caption_dropout
        return dict(batch, sigma=sigma, eps=eps, keep=keep)

    def features(params, batch):
        if encoder is None:
            return batch
        enc = {k: params[k] for k in ("vae", "text_encoder")}
        return jax.lax.stop_gradient(encoder(enc, batch))

    def loss_fn(params, batch, rng):
        del rng                                   # every draw was made by prepare
        f = features(params, batch)
        x0 = f["img"]
        eps = batch["eps"].astype(x0.dtype)
        keep, sigma = batch["keep"], batch["sigma"]
        txt = jnp.where(keep[:, None, None], f["txt"], jnp.zeros((), f["txt"].dtype))
        txt_mask = f["txt_mask"].astype(bool) & keep[:, None]
        img_mask = f.get("img_mask")
        x_t = fm.noise_latents(x0, eps, sigma)
        with rules_context(rules):
            pred = model.apply({"params": params[net]}, x_t, f["img_pos"], txt, txt_mask, sigma, img_mask=img_mask)
        loss, per_example = fm.flow_matching_loss(pred, fm.velocity_target(x0, eps), img_mask)
        hi = sigma > 0.5
        return loss, dict(sigma_mean=Mean(jnp.sum(sigma), sigma.shape[0]),
                          loss_hi_noise=Mean(jnp.sum(jnp.where(hi, per_example, 0.0)), jnp.sum(hi)))

    def weight(batch):
        shape = latent_shape(batch)
        m = batch.get("img_mask")
        n = (jnp.asarray(shape[0] * shape[1], jnp.float32) if m is None
             else jnp.sum(m.astype(bool)).astype(jnp.float32))
        return n * shape[2]

    return Objective(loss_fn=loss_fn, updates=(net,), name="flow_matching", prepare_fn=prepare, weight_fn=weight)


def make_online_encoder(vae_model, text_model, *, txt_offset: int, vae_rules: Optional[Sequence] = None,
                        text_rules: Optional[Sequence] = None, feature_dtype=None) -> Callable:
    """encode_fn(encoder_params, raw_batch) -> DiT input batch, for `flow_matching_objective(encoder=...)`.

    encoder_params = {'vae': {'params': ..., 'latent_stats': {'mean', 'var'}}, 'text_encoder': {'params': ...}}
    (the frozen nets of the train state, sharded by their own rules).
    raw_batch: pixels [B, H, W, 3] float in [-1, 1] or uint8 (H, W multiples of 16; one shape per micro-batch),
    input_ids [B, L] int32 and attention_mask [B, L] bool (the Harmony-templated, right-padded prompt);
    img_mask / img_pos, if present, pass through (else the positions of the H/16 x W/16 grid).
    Output: img [B, H/16*W/16, C] (VAE posterior mode, patchified, BN-normalised), img_pos, txt
    [B, L - txt_offset, F] (the selected encoder layers, template prefix stripped, zero at padding), txt_mask:
    exactly what the cached-feature path stores (lens_jax/data/latent_cache.py).
    """
    from lens_jax.models.mmdit import image_positions
    from lens_jax.models.vae import encode_to_tokens
    from lens_jax.text.prompt_encoding import strip_offset

    def encode_fn(encoder_params, raw):
        pixels = raw["pixels"]
        if pixels.dtype == jnp.uint8:                      # data.pixel_dtype='uint8': 0..255 -> [-1, 1]
            pixels = pixels.astype(jnp.float32) / 127.5 - 1.0
        b, hh, ww, _ = pixels.shape
        if hh % 16 or ww % 16:
            raise ValueError(f"pixels must be [B,H,W,3] with H, W multiples of 16; got {pixels.shape}")
        with rules_context(vae_rules):
            img = encode_to_tokens(vae_model, encoder_params["vae"], pixels)
        with rules_context(text_rules):
            feats = text_model.apply(encoder_params["text_encoder"], raw["input_ids"].astype(jnp.int32),
                                     raw["attention_mask"].astype(bool))
        txt, txt_mask = strip_offset(feats, raw["attention_mask"], txt_offset)
        if feature_dtype is not None:
            txt = txt.astype(feature_dtype)
        pos = raw.get("img_pos")
        if pos is None:
            pos = jnp.broadcast_to(jnp.asarray(image_positions(hh // 16, ww // 16)), (b, img.shape[1], 3))
        out = dict(img=img.astype(jnp.float32), img_pos=pos, txt=txt, txt_mask=txt_mask)
        if raw.get("img_mask") is not None:
            out["img_mask"] = raw["img_mask"]
        return out

    return encode_fn
