"""Rectified-flow training objective (LENS_SPEC §6.2).

Conventions: sigma in [0, 1] is the noise level (0 = data, 1 = pure noise);
x_sigma = (1 - sigma) x0 + sigma eps; the model predicts the velocity v = eps - x0, so
dx_sigma/dsigma = v and x0 = x_sigma - sigma v.

Latents are packed image tokens [B, N, C] (C = 128 for Lens) but every function here broadcasts over any
trailing shape [B, ...]. Losses and sigmas are computed in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.text.prompt_encoding import TextFeatures

ArrayLike = Union[jax.Array, np.ndarray, float]


def _per_sample(sigma: ArrayLike, ndim: int) -> jax.Array:
    """Reshapes a scalar or [B] sigma to broadcast against an array of rank `ndim` with leading batch axis."""
    s = jnp.asarray(sigma, jnp.float32)
    if s.ndim == 0:
        return s
    if s.ndim != 1:
        raise ValueError(f"sigma must be a scalar or [B]; got shape {s.shape}")
    return s.reshape(s.shape + (1,) * (ndim - 1))


def noise_latents(x0: jax.Array, eps: jax.Array, sigma: ArrayLike) -> jax.Array:
    """Noised latents x_sigma = (1 - sigma) x0 + sigma eps.

    Args:
      x0: [B, ...] clean normalised packed latents.
      eps: [B, ...] standard normal noise, same shape as x0.
      sigma: scalar or [B] noise level in [0, 1] (broadcast per sample).
    Returns:
      [B, ...] in x0's dtype (computed in float32).
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {x0.shape} and eps {eps.shape} must have the same shape")
    s = _per_sample(sigma, x0.ndim)
    out = (1.0 - s) * x0.astype(jnp.float32) + s * eps.astype(jnp.float32)
    return out.astype(x0.dtype)


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """The rectified-flow velocity target v = eps - x0 ([B, ...], same dtype as the inputs)."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {x0.shape} and eps {eps.shape} must have the same shape")
    return eps - x0


def timestep_mu(num_image_tokens, mu_lo: float = 1.0, mu_hi: float = 1.3, n_lo: float = 256.0,
                n_hi: float = 4096.0):
    """Training logit-normal location mu(n) (stage-2 rule, LENS_SPEC §6.1–6.2).

    mu(n) = mu_lo + (mu_hi - mu_lo) (n - n_lo) / (n_hi - n_lo), i.e. 1.0 + 0.3 (n - 256) / 3840 by default:
    1024 tokens -> 1.06, 2304 -> 1.16, 4096 -> 1.30. Not clipped outside [n_lo, n_hi].

    Args:
      num_image_tokens: int, or an array of per-sample counts ([B]; e.g. `img_mask.sum(-1)`).
    Returns:
      float for a Python/NumPy scalar input, otherwise a float32 array of the input's shape.
    """
    slope = (mu_hi - mu_lo) / (n_hi - n_lo)
    if isinstance(num_image_tokens, (int, float, np.integer, np.floating)):
        return float(mu_lo + slope * (float(num_image_tokens) - n_lo))
    n = jnp.asarray(num_image_tokens, jnp.float32)
    return mu_lo + slope * (n - n_lo)


def sample_sigma(rng: jax.Array, batch: int, mu: ArrayLike, std: float = 1.0) -> jax.Array:
    """Logit-normal training sigmas: sigma = sigmoid(mu + std * n), n ~ N(0, 1).

    Args:
      rng: PRNG key.
      batch: number of samples B.
      mu: scalar or [B] location in logit(sigma) space (see `timestep_mu`).
      std: logit-normal scale s (not published; lens_jax uses 1.0).
    Returns:
      [B] float32 sigmas in (0, 1).
    """
    n = jax.random.normal(rng, (batch,), jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)
    if mu.ndim not in (0, 1) or (mu.ndim == 1 and mu.shape[0] != batch):
        raise ValueError(f"mu must be a scalar or [{batch}]; got shape {mu.shape}")
    return jax.nn.sigmoid(mu + std * n)


def flow_matching_loss(pred: jax.Array, target: jax.Array,
                       mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Plain MSE between predicted and target velocities over valid image tokens (float32).

    Args:
      pred: [B, N, C] model output.
      target: [B, N, C] velocity target (`velocity_target`).
      mask: optional [B, N] bool of valid (non-padded) image tokens; None = all valid.
    Returns:
      (loss, per_example): loss is a float32 scalar, the mean squared error over all valid elements of the
      batch (valid tokens x channels); per_example is [B] float32, each sample's mean over its own valid
      elements (0 for a sample with no valid tokens). Without padding, loss == mean(per_example).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    se = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    b = se.shape[0]
    se = se.reshape(b, se.shape[1], -1)                                   # [B, N, C]
    c = se.shape[-1]
    if mask is None:
        per_example = jnp.mean(se, axis=(1, 2))
        return jnp.mean(se), per_example
    if mask.shape != se.shape[:2]:
        raise ValueError(f"mask {mask.shape} must be [B, N] = {se.shape[:2]}")
    m = mask.astype(bool)
    se = jnp.where(m[..., None], se, 0.0)                                 # also drops NaN/inf in padding
    sums = jnp.sum(se, axis=(1, 2))                                       # [B]
    counts = jnp.sum(m, axis=1).astype(jnp.float32) * c                   # [B] valid elements
    per_example = sums / jnp.maximum(counts, 1.0)
    loss = jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)
    return loss, per_example


def caption_dropout(rng: jax.Array, txt: jax.Array, txt_mask: jax.Array, rate: float) -> TextFeatures:
    """Whole-text caption dropout: each sample independently becomes zeros + an all-false mask w.p. `rate`.

    Args:
      rng: PRNG key.
      txt: [B, S, F] text features.
      txt_mask: [B, S] bool validity.
      rate: drop probability in [0, 1] (0 keeps every caption, 1 drops every caption).
    Returns:
      TextFeatures(features [B, S, F], mask [B, S] bool) -- unpacks as a (features, mask) tuple.
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"caption dropout rate must be in [0, 1]; got {rate}")
    b = txt.shape[0]
    keep = jax.random.uniform(rng, (b,)) >= rate          # rate 0: always True; rate 1: never (u < 1)
    return TextFeatures(
        features=jnp.where(keep[:, None, None], txt, jnp.zeros((), txt.dtype)),
        mask=txt_mask.astype(bool) & keep[:, None],
    )
