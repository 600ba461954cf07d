"""Raw-input training data for online encoding (config.data.features='online', source='shapes').

Instead of the encoded cache (lens_jax/data/latent_cache.py), the shapes-world examples are kept in memory as
they come from the world: uint8 images [N, H, W, 3] and the Harmony-templated, tokenised captions (input_ids
int32 [N, L], attention_mask bool [N, L]) -- no encoder pass on the host. The frozen VAE and text encoder run
inside the jitted train step (`lens_jax.train.step.make_online_encoder`).

Batches are drawn exactly like the cache's (`latent_cache.batch_indices`: a pure function of
(seed, step)), from the same examples in the same order, so a resumed run is exact and an online run sees
the same examples per step as a cached run with the same seed. The text length is fixed:
L = txt_offset + min(longest caption, data.max_text_tokens) -- the cache's text length after the offset strip
(the encoder is causal and padding is on the right, so the cut does not change the kept features).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from lens_jax.data.latent_cache import batch_indices, take_examples
from lens_jax.models.mmdit import image_positions


@dataclasses.dataclass
class RawDataset:
    """pixels uint8 [N, H, W, 3]; input_ids int32 [N, L]; attention_mask bool [N, L]; txt_offset; grid (h, w)."""
    pixels: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    txt_offset: int
    grid: Tuple[int, int]

    def __post_init__(self):
        self._pos = image_positions(*self.grid)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def text_len(self) -> int:
        """Text tokens per example after the offset strip (the DiT's text length)."""
        return self.input_ids.shape[1] - self.txt_offset

    def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        return batch_indices(len(self), step, batch_size, seed)

    def batch(self, step: int, batch_size: int, seed: int) -> Dict[str, np.ndarray]:
        return self._gather(self.indices(step, batch_size, seed))

    def example_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
        return self._gather(np.arange(batch_size))

    def _gather(self, idx) -> Dict[str, np.ndarray]:
        return dict(pixels=self.pixels[idx], input_ids=self.input_ids[idx],
                    attention_mask=self.attention_mask[idx],
                    img_pos=np.broadcast_to(self._pos, (len(idx),) + self._pos.shape).copy())


def fixed_text_length(attention_mask: np.ndarray, txt_offset: int, max_text_tokens: int = 0) -> int:
    """The cache's rule: the longest caption's valid tokens after the offset, capped by max_text_tokens (> 0)."""
    longest = max(int(np.asarray(attention_mask, bool).sum(1).max()) - int(txt_offset), 1)
    return longest if max_text_tokens <= 0 else min(longest, int(max_text_tokens))


def tokenize_examples(images_and_captions, tokenizer, prompt_cfg, num_examples: int,
                      max_text_tokens: int = 0) -> RawDataset:
    """(uint8 images [b,H,W,3], captions [b]) chunks -> RawDataset of `num_examples` (no encoder pass)."""
    from lens_jax.text.prompt_encoding import tokenize_prompts
    imgs, ids, masks = [], [], []
    for images, captions in take_examples(images_and_captions, num_examples):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"raw images must be uint8, got {images.dtype}")
        imgs.append(images)
        i, m = tokenize_prompts(tokenizer, captions, prompt_cfg)
        ids.append(i)
        masks.append(m)
    offset = int(prompt_cfg.txt_offset)
    mask = np.concatenate(masks)
    length = offset + fixed_text_length(mask, offset, max_text_tokens)
    input_ids = np.ascontiguousarray(np.concatenate(ids)[:, :length]).astype(np.int32)
    mask = np.ascontiguousarray(mask[:, :length])
    pixels = np.concatenate(imgs)
    if pixels.shape[1] % 16 or pixels.shape[2] % 16:
        raise ValueError(f"image size {pixels.shape[1:3]} must be a multiple of 16")
    return RawDataset(pixels=pixels, input_ids=input_ids, attention_mask=mask, txt_offset=offset,
                      grid=(pixels.shape[1] // 16, pixels.shape[2] // 16))


def build_shapes_raw(config, tokenizer, prompt_cfg, chunk: int = 256) -> RawDataset:
    """The same `config.data.num_examples` shapes-world examples as `build_shapes_cache`, kept raw."""
    from lens_jax.data.synthetic import make_grain_dataset, world_config

    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    ds = make_grain_dataset(world, config.data.num_examples, chunk, seed=config.seed, caption=config.data.caption,
                            shuffle=False, num_epochs=1, drop_remainder=False, image_format="uint8")
    stream = ((b["image"], b["caption"]) for b in ds)
    return tokenize_examples(stream, tokenizer, prompt_cfg, config.data.num_examples, config.data.max_text_tokens)
