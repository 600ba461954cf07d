"""A GPT-OSS-architecture causal language model whose trunk is exactly the frozen encoder's parameter tree.

Used by the `text_encoder` phase to train a small GPT-OSS-style LM on captions; the encoder used by the DiT is
then just a subtree of the LM's parameters:

    LM params   = {embedding, layers_0 .. layers_{L-1}, final_norm, lm_head}
    encoder     = GptOssEncoder(config)  params = {embedding, layers_0 .. layers_{max(selected_layers)}}

`encoder_params(lm_params, config)` extracts that subtree; `lm_head_params(lm_params)` the rest. The layer
classes are reused from :mod:`lens_jax.models.gpt_oss` with identical module names, so the two trees agree
leaf for leaf (checked by `tests/test_text_encoder_phase.py`).

Extra LM parameters (not part of the encoder):
  final_norm/scale      [H]       ('norm',)
  lm_head/kernel        [H, V]    ('embed', 'vocab')     (untied; no bias)
"""
from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from lens_jax.models.gpt_oss import GptOssConfig, GptOssDecoderLayer, embed_tokens, rope_cos_sin
from lens_jax.models.layers import Dense, RMSNorm

Dtype = Any

LM_ONLY_KEYS = ("final_norm", "lm_head")


class GptOssLM(nn.Module):
    """Causal LM: embedding -> all `config.num_layers` decoder layers -> final RMSNorm -> untied LM head.

    Note: unlike the encoder, this builds every layer (0..num_layers-1), not only up to the last selected one.
    """
    config: GptOssConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
          input_ids: int32 [B, S] token ids (right-padded; any value at padded positions).
          attention_mask: bool [B, S], True for valid tokens.
        Returns:
          logits float32 [B, S, vocab_size]; logits[:, t] predicts token t + 1.
        """
        cfg = self.config
        s = input_ids.shape[1]
        valid = attention_mask.astype(bool)
        x = embed_tokens(self, cfg, input_ids, valid)   # same parameter as GptOssEncoder's
        cos, sin = rope_cos_sin(cfg, s)
        for i in range(cfg.num_layers):
            x = GptOssDecoderLayer(cfg, cfg.is_sliding(i), dtype=self.dtype, param_dtype=self.param_dtype,
                                   name=f"layers_{i}")(x, cos, sin, valid)
        x = RMSNorm(eps=cfg.rms_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
        logits = Dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(0.02), name="lm_head")(x)
        return logits.astype(jnp.float32)


def encoder_params(lm_params: Dict[str, Any], config: GptOssConfig) -> Dict[str, Any]:
    """The `GptOssEncoder(config)` parameter subtree of the LM params: embedding + layers_0..max(selected)."""
    keys = ["embedding"] + [f"layers_{i}" for i in range(config.num_built_layers)]
    return {k: lm_params[k] for k in keys}


def lm_head_params(lm_params: Dict[str, Any]) -> Dict[str, Any]:
    """The LM-only parameters (final norm and output projection)."""
    return {k: lm_params[k] for k in LM_ONLY_KEYS}


def lm_params_from_parts(enc_params: Dict[str, Any], head_params: Dict[str, Any]) -> Dict[str, Any]:
    """Reassembles LM params from the encoder subtree and the head (valid when every layer is in the encoder,
    i.e. max(selected_layers) == num_layers - 1)."""
    return {**enc_params, **head_params}


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array):
    """Masked next-token cross-entropy.

    Args:
      logits: float32 [B, S, V] from `GptOssLM`.
      input_ids: int32 [B, S].
      loss_mask: bool [B, S]; loss_mask[:, t] says whether token t is a *target* (t >= 1 is predicted from t - 1).
    Returns:
      (mean loss in nats per target token, number of target tokens) as float32 scalars.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = input_ids[:, 1:].astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]       # [B, S-1]
    m = loss_mask[:, 1:].astype(jnp.float32)
    n = jnp.sum(m)
    return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n
