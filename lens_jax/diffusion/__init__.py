"""Rectified-flow objective, sigma schedules and the Euler/CFG sampler (LENS_SPEC §6.2, §7.1–7.5)."""
from lens_jax.diffusion.objective import (
    caption_dropout,
    flow_matching_loss,
    noise_latents,
    sample_sigma,
    timestep_mu,
    velocity_target,
)
from lens_jax.diffusion.schedules import compute_empirical_mu, sampling_sigmas, shift_sigmas
from lens_jax.diffusion.sampler import ModelFn, cfg_combine, euler_sample, make_model_fn, sample_latents

__all__ = [
    "caption_dropout", "flow_matching_loss", "noise_latents", "sample_sigma", "timestep_mu", "velocity_target",
    "compute_empirical_mu", "sampling_sigmas", "shift_sigmas",
    "ModelFn", "cfg_combine", "euler_sample", "make_model_fn", "sample_latents",
]
