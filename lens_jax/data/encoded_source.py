"""Training batches from the bucketed shard pipeline, encoded online by the frozen VAE and text encoder.

    source = EncodedSource(iter(build_pipeline(config.data, ...)), vae.encode_tokens, encode_text, text_len)
    batches = next(source)     # tuple of micro-batch dicts (one per scheduled base area), this process's rows
    source.get_state() / source.set_state(s)    # the shard iterator's state (checkpoint item 'data_iter')
    source.metrics()           # data statistics of the last step (merged into metrics.jsonl by the loop)

Per step, on the host and outside the jitted train step (LENS_SPEC §5.5, "lens_jax design note (SPMD)"):
  * images: `encode_micro_batch` groups each micro-batch by bucket (one pixel shape per group) and the VAE
    encodes each group; the group is zero-padded to the next power of two (at most the micro-batch size), so
    each bucket compiles at most ceil(log2 B) + 1 executables, all in the first steps. Tokens are padded to
    the area's largest bucket with zeros where `img_mask` is False.
  * text: the captions of all micro-batches of the step go through the text encoder in one call (a fixed
    batch size per step, so few compiles), then are cut or zero-padded to the FIXED length `text_len` (so
    the train step's shapes never change between steps). Captions longer than `text_len` are truncated and
    counted (`data/step_text_truncated`).

Each micro-batch becomes {img [B,N,C] float32, img_pos [B,N,3] int32, txt [B,L,F] float32,
txt_mask [B,L] bool, img_mask [B,N] bool} with B = this process's rows of the area's global micro-batch,
N = the area's max tokens and L = `text_len`: the fields `lens_jax.train.step.make_train_step` takes.

The state is exactly the shard iterator's (`ShardBatchIterator.get_state`), and encoding is a pure
function of the step's examples, so a run restored from a checkpoint sees bit-identical batches.
Encoding runs synchronously in `next()`: the host encodes while the device still runs the previous step
(dispatch is asynchronous), but on one device the frozen encoders queue behind the train step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.data.shard_pipeline import encode_micro_batch, step_metrics

FIELDS = ("img", "img_pos", "txt", "txt_mask", "img_mask")


def pow2_batches(encode: Callable[[np.ndarray], Any], max_batch: Optional[int] = None) -> Callable:
    """Wraps `encode(pixels [n, H, W, 3]) -> [n, T, C]` so n is zero-padded to the next power of two
    (capped at `max_batch`, when given and >= n); returns the first n rows as NumPy."""
    def fn(pixels: np.ndarray) -> np.ndarray:
        n = int(pixels.shape[0])
        m = 1 << max(0, (n - 1).bit_length())
        if max_batch is not None and n <= max_batch < m:
            m = int(max_batch)
        if m > n:
            pixels = np.concatenate([pixels, np.zeros((m - n,) + pixels.shape[1:], pixels.dtype)])
        return np.asarray(encode(pixels))[:n]
    return fn


def fit_text(features: np.ndarray, mask: np.ndarray, length: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts or zero-pads text features [B, L', F] / mask [B, L'] to `length`; also returns which rows lost
    valid tokens to the cut ([B] bool)."""
    features, mask = np.asarray(features), np.asarray(mask, bool)
    cur = mask.shape[1]
    truncated = mask[:, length:].any(axis=1) if cur > length else np.zeros((mask.shape[0],), bool)
    features, mask = features[:, :length], mask[:, :length]
    if cur < length:
        features = np.pad(features, ((0, 0), (0, length - cur), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, length - cur)))
    features = np.where(mask[..., None], features, np.zeros((), features.dtype))
    return features, mask, truncated


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 0..255 pixels -> float32 [-1, 1]; float pixels pass through as float32."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    return pixels.astype(np.float32, copy=False)


class EncodedSource:
    """The loop's batch source over a shard pipeline iterator (see the module docstring).

    Args:
      iterator: a `ShardBatchIterator` (`iter(build_pipeline(...))`): `next()` -> list of micro-batch dicts.
      vae_encode: images [n, H, W, 3] float in [-1, 1] -> tokens [n, (H/16)(W/16), C] (`FrozenVAE.encode_tokens`).
      encode_text: captions (list of str) -> TextFeatures-like (features [B, L', F], mask [B, L']).
      text_len: the fixed text length L of every batch.
      max_vae_batch: cap of the padded VAE group size (default: the micro-batch's size).
    """

    def __init__(self, iterator, vae_encode: Callable, encode_text: Callable, text_len: int,
                 max_vae_batch: Optional[int] = None):
        if int(text_len) <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.it = iterator
        self.vae_encode = vae_encode
        self.encode_text = encode_text
        self.text_len = int(text_len)
        self.max_vae_batch = max_vae_batch
        self._last: Dict[str, float] = {}

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[Dict[str, np.ndarray], ...]:
        mbs = next(self.it)
        return self.encode(mbs)

    # ---------------------------------------------------------------- encoding
    def _encode_images(self, mb: Dict[str, Any]) -> np.ndarray:
        cap = self.max_vae_batch or len(mb["pixels"])
        fn = pow2_batches(lambda px: self.vae_encode(to_unit_range(px)), cap)
        return encode_micro_batch(mb, fn).astype(np.float32, copy=False)

    def encode(self, mbs: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, np.ndarray], ...]:
        """The step's micro-batches (pipeline dicts) -> tuple of feature dicts; records the step's metrics."""
        captions: List[str] = [str(c) for mb in mbs for c in mb["caption"]]
        tf = self.encode_text(captions)
        txt, txt_mask, truncated = fit_text(np.asarray(tf.features, np.float32), tf.mask, self.text_len)
        out, start = [], 0
        for mb in mbs:
            b = len(mb["caption"])
            out.append(dict(img=self._encode_images(mb), img_pos=np.asarray(mb["img_pos"], np.int32),
                            txt=txt[start:start + b], txt_mask=txt_mask[start:start + b],
                            img_mask=np.asarray(mb["img_mask"], bool)))
            start += b
        n_trunc = int(truncated.sum())
        m = dict(step_metrics(mbs))
        m["data/step_text_tokens"] = int(txt_mask.sum())
        m["data/step_text_truncated"] = n_trunc
        m["data/micro_batches"] = len(mbs)
        if hasattr(self.it, "metrics"):
            m.update(self.it.metrics())
        self._last = m
        return tuple(out)

    # ---------------------------------------------------------------- loop contract
    def metrics(self) -> Dict[str, float]:
        """The last step's data statistics: `step_metrics` (padding, image tokens, skipped, examples per
        area), text tokens / truncations, and the pipeline's cumulative counters (`it.metrics()`: padding per
        area, skipped per reason, bucket histogram, bad shards). With several processes these count this
        process's share of the data (the loop logs process 0's)."""
        return dict(self._last)

    def get_state(self) -> Dict[str, Any]:
        return self.it.get_state()

    def set_state(self, state: Dict[str, Any]) -> None:
        self.it.set_state(state)

    def close(self) -> None:
        if hasattr(self.it, "close"):
            self.it.close()
