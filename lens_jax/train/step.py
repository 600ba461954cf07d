"""The DiT flow-matching train step: one pure function, jitted with explicit shardings.

    train_step = make_train_step(model, optimizer, lr_schedule, mu=..., mu_rule=..., sigma_std=...,
                                 caption_dropout=..., ema_decay=..., rules=config.sharding.rules,
                                 grad_accum_steps=1, encode_fn=None)
    state, metrics = train_step(state, batches)                   # cached features
    state, metrics = train_step(state, batches, encoder_params)   # online encoding (encode_fn given)

A batch (one micro-batch, leading axis = its global batch B):
  img       [B, N, C]   normalised packed latents (x0)
  img_pos   [B, N, 3]   int32 token positions
  txt       [B, S, F]   text features (encoder layers concatenated)
  txt_mask  [B, S]      bool, right-padded
  img_mask  [B, N]      optional bool, for batches of padded aspect-ratio buckets
With online encoding (`encode_fn`, see `make_online_encoder`) a batch holds raw inputs instead:
  pixels [B, H, W, 3] in [-1, 1], input_ids [B, L] int32, attention_mask [B, L] bool (optional img_mask /
  img_pos pass through), and the frozen encoders turn them into the fields above inside the step.

`batches` is either
  * a dict: one batch (the original behaviour; with `grad_accum_steps = k > 1` it is split into k equal
    micro-batches inside the jit, see below), or
  * a tuple/list of dicts: micro-batches, possibly of different shapes (one per base area, LENS_SPEC §5.5),
    run one after the other inside the one jit (a lax.scan over the micro-batch index with one lax.switch
    branch per shape, so the temporary memory is the largest micro-batch's; `micro_batch_loop='unroll'`
    unrolls them in Python instead); gradients are accumulated and one update is applied.

Loss over several micro-batches: the token-weighted mean. Each micro-batch's loss is the MSE over its
valid elements (valid image tokens x channels); micro-batch i is weighted by its number of valid image
tokens, so the total is sum_i sum(squared errors_i) / sum_i (valid elements_i) -- exactly the loss of the
concatenated batch. Hence splitting a batch into micro-batches changes neither loss nor gradient (up to
float summation order), and a 1024^2 image (4096 tokens) weighs 4x a 512^2 one, as it would in one batch.

Randomness (sigma, noise, caption dropout) comes from fold_in(state.rng, step):
  * dict batch: drawn for the whole batch as before; `grad_accum_steps` splits those same draws with the
    batch, so accumulation is a pure memory lever and gives the full-batch gradient.
  * tuple of micro-batches: drawn per example from fold_in(key, e) with e the example's index in the
    concatenation of the micro-batches (distinct across micro-batches and deterministic); micro-batches
    give the same draws, loss and gradient as their concatenation passed as a one-element tuple (a plain
    dict uses the whole-batch scheme above, so its draws differ). Extra metrics: loss_mb{i}, each
    micro-batch's own loss (e.g. per base area).

Noise: sigma = sigmoid(mu + std * n) with mu from each sample's image-token count (or a fixed mu),
x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, plain MSE over valid tokens. Caption dropout
replaces a whole caption by zero features with an all-false mask (the CFG unconditional branch).
A step whose loss or gradient norm is not finite leaves the state unchanged and reports skipped = 1.

`grad_accum_steps = k` needs each device's share of the batch (B / data-parallel size) divisible by k: the
split is strided (micro-batch j holds examples j, j+k, ...) so every micro-batch stays evenly spread over
the data-parallel devices without any communication; the k micro-batches run in a `lax.scan`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lens_jax.diffusion import objective

IMAGE_KEYS = ("img", "img_pos", "txt", "txt_mask")


def _rules_ctx(rules):
    import contextlib
    return nn.logical_axis_rules(list(rules)) if rules else contextlib.nullcontext()


def _se_sums(pred, target, img_mask):
    """Per-example sums of squared errors and valid element counts ([B] float32 each)."""
    se = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    b = se.shape[0]
    se = se.reshape(b, se.shape[1], -1)
    c = se.shape[-1]
    if img_mask is None:
        return jnp.sum(se, axis=(1, 2)), jnp.full((b,), se.shape[1] * c, jnp.float32)
    m = img_mask.astype(bool)
    se = jnp.where(m[..., None], se, 0.0)
    return jnp.sum(se, axis=(1, 2)), jnp.sum(m, axis=1).astype(jnp.float32) * c


def _valid_counts(mb, channels: int):
    """Valid elements per example of a prepared micro-batch (parameter-independent)."""
    b, n = mb["x_t"].shape[:2]
    if mb.get("img_mask") is None:
        return jnp.full((b,), n * channels, jnp.float32)
    return jnp.sum(mb["img_mask"].astype(bool), axis=1).astype(jnp.float32) * channels


def _sigma_stats(sigma, per_example):
    """(mean sigma, mean per-example loss over the samples with sigma > 0.5) -- the original metrics."""
    hi = sigma > 0.5
    return jnp.mean(sigma), jnp.sum(jnp.where(hi, per_example, 0)) / jnp.maximum(jnp.sum(hi), 1)


def make_train_step(model, optimizer, lr_schedule, *, mu: float, mu_rule: Dict[str, float], sigma_std: float,
                    caption_dropout: float, ema_decay: float, rules: Optional[Sequence] = None,
                    grad_accum_steps: int = 1, encode_fn: Optional[Callable] = None,
                    micro_batch_loop: str = "switch") -> Callable:
    """Returns train_step(state, batches, encoder_params=None) -> (state, metrics).

    mu < 0 selects the token-count rule `mu_rule`. rules: the logical-axis rules of the DiT; when given the
    model's activation constraints are active (batch over ('fsdp', 'data'), heads/MLP over 'tensor'),
    otherwise they are no-ops. grad_accum_steps: split a dict batch into this many micro-batches.
    encode_fn: `encode_fn(encoder_params, raw_batch) -> feature batch` (see `make_online_encoder`); the
    frozen encoders then run inside the step under stop_gradient. micro_batch_loop: how a tuple of
    micro-batches is run -- 'switch' (a lax.scan over the micro-batch index with one lax.switch branch per
    shape: sequential, temporary memory of the largest micro-batch) or 'unroll' (Python-unrolled; XLA:CPU
    then adds up the micro-batches' temporaries). Both give the same numbers.
    """
    if micro_batch_loop not in ("switch", "unroll"):
        raise ValueError(f"micro_batch_loop={micro_batch_loop!r}; choose 'switch' or 'unroll'")
    k_accum = int(grad_accum_steps)
    if k_accum < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if not 0.0 <= float(caption_dropout) <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1]; got {caption_dropout}")

    def apply(params, x_t, img_pos, txt, txt_mask, sigma, img_mask):
        with _rules_ctx(rules):
            return model.apply({"params": params}, x_t, img_pos, txt, txt_mask, sigma, img_mask=img_mask)

    def mu_of(x0, img_mask):
        b = x0.shape[0]
        if mu >= 0:
            return jnp.full((b,), mu, jnp.float32)
        n_tok = (jnp.full((b,), x0.shape[1], jnp.float32) if img_mask is None
                 else jnp.sum(img_mask, axis=1).astype(jnp.float32))
        return objective.timestep_mu(n_tok, **mu_rule)

    def draws_whole(key, x0, img_mask):
        """The original scheme: one key split three ways for the whole batch."""
        k_sigma, k_eps, k_drop = jax.random.split(key, 3)
        b = x0.shape[0]
        sigma = objective.sample_sigma(k_sigma, b, mu_of(x0, img_mask), sigma_std)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32).astype(x0.dtype)
        keep = jax.random.uniform(k_drop, (b,)) >= caption_dropout   # as objective.caption_dropout
        return sigma, eps, keep

    def draws_per_example(key, x0, img_mask, offset: int):
        """Per-example draws from fold_in(key, offset + j): independent of how a batch is split."""
        b = x0.shape[0]
        keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(offset + jnp.arange(b, dtype=jnp.uint32))
        ks = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
        n = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(ks[:, 0])
        sigma = jax.nn.sigmoid(mu_of(x0, img_mask) + sigma_std * n)
        eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(ks[:, 1]).astype(x0.dtype)
        keep = jax.vmap(lambda k: jax.random.uniform(k, ()))(ks[:, 2]) >= caption_dropout
        return sigma, eps, keep

    def prepare(mb, sigma, eps, keep):
        """Noised inputs, target and dropped-out text of one (micro-)batch."""
        x0 = mb["img"]
        txt = jnp.where(keep[:, None, None], mb["txt"], jnp.zeros((), mb["txt"].dtype))
        txt_mask = mb["txt_mask"].astype(bool) & keep[:, None]
        return dict(x_t=objective.noise_latents(x0, eps, sigma), target=objective.velocity_target(x0, eps),
                    img_pos=mb["img_pos"], txt=txt, txt_mask=txt_mask, sigma=sigma, img_mask=mb.get("img_mask"))

    def sum_loss(params, p, total):
        """sum of squared errors / total (the micro-batch's share of the token-weighted loss)."""
        pred = apply(params, p["x_t"], p["img_pos"], p["txt"], p["txt_mask"], p["sigma"], p["img_mask"])
        sums, counts = _se_sums(pred, p["target"], p["img_mask"])
        return jnp.sum(sums) / total, (sums, counts)

    def encode(encoder_params, mb):
        if encode_fn is None:
            missing = [k for k in IMAGE_KEYS if k not in mb]
            if missing:
                raise ValueError(f"batch lacks {missing} (has {sorted(mb)}); raw pixels/token ids need "
                                 "make_train_step(..., encode_fn=make_online_encoder(...))")
            return mb
        feats = jax.lax.stop_gradient(encode_fn(encoder_params, mb))
        return feats

    # ------------------------------------------------------------------ gradient paths

    def grads_single(params, key, batch):
        """The original one-batch path (metrics and numerics unchanged)."""
        x0 = batch["img"]
        img_mask = batch.get("img_mask")
        sigma, eps, keep = draws_whole(key, x0, img_mask)
        p = prepare(batch, sigma, eps, keep)

        def loss_fn(prm):
            pred = apply(prm, p["x_t"], p["img_pos"], p["txt"], p["txt_mask"], p["sigma"], p["img_mask"])
            return objective.flow_matching_loss(pred, p["target"], img_mask)

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (loss, grads) + _sigma_stats(sigma, per_example) + ({},)

    def grads_scan(params, key, batch, encoder_params=None):
        """grad_accum_steps = k: the whole batch's draws, split strided into k micro-batches, lax.scan.

        With online encoding the raw batch is split and each micro-batch is encoded inside the scan body, so
        the frozen encoders' activations are those of B/k examples too.
        """
        b = jax.tree.leaves(batch)[0].shape[0]
        if b % k_accum:
            raise ValueError(f"batch {b} is not divisible by grad_accum_steps={k_accum}")
        img_mask = batch.get("img_mask")
        if encode_fn is None:
            x0 = batch["img"]
        else:                                   # the encoded shapes, without encoding the whole batch
            x0 = jax.eval_shape(encode_fn, encoder_params, batch)["img"]
        sigma, eps, keep = draws_whole(key, x0, img_mask)
        c = x0.shape[-1]
        counts = (jnp.full((b,), x0.shape[1] * c, jnp.float32) if img_mask is None
                  else jnp.sum(img_mask.astype(bool), axis=1).astype(jnp.float32) * c)
        total = jnp.maximum(jnp.sum(counts), 1.0)

        def split(x):   # [B, ...] -> [k, B/k, ...]; micro-batch j = examples j, j+k, ... (device-local)
            y = jnp.swapaxes(x.reshape((b // k_accum, k_accum) + x.shape[1:]), 0, 1)
            with _rules_ctx(rules):
                return nn.with_logical_constraint(y, (None, "act_batch") + (None,) * (x.ndim - 1))

        if encode_fn is None:
            p = prepare(batch, sigma, eps, keep)
            xs = dict(p={k: split(v) for k, v in p.items() if v is not None})
        else:
            xs = dict(raw={k: split(v) for k, v in batch.items()}, sigma=split(sigma), eps=split(eps),
                      keep=split(keep))

        def body(g_acc, x):
            if encode_fn is None:
                mb = dict(x["p"], img_mask=x["p"].get("img_mask"))
            else:
                feats = jax.lax.stop_gradient(encode_fn(encoder_params, x["raw"]))
                mb = prepare(feats, x["sigma"], x["eps"], x["keep"])
            (part, (sums, cnt)), g = jax.value_and_grad(sum_loss, has_aux=True)(params, mb, total)
            return jax.tree.map(jnp.add, g_acc, g), (part, sums / jnp.maximum(cnt, 1.0), mb["sigma"])

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (parts, per_ex, sig) = jax.lax.scan(body, zeros, xs)
        return (jnp.sum(parts), grads) + _sigma_stats(sig.reshape(-1), per_ex.reshape(-1)) + ({},)

    def grads_micro(params, key, mbs):
        """A tuple of micro-batches (any shapes): per-example draws, one accumulated gradient."""
        prepared, offset = [], 0
        for mb in mbs:
            x0 = mb["img"]
            sigma, eps, keep = draws_per_example(key, x0, mb.get("img_mask"), offset)
            offset += x0.shape[0]
            prepared.append(prepare(mb, sigma, eps, keep))
        counts = [jnp.sum(_valid_counts(p, p["target"].shape[-1])) for p in prepared]
        total = jnp.maximum(sum(counts[1:], counts[0]), 1.0)
        sigma_all = jnp.concatenate([p["sigma"] for p in prepared])

        def one(j, g_acc):
            """Micro-batch j: (g_acc + its gradient, its loss share, its own loss, hi-noise sum, hi-noise count)."""
            p = prepared[j]
            (part, (sums, cnt)), g = jax.value_and_grad(sum_loss, has_aux=True)(params, p, total)
            g = g if g_acc is None else jax.tree.map(jnp.add, g_acc, g)
            hi = p["sigma"] > 0.5
            per = sums / jnp.maximum(cnt, 1.0)
            return (g, part, jnp.sum(sums) / jnp.maximum(jnp.sum(cnt), 1.0),
                    jnp.sum(jnp.where(hi, per, 0.0)), jnp.sum(hi).astype(jnp.float32))

        n = len(prepared)
        if micro_batch_loop == "unroll" or n == 1:
            outs, grads = [], None
            for j in range(n):
                grads, *rest = one(j, grads)
                outs.append(rest)
            parts, mb_loss, hi_sum, hi_cnt = (jnp.stack(x) for x in zip(*outs))
        else:
            # A scan over the micro-batch index with one lax.switch branch per shape: XLA runs them one after
            # the other and the step's temporary memory is the largest micro-batch's, not the sum.
            def body(g_acc, j):
                g_acc, *rest = jax.lax.switch(j, [lambda g, j=j: one(j, g) for j in range(n)], g_acc)
                return g_acc, tuple(rest)
            grads, (parts, mb_loss, hi_sum, hi_cnt) = jax.lax.scan(
                body, jax.tree.map(jnp.zeros_like, params), jnp.arange(n))
        extra = {f"loss_mb{j}": mb_loss[j] for j in range(n)}
        return (jnp.sum(parts), grads, jnp.mean(sigma_all), jnp.sum(hi_sum) / jnp.maximum(jnp.sum(hi_cnt), 1.0),
                extra)

    # ------------------------------------------------------------------ the step

    def train_step(state, batches, encoder_params=None):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        if encoder_params is not None and encode_fn is None:
            raise ValueError("encoder_params given but the step was made without encode_fn")
        params = state["params"]
        if isinstance(batches, dict) and k_accum == 1:
            loss, grads, sigma_mean, loss_hi_noise, extra = grads_single(params, key, encode(encoder_params, batches))
        elif isinstance(batches, dict):
            if encode_fn is None:
                encode(None, batches)                                  # checks the fields
            loss, grads, sigma_mean, loss_hi_noise, extra = grads_scan(params, key, batches, encoder_params)
        elif isinstance(batches, (tuple, list)) and batches and all(isinstance(b, dict) for b in batches):
            if k_accum != 1:
                raise ValueError("grad_accum_steps applies to a single dict batch; a tuple of micro-batches "
                                 "is already accumulated (pass smaller micro-batches instead)")
            mbs = [encode(encoder_params, b) for b in batches]
            loss, grads, sigma_mean, loss_hi_noise, extra = grads_micro(params, key, mbs)
        else:
            raise TypeError(f"batches must be a dict or a non-empty tuple/list of dicts, got {type(batches)}")

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = dict(state, params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                         step=step + 1)
        if state.get("ema_params") is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p.astype(e.dtype),
                               state["ema_params"], new_state["params"])
            new_state["ema_params"] = ema
        metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state["params"]),
                       update_norm=optax.global_norm(updates), lr=lr_schedule(step), sigma_mean=sigma_mean,
                       skipped=(~ok).astype(jnp.int32), loss_hi_noise=loss_hi_noise)
        metrics.update(extra)
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh, state_shardings, batch_shardings, encoder_shardings=None,
                   donate: bool = True):
    """jax.jit with explicit in/out shardings and the state donated (call under `jax.set_mesh(mesh)`).

    batch_shardings: a dict or a tuple of dicts (`sharding.batch_shardings(mesh, example)`), matching what
    the loop passes. With online encoding pass the frozen encoders' shardings as `encoder_shardings`.
    """
    from lens_jax.train.sharding import replicated
    in_sh = (state_shardings, batch_shardings) + (() if encoder_shardings is None else (encoder_shardings,))
    return jax.jit(train_step, in_shardings=in_sh, out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------- online encoding

def make_online_encoder(vae_model, text_model, *, txt_offset: int, vae_rules: Optional[Sequence] = None,
                        text_rules: Optional[Sequence] = None, feature_dtype=None) -> Callable:
    """encode_fn(encoder_params, raw_batch) -> feature batch, for `make_train_step(encode_fn=...)`.

    encoder_params = {'vae': {'params': ..., 'latent_stats': {'mean', 'var'}},
                      'text_encoder': {'params': ...}}   (frozen; pass them to the step as an argument,
                                                          sharded by their own rules)
    raw_batch: pixels [B, H, W, 3] float in [-1, 1] or uint8 (H, W multiples of 16; one shape per micro-batch,
    so a micro-batch mixing buckets of different pixel sizes is encoded outside the step instead, see
    lens_jax/data/shard_pipeline.py `encode_micro_batch`), input_ids [B, L] int32 and
    attention_mask [B, L] bool (the Harmony-templated, right-padded prompt, L = text_encoder.max_length);
    img_mask / img_pos, if present, pass through (else the positions of the H/16 x W/16 grid).
    Output: img [B, H/16*W/16, C] (VAE posterior mode, patchified, BN-normalised), img_pos, txt
    [B, L - txt_offset, F] (the selected GPT-OSS layers, template prefix stripped, zero at padding),
    txt_mask. Exactly what the cached-feature path stores (lens_jax/data/latent_cache.py).
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
        with _rules_ctx(vae_rules):
            img = encode_to_tokens(vae_model, encoder_params["vae"], pixels)
        with _rules_ctx(text_rules):
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
