"""DiffusionNFT on the trainer (LENS_SPEC §8.4): the loss, the old-policy schedules and the objective.

On clean rollouts x0 of the old policy with optimality weights r in [0, 1] (rewards.nft_weights), each step
draws t and eps, noises x_t = (1 - t) x0 + t eps (target v = eps - x0) and forms the implicit policies
    v+ = (1 - beta) v_old + beta v_theta,      v- = (1 + beta) v_old - beta v_theta
(v_old without gradient). Per image, with the adaptive weight w = 1 / sg(mean |e|) of each term's error e:
    space 'x0' (the reference code): x0^+- = x_t - t v^+-,  L^+- = mean (x0^+- - x0)^2 * w^+-,
                                     loss = (r L+ + (1 - r) L-) / beta
    space 'velocity' (the paper's form): L^+- = mean (v^+- - v)^2 * w^+-, loss = r L+ + (1 - r) L-
plus kl_weight * mean (v_theta - v_ref)^2 (v_ref: the frozen reference, the base with adapters off), times
loss_scale; images are averaged with their `weight` (0 for dropped zero-variance groups).

The old policy is the trainable net's EMA: e <- eta_i e + (1 - eta_i) theta after step i, with
`old_policy_decay(kind)`: 'type1' eta_i = min(0.001 i, 0.5); 'type2' eta_i = 0 for 75 steps, then
min(0.0075 (i - 75), 0.999); 'constant:<eta>'.

At theta = theta_old and r = 1/2 the two terms' gradients cancel exactly (a constant reward teaches nothing),
and the KL term is zero at theta = ref (tests/test_nft.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from lens_jax.diffusion.rollout import masked_token_mean
from lens_jax.train.step import Mean, Objective


@dataclasses.dataclass(frozen=True)
class NFTConfig:
    beta: float = 1.0
    kl_weight: float = 1e-4
    space: str = "x0"                 # x0 (reference code) | velocity (the paper's equation)
    loss_scale: float = 1.0
    t_min: float = 0.0                # t ~ U(t_min, t_max), kept inside (1e-3, 1 - 1e-3)
    t_max: float = 1.0
    adaptive_eps: float = 1e-5        # floor of the adaptive weights' denominators

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"NFT beta must be positive, got {self.beta}")
        if self.space not in ("x0", "velocity"):
            raise ValueError(f"NFT loss space {self.space!r}; choose 'x0' or 'velocity'")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"NFT needs 0 <= t_min < t_max <= 1; got {self.t_min}, {self.t_max}")
        if self.kl_weight < 0:
            raise ValueError(f"NFT kl_weight must be >= 0, got {self.kl_weight}")


def old_policy_decay(kind: str) -> Callable:
    """eta(step) of the old-policy EMA (module docstring), a jnp function for Net.ema_decay."""
    if kind == "type1":
        return lambda i: jnp.minimum(0.001 * jnp.asarray(i, jnp.float32), 0.5)
    if kind == "type2":
        return lambda i: jnp.where(jnp.asarray(i) < 75, 0.0,
                                   jnp.minimum(0.0075 * (jnp.asarray(i, jnp.float32) - 75.0), 0.999))
    if kind.startswith("constant:"):
        eta = float(kind.split(":", 1)[1])
        if not 0.0 <= eta < 1.0:
            raise ValueError(f"old-policy decay {kind!r}: eta must be in [0, 1)")
        return lambda i: jnp.full((), eta, jnp.float32)
    raise ValueError(f"old-policy decay {kind!r}; choose 'type1', 'type2' or 'constant:<eta>'")


def nft_terms(v_theta, v_old, v_ref, x0, x_t, eps, t, r, cfg: NFTConfig, img_mask=None):
    """Per-image (loss [B], parts dict of [B]) of the module docstring's loss, all float32; means over the
    valid tokens of img_mask [B, N] (None = all tokens)."""
    f = lambda a: a.astype(jnp.float32)  # noqa: E731
    _per_image = lambda a: masked_token_mean(a, img_mask)  # noqa: E731
    v_theta, v_old, x0, x_t, eps = f(v_theta), f(jax.lax.stop_gradient(v_old)), f(x0), f(x_t), f(eps)
    b = cfg.beta
    v_pos = (1 - b) * v_old + b * v_theta
    v_neg = (1 + b) * v_old - b * v_theta
    tt = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    if cfg.space == "x0":
        e_pos, e_neg = (x_t - tt * v_pos) - x0, (x_t - tt * v_neg) - x0
    else:
        target = eps - x0
        e_pos, e_neg = v_pos - target, v_neg - target

    def adaptive(e):
        w = jax.lax.stop_gradient(jnp.maximum(_per_image(jnp.abs(e)), cfg.adaptive_eps))
        return _per_image(jnp.square(e)) / w
    l_pos, l_neg = adaptive(e_pos), adaptive(e_neg)
    loss = r * l_pos + (1 - r) * l_neg
    if cfg.space == "x0":
        loss = loss / b
    kl = jnp.zeros_like(loss) if v_ref is None else _per_image(jnp.square(v_theta - f(jax.lax.stop_gradient(v_ref))))
    total = cfg.loss_scale * (loss + cfg.kl_weight * kl)
    return total, {"loss_pos": l_pos, "loss_neg": l_neg, "kl": kl}


def nft_objective(model, cfg: NFTConfig, *, net: str = "dit", reference: Optional[Callable] = None,
                  rules=None, repeats: int = 1) -> Objective:
    """The trainer Objective of DiffusionNFT for net `net` (old policy: '<net>.ema').

    reference(params_by_name) -> the reference weights (e.g. `lambda p: lora.disable(p['dit'])`, or
    `lambda p: p['ref']`); None with kl_weight > 0 is an error. Batch (dict): x0 [B, N, C] rollout latents,
    img_pos [B, N, 3], txt [B, S, F], txt_mask [B, S], r [B] optimality weights, weight [B] (0 = left out),
    optional img_mask [B, N] (mixed aspect ratios padded to N tokens).
    repeats > 1: that many updates per step on the strided mini-batches j, j + repeats, ... (fresh t, eps)."""
    from lens_jax.train.step import rules_context
    if cfg.kl_weight > 0 and reference is None:
        raise ValueError("NFT with kl_weight > 0 needs a reference policy")

    def apply(p, batch, x_t, t):
        kw = {"img_mask": batch["img_mask"]} if "img_mask" in batch else {}
        with rules_context(rules):
            return model.apply({"params": p}, x_t, batch["img_pos"], batch["txt"], batch["txt_mask"], t, **kw)

    def loss_fn(params, batch, rng):
        x0 = batch["x0"].astype(jnp.float32)
        b = x0.shape[0]
        k_t, k_e = jax.random.split(rng)
        lo, hi = max(cfg.t_min, 1e-3), min(cfg.t_max, 1.0 - 1e-3)
        t = jax.random.uniform(k_t, (b,), jnp.float32, lo, hi)
        eps = jax.random.normal(k_e, x0.shape, jnp.float32)
        tt = t[:, None, None]
        x_t = (1 - tt) * x0 + tt * eps
        v_theta = apply(params[net], batch, x_t, t)
        v_old = apply(params[net + ".ema"], batch, x_t, t)
        v_ref = apply(reference(params), batch, x_t, t) if cfg.kl_weight > 0 else None
        per, parts = nft_terms(v_theta, v_old, v_ref, x0, x_t, eps, t, batch["r"].astype(jnp.float32), cfg,
                               batch.get("img_mask"))
        w = batch["weight"].astype(jnp.float32)
        n = jnp.sum(w)
        loss = jnp.sum(per * w) / jnp.maximum(n, 1.0)
        metrics = {f"nft/{k}": Mean(jnp.sum(v * w), n) for k, v in parts.items()}
        metrics["nft/weight_frac"] = jnp.mean(w)
        metrics["nft/t_mean"] = jnp.mean(t)
        return loss, metrics

    select = None
    if repeats > 1:
        def select(batch, j):
            return jax.tree.map(lambda x: x[j::repeats], batch)
    return Objective(loss_fn=loss_fn, updates=(net,), name="nft", repeats=int(repeats), select_fn=select)
