"""How much a trained DiT reads its prompt: caption-loss gaps and image-to-text attention (diagnostics).

Two measurements that separate "the DiT cannot draw" from "the DiT does not listen":

* `caption_loss_gaps`: the flow-matching loss on real (latent, caption) pairs at fixed noise levels, with the
  true caption, with another example's caption (`shuffled`) and with no caption (all-false mask, the CFG
  unconditional branch). A DiT that uses its prompt has `shuffled - correct` clearly above zero at high sigma,
  where the caption decides colours, shapes and counts.
* `attention_to_text`: per layer, the softmax mass that image-token queries put on all text keys and on a set of
  "focus" text tokens (e.g. the colour and shape words of "a photo of a red circle"), against the share those
  tokens would get from uniform attention. Focus mass at or below uniform means the image stream is not
  retrieving the words that decide the picture.

Both take a model and its parameters (e.g. from `lens_jax.build.restore_dit`); `tools/probe_conditioning.py`
runs them on a pretrain workdir of the shapes world.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.diffusion import objective
from lens_jax.models import attention as attention_lib

RECORDING_KERNEL = "einsum_record"
_RECORDED: List[np.ndarray] = []


@attention_lib.register(RECORDING_KERNEL)
def _recording_attention(q, k, v, *, mask=None, prefix_lengths=None):
    """The 'einsum' kernel that also hands its probabilities [B, H, Tq, Tk] (float32) to the host recorder."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    jax.debug.callback(lambda p: _RECORDED.append(np.asarray(p)), probs, ordered=True)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


@contextlib.contextmanager
def recorded_attention():
    """Collects the probabilities of every 'einsum_record' attention call made inside the block, in call order."""
    _RECORDED.clear()
    out: List[np.ndarray] = []
    try:
        yield out
    finally:
        jax.effects_barrier()
        out.extend(_RECORDED)
        _RECORDED.clear()


def flow_loss(model, params, x0, img_pos, txt, txt_mask, sigma: float, eps) -> float:
    """Mean squared error of the velocity prediction (target eps - x0) at one noise level."""
    s = jnp.full((x0.shape[0],), sigma, jnp.float32)
    v = model.apply({"params": params}, objective.noise_latents(x0, eps, s), img_pos, txt, txt_mask, s)
    return float(objective.flow_matching_loss(v, objective.velocity_target(x0, eps))[0])


def caption_loss_gaps(model, params, batch: Dict[str, np.ndarray], sigmas: Sequence[float],
                      seed: int = 0) -> List[Dict[str, float]]:
    """Loss with the true, a shuffled and no caption at each sigma (same noise for all three).

    Args:
      batch: img [B, N, C] normalised latent tokens, img_pos [B, N, 3], txt [B, S, F], txt_mask [B, S] (B >= 2).
      sigmas: noise levels in (0, 1].
    Returns:
      [{sigma, correct, shuffled, null, caption_gain = shuffled - correct}] in the order of `sigmas`.
    """
    x0 = jnp.asarray(batch["img"], jnp.float32)
    b = x0.shape[0]
    if b < 2:
        raise ValueError("caption_loss_gaps needs at least 2 examples (the shuffled caption is another example's)")
    pos, txt, mask = (jnp.asarray(batch[k]) for k in ("img_pos", "txt", "txt_mask"))
    perm = np.roll(np.arange(b), 1)                 # every example gets its neighbour's caption: never its own
    rows = []
    for i, sigma in enumerate(sigmas):
        if not 0.0 < float(sigma) <= 1.0:
            raise ValueError(f"sigma must be in (0, 1]; got {sigma}")
        eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x0.shape, jnp.float32)
        correct = flow_loss(model, params, x0, pos, txt, mask, float(sigma), eps)
        shuffled = flow_loss(model, params, x0, pos, txt[perm], mask[perm], float(sigma), eps)
        null = flow_loss(model, params, x0, pos, jnp.zeros_like(txt), jnp.zeros_like(mask), float(sigma), eps)
        rows.append(dict(sigma=float(sigma), correct=correct, shuffled=shuffled, null=null,
                         caption_gain=shuffled - correct))
    return rows


def attention_to_text(model, params, x0, img_pos, txt, txt_mask, focus, sigma: float,
                      seed: int = 0) -> List[Dict[str, float]]:
    """Per layer: attention mass of image queries on text keys and on the `focus` text tokens.

    Args:
      model: an MMDiT (it is cloned with the recording attention kernel; its parameters are unchanged).
      x0: [B, N, C] clean latent tokens; noised to `sigma` with a seeded eps.
      txt, txt_mask: [B, S, F], [B, S] prompt features and validity.
      focus: [B, S] bool, the text tokens of interest (must be valid tokens).
    Returns:
      [{layer, text_mass, focus_mass, focus_uniform, focus_ratio}] where masses are averaged over batch, heads and
      image queries; focus_uniform is the focus share under uniform attention over all valid keys, and
      focus_ratio = focus_mass / focus_uniform (1 = no preference, < 1 = avoided).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    b, n, _ = x0.shape
    focus = np.asarray(focus, bool)
    mask = np.asarray(txt_mask, bool)
    if focus.shape != mask.shape:
        raise ValueError(f"focus {focus.shape} must match txt_mask {mask.shape}")
    if np.any(focus & ~mask):
        raise ValueError("focus marks padded (invalid) text tokens")
    probe = model.clone(attention=RECORDING_KERNEL)
    eps = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    xt = objective.noise_latents(x0, eps, sigma)
    with recorded_attention() as probs:
        out = probe.apply({"params": params}, xt, jnp.asarray(img_pos), jnp.asarray(txt), jnp.asarray(mask),
                          jnp.full((b,), sigma, jnp.float32))
        jax.block_until_ready(out)
    if not probs:
        raise RuntimeError("no attention probabilities were recorded")
    valid_keys = n + mask.sum(1)                                          # [B]
    focus_uniform = float(np.mean(focus.sum(1) / valid_keys))
    rows = []
    for layer, p in enumerate(probs):                                     # p [B, H, T, T]
        img_q = p[:, :, :n]                                               # image queries
        text_mass = float(img_q[..., n:].sum(-1).mean())
        focus_mass = float((img_q[..., n:] * focus[:, None, None, :]).sum(-1).mean())
        rows.append(dict(layer=layer, text_mass=text_mass, focus_mass=focus_mass, focus_uniform=focus_uniform,
                         focus_ratio=focus_mass / max(focus_uniform, 1e-12)))
    return rows


def word_token_mask(tokenizer, input_ids: np.ndarray, words: Sequence[str], offset: int,
                    length: Optional[int] = None) -> np.ndarray:
    """[B, L] bool: text tokens (after the template offset) whose piece is one of `words` (or its plural).

    Pieces are compared lower-cased with SentencePiece/BPE word markers ('▁', 'Ġ') and spaces stripped.
    """
    ids = np.asarray(input_ids)[:, offset:]
    if length is not None:
        ids = ids[:, :length]
    targets = {w.lower() for w in words} | {w.lower() + "s" for w in words}
    out = np.zeros(ids.shape, bool)
    for i, row in enumerate(ids):
        for j, t in enumerate(row):
            piece = tokenizer.decode([int(t)]).replace("▁", "").replace("Ġ", "").strip().lower()
            out[i, j] = piece in targets
    return out
