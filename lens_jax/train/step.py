"""The DiT flow-matching train step: one pure function, jitted with explicit shardings.

batch (per global step, leading axis = global batch B):
  img       [B, N, C]   normalised packed latents (x0)
  img_pos   [B, N, 3]   int32 token positions
  txt       [B, S, F]   text features (encoder layers concatenated)
  txt_mask  [B, S]      bool, right-padded
  img_mask  [B, N]      optional bool, for batches of padded aspect-ratio buckets

Noise: sigma = sigmoid(mu + std * n) with mu from each sample's image-token count (or a fixed mu),
x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, plain MSE over valid tokens. Caption dropout
replaces a whole caption by zero features with an all-false mask (the CFG unconditional branch).
A step whose loss or gradient norm is not finite leaves the state unchanged and reports skipped = 1.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import optax

from lens_jax.diffusion import objective


def make_train_step(model, optimizer, lr_schedule, *, mu: float, mu_rule: Dict[str, float], sigma_std: float,
                    caption_dropout: float, ema_decay: float) -> Callable:
    """Returns train_step(state, batch) -> (state, metrics). `mu` < 0 selects the token-count rule."""

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        k_sigma, k_eps, k_drop = jax.random.split(rng, 3)
        x0 = batch["img"]
        b = x0.shape[0]
        img_mask = batch.get("img_mask")
        if mu >= 0:
            mu_b = jnp.full((b,), mu, jnp.float32)
        else:
            n_tok = (jnp.full((b,), x0.shape[1], jnp.float32) if img_mask is None
                     else jnp.sum(img_mask, axis=1).astype(jnp.float32))
            mu_b = objective.timestep_mu(n_tok, **mu_rule)
        sigma = objective.sample_sigma(k_sigma, b, mu_b, sigma_std)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32).astype(x0.dtype)
        txt, txt_mask = objective.caption_dropout(k_drop, batch["txt"], batch["txt_mask"], caption_dropout)
        x_t = objective.noise_latents(x0, eps, sigma)
        target = objective.velocity_target(x0, eps)

        def loss_fn(params):
            pred = model.apply({"params": params}, x_t, batch["img_pos"], txt, txt_mask, sigma, img_mask=img_mask)
            loss, per_example = objective.flow_matching_loss(pred, target, img_mask)
            return loss, per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = dict(state, params=keep(params, state["params"]), opt_state=keep(opt_state, state["opt_state"]),
                         step=step + 1)
        if state.get("ema_params") is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p.astype(e.dtype),
                               state["ema_params"], new_state["params"])
            new_state["ema_params"] = ema
        metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(new_state["params"]),
                       update_norm=optax.global_norm(updates), lr=lr_schedule(step), sigma_mean=jnp.mean(sigma),
                       skipped=(~ok).astype(jnp.int32),
                       loss_hi_noise=jnp.sum(jnp.where(sigma > 0.5, per_example, 0)) / jnp.maximum(jnp.sum(sigma > 0.5), 1))
        return new_state, metrics

    return train_step
