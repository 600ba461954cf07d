"""Research-scale training cache: shapes-world examples encoded once by the frozen VAE and text encoder.

At research scale the encoders are far cheaper to run once than every step (LENS_SPEC §4.6), so the
`pretrain` phase on the shapes world streams the examples through the Grain pipeline a single time,
stores normalised packed latents and raw text-layer features in memory, and draws every training batch
from the cache with an order that is a pure function of (seed, step) — so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from lens_jax.models.mmdit import image_positions


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices (of n) of global batch `step`: epoch-wise permutations seeded by (seed, epoch).
    A pure function of (n, step, batch_size, seed); shared by the cached and the raw (online) sources."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int64)


@dataclasses.dataclass
class EncodedDataset:
    """img [N, n, C] float32 tokens; txt [N, L, F] float32 features; mask [N, L] bool; grid (h, w); captions:
    the N caption strings (None when the cache was built without them)."""
    img: np.ndarray
    txt: np.ndarray
    mask: np.ndarray
    grid: Tuple[int, int]
    captions: Optional[List[str]] = None

    def __post_init__(self):
        self._pos = image_positions(*self.grid)
        if self.captions is not None and len(self.captions) != self.img.shape[0]:
            raise ValueError(f"{len(self.captions)} captions for {self.img.shape[0]} examples")

    def subset(self, keep: np.ndarray) -> "EncodedDataset":
        """The examples at indices `keep` (in that order), captions included."""
        keep = np.asarray(keep, np.int64)
        caps = None if self.captions is None else [self.captions[i] for i in keep]
        return EncodedDataset(img=self.img[keep], txt=self.txt[keep], mask=self.mask[keep], grid=self.grid,
                              captions=caps)

    def __len__(self) -> int:
        return self.img.shape[0]

    def indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Example indices of global batch `step`: epoch-wise permutations seeded by (seed, epoch)."""
        return batch_indices(len(self), step, batch_size, seed)

    def batch(self, step: int, batch_size: int, seed: int) -> Dict[str, np.ndarray]:
        idx = self.indices(step, batch_size, seed)
        return self._gather(idx)

    def example_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
        return self._gather(np.arange(batch_size))

    def _gather(self, idx) -> Dict[str, np.ndarray]:
        return dict(img=self.img[idx], img_pos=np.broadcast_to(self._pos, (len(idx),) + self._pos.shape).copy(),
                    txt=self.txt[idx], txt_mask=self.mask[idx])


def take_examples(images_and_captions, num_examples: int):
    """Yields (images, captions) chunks of the stream, the last one cut, until `num_examples` in all.

    Raises ValueError if the stream ends first (the caches never silently hold fewer examples).
    """
    count = 0
    for images, captions in images_and_captions:
        take = min(len(captions), num_examples - count)
        if take <= 0:
            break
        count += take
        yield images[:take], [str(c) for c in captions[:take]]
    if count < num_examples:
        raise ValueError(f"the data source ran out after {count} of {num_examples} examples")


def encode_examples(images_and_captions, vae, encode_text: Callable, num_examples: int,
                    max_text_tokens: int = 0, log: Callable[[str], None] = print) -> EncodedDataset:
    """Encodes (images [b,H,W,3] in [-1,1], captions [b]) chunks until `num_examples` are cached.

    Images are VAE-encoded chunk by chunk. Captions are text-encoded once per distinct caption (brief
    shapes-world captions repeat: 6,144 examples hold ~3,800 distinct ones), in chunks of similar length, and
    every example gets its caption's features; the encoder is causal and right-padded, so a caption's
    features do not depend on what it is batched with.
    """
    imgs, captions = [], []
    chunk = 0
    for images, caps in take_examples(images_and_captions, num_examples):
        imgs.append(np.asarray(vae.encode_tokens(images), np.float32))
        captions.extend(caps)
        chunk = max(chunk, len(caps))
        if len(imgs) % 8 == 0:
            log(f"  images: encoded {len(captions)}/{num_examples}")
    img = np.concatenate(imgs)
    distinct = sorted(set(captions), key=lambda c: (len(c), c))     # similar lengths share a chunk
    where = {c: i for i, c in enumerate(distinct)}
    inverse = np.fromiter((where[c] for c in captions), np.int64, len(captions))
    txts, masks = [], []
    for start in range(0, len(distinct), chunk):
        tf = encode_text(distinct[start:start + chunk])
        txts.append(np.asarray(tf.features, np.float32))
        masks.append(np.asarray(tf.mask, bool))
        if len(masks) % 8 == 0:
            log(f"  captions: encoded {min(start + chunk, len(distinct))}/{len(distinct)} distinct")
    log(f"  captions: {len(distinct)} distinct of {len(captions)} encoded")
    valid = np.concatenate([m.sum(1) for m in masks])[inverse]      # text tokens of every example's caption
    longest = int(valid.max())
    length = longest if max_text_tokens <= 0 else min(longest, max_text_tokens)
    cut = int((valid > length).sum())
    if cut:
        log(f"  cut {cut} of {len(captions)} captions to max_text_tokens={max_text_tokens} text tokens (longest "
            f"{longest}); --config.data.max_text_tokens=0 keeps them whole")

    def fit(a, n):   # chunks may have different text lengths: cut or zero-pad to n
        a = a[:, :n]
        return np.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))

    txt = np.concatenate([fit(t, length) for t in txts])[inverse]
    mask = np.concatenate([fit(m, length) for m in masks])[inverse]
    side = int(round(np.sqrt(img.shape[1])))
    return EncodedDataset(img=img, txt=txt, mask=mask, grid=(side, side), captions=captions)


def build_shapes_cache(config, vae, encode_text: Callable, chunk: int = 256) -> EncodedDataset:
    """Streams `config.data.num_examples` shapes-world examples through Grain and encodes them."""
    from lens_jax.data.synthetic import make_grain_dataset, world_config

    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    ds = make_grain_dataset(world, config.data.num_examples, chunk, seed=config.seed, caption=config.data.caption,
                            shuffle=False, num_epochs=1, drop_remainder=False)
    stream = ((b["image"], b["caption"]) for b in ds)
    return encode_examples(stream, vae, encode_text, config.data.num_examples, config.data.max_text_tokens)
