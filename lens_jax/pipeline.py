"""Frozen encoders and the text-to-image pipeline around the DiT (LENS_SPEC §7.6).

  FrozenVAE          images [B,H,W,3] in [-1,1] <-> normalised DiT tokens [B, (H/16)(W/16), C]
  LensPipeline       prompts -> uint8 images: encode, Euler + CFG sampling, VAE decode

Both are made from config by lens_jax/build.py (the prompt encoder by lens_jax/text/tiny_encoder.py). Checkpoint
directories are Orbax weights checkpoints written by tools/convert_checkpoint.py or by the vae / text_encoder
recipes.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.configs.base import ConfigError


class FrozenVAE:
    """A FLUX.2 VAE with frozen weights and latent BN statistics; jitted token encode/decode."""

    def __init__(self, directory: str, dtype=jnp.float32):
        from lens_jax.checkpoints.convert import load_converted
        from lens_jax.models.vae import FluxVAE

        kind, cfg, variables = load_converted(directory)
        if kind != "flux2_vae":
            raise ConfigError(f"{directory} holds a {kind!r} checkpoint, not a FLUX.2 VAE")
        self.config = cfg
        self.model = FluxVAE(cfg, dtype=dtype)
        self.variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)
        self.token_channels = cfg.packed_channels

    @partial(jax.jit, static_argnums=0)
    def _encode(self, variables, images):
        from lens_jax.models.vae import encode_to_tokens
        return encode_to_tokens(self.model, variables, images)

    @partial(jax.jit, static_argnums=(0, 3, 4))
    def _decode(self, variables, tokens, h, w):
        from lens_jax.models.vae import decode_from_tokens
        return decode_from_tokens(self.model, variables, tokens, h, w)

    def encode_tokens(self, images) -> jax.Array:
        """images [B,H,W,3] float in [-1,1], H and W multiples of 16 -> tokens [B, H/16*W/16, C]."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[1] % 16 or images.shape[2] % 16:
            raise ValueError(f"images must be [B,H,W,3] with H, W multiples of 16; got {images.shape}")
        return self._encode(self.variables, images)

    def decode_tokens(self, tokens, h: int, w: int) -> jax.Array:
        """tokens [B, h*w, C] -> images [B, 16h, 16w, 3] in [-1, 1]."""
        return self._decode(self.variables, jnp.asarray(tokens, jnp.float32), h, w)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    x = np.asarray(jax.device_get(images), np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class LensPipeline:
    """Prompts -> images with a DiT, a text encoder and a VAE (all frozen here).

    Args:
      model, params: the MMDiT and its parameters.
      encode_text: prompts (list[str]) -> TextFeatures (features [B,L,F], mask [B,L]).
      vae: a FrozenVAE.
    """

    def __init__(self, model, params, encode_text: Callable, vae: FrozenVAE):
        self.model, self.params, self.encode_text, self.vae = model, params, encode_text, vae

    def generate(self, prompts: Sequence[str], height: int, width: int, num_steps: int, guidance: float,
                 seed: int = 0, negative_prompt: str = "", batch_size: int = 16, mu: Optional[float] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
        """Returns uint8 images [len(prompts), height, width, 3]; sample i uses noise key fold_in(seed, i).

        mu: the sigma-schedule shift; None = FLUX.2's empirical mu for this token count and step count.
        """
        from lens_jax.diffusion.sampler import euler_sample, make_model_fn
        from lens_jax.diffusion.schedules import sampling_sigmas

        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 16; got {height}x{width}")
        h, w = height // 16, width // 16
        sigmas = jnp.asarray(sampling_sigmas(h * w, num_steps, mu))
        from lens_jax.models.mmdit import image_positions
        pos = jnp.asarray(image_positions(h, w))
        model_fn = make_model_fn(self.model, self.params)
        out: List[np.ndarray] = []
        prompts = list(prompts)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            cond = self.encode_text(chunk)
            unc_txt = unc_mask = None
            if negative_prompt:
                unc = self.encode_text([negative_prompt] * len(chunk))
                unc_txt, unc_mask = unc.features, unc.mask
            noise = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.key(seed), start + i),
                                                 (h * w, self.vae.token_channels), jnp.float32)
                               for i in range(len(chunk))])
            x = euler_sample(model_fn, noise, sigmas, cond.features, cond.mask, unc_txt, unc_mask,
                             guidance=float(guidance), img_pos=pos)
            out.append(to_uint8(self.vae.decode_tokens(x, h, w)))
            if progress:
                progress(min(start + batch_size, len(prompts)), len(prompts))
        return np.concatenate(out, axis=0)
