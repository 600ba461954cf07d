"""Flow-GRPO on the trainer (LENS_SPEC §8.7): the clipped policy-gradient objective over recorded SDE steps.

Rollouts come from the current policy through `diffusion.rollout.sde_sample`, which records for every
stochastic step j the state x_j, the next state x_{j+1} and log pi_old(x_{j+1} | x_j). The loss re-evaluates
the policy's step mean mu_theta = cx_j x_j + cv_j v_theta(x_j, sigma_j) (with CFG when guidance != 1) and
    rho = exp(log pi_theta - log pi_old),  L = mean_j mean_i max(-A_i rho, -A_i clip(rho, 1 - eps, 1 + eps))
plus kl_weight * mean_j ||mu_theta - mu_ref||^2 / (2 std_j^2) (mean over latent dims), mu_ref from the frozen
reference. Images are averaged with their `weight` (0 for dropped zero-variance groups).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.diffusion.rollout import gaussian_log_prob, masked_token_mean
from lens_jax.diffusion.sampler import cfg_combine
from lens_jax.train.step import Mean, Objective


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    clip_range: float = 1e-4
    kl_weight: float = 0.04
    noise_level: float = 0.7
    guidance: float = 1.0
    adv_clip: float = 5.0
    global_std: bool = False

    def __post_init__(self):
        if self.clip_range <= 0 or self.noise_level <= 0 or self.kl_weight < 0:
            raise ValueError(f"bad Flow-GRPO settings {self}")


def grpo_objective(model, cfg: GRPOConfig, coefs, *, net: str = "dit", reference: Optional[Callable] = None,
                   rules=None) -> Objective:
    """The trainer Objective of Flow-GRPO for net `net`.

    coefs: the step coefficients of the rollout grid (`rollout.sde_coefficients`: cx, cv, std, sigma; [T] each).
    Batch (dict): x [B, T, N, C], x_next [B, T, N, C], log_prob [B, T] (the sampler's), adv [B], weight [B],
    img_pos [B, N, 3], txt [B, S, F], txt_mask [B, S], optional img_mask [B, N] (mixed aspect ratios)."""
    from lens_jax.train.step import rules_context
    if cfg.kl_weight > 0 and reference is None:
        raise ValueError("Flow-GRPO with kl_weight > 0 needs a reference policy")
    cx, cv, std, sig = (jnp.asarray(np.asarray(coefs[k], np.float32)) for k in ("cx", "cv", "std", "sigma"))
    use_cfg = float(cfg.guidance) != 1.0

    def velocity(p, batch, x, s):
        b = x.shape[0]
        txt, mask, pos, valid = batch["txt"], batch["txt_mask"], batch["img_pos"], batch.get("img_mask")
        if use_cfg:
            x = jnp.concatenate([x, x], 0)
            txt = jnp.concatenate([txt, jnp.zeros_like(txt)], 0)
            mask = jnp.concatenate([mask, jnp.zeros_like(mask)], 0)
            pos = jnp.concatenate([pos, pos], 0)
            valid = None if valid is None else jnp.concatenate([valid, valid], 0)
        kw = {} if valid is None else {"img_mask": valid}
        with rules_context(rules):
            v = model.apply({"params": p}, x, pos, txt, mask, jnp.full((x.shape[0],), s, jnp.float32), **kw)
        v = v.astype(jnp.float32)
        return cfg_combine(v[:b], v[b:], cfg.guidance) if use_cfg else v

    def loss_fn(params, batch, rng):
        del rng
        adv, w = batch["adv"].astype(jnp.float32), batch["weight"].astype(jnp.float32)
        n = jnp.maximum(jnp.sum(w), 1.0)
        ref = reference(params) if cfg.kl_weight > 0 else None

        def one(carry, j):
            x, x_next = batch["x"][:, j].astype(jnp.float32), batch["x_next"][:, j].astype(jnp.float32)
            mean = cx[j] * x + cv[j] * velocity(params[net], batch, x, sig[j])
            logp = gaussian_log_prob(x_next, mean, std[j], batch.get("img_mask"))
            ratio = jnp.exp(logp - batch["log_prob"][:, j].astype(jnp.float32))
            pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range))
            kl = jnp.zeros_like(pg)
            if ref is not None:
                mean_ref = cx[j] * x + cv[j] * jax.lax.stop_gradient(velocity(ref, batch, x, sig[j]))
                kl = masked_token_mean(jnp.square(mean - mean_ref), batch.get("img_mask")) / (2 * jnp.square(std[j]))
            clipped = (jnp.abs(ratio - 1) > cfg.clip_range).astype(jnp.float32)
            out = (jnp.sum(pg * w) / n, jnp.sum(kl * w) / n, jnp.sum(clipped * w) / n,
                   jnp.sum(jnp.abs(ratio - 1) * w) / n)
            return carry, out
        _, (pg, kl, clipfrac, drift) = jax.lax.scan(one, None, jnp.arange(cx.shape[0]))
        loss = jnp.mean(pg) + cfg.kl_weight * jnp.mean(kl)
        return loss, {"grpo/policy_loss": jnp.mean(pg), "grpo/kl": jnp.mean(kl),
                      "grpo/clip_frac": jnp.mean(clipfrac), "grpo/ratio_drift": jnp.mean(drift),
                      "grpo/weight_frac": Mean(jnp.sum(w), w.shape[0])}

    return Objective(loss_fn=loss_fn, updates=(net,), name="grpo")
