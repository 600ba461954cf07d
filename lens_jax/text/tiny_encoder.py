"""Loads a GPT-OSS text encoder checkpoint plus its tokenizer into a ready-to-use prompt encoder.

Works for the research-scale encoder written by the `text_encoder` phase (e.g. `data/tiny/text_encoder/`, whose
meta records txt_offset, pad_id, max_length and date and which ships its tokenizer in `tokenizer/`) and for a real
converted GPT-OSS-20B directory (`tools/convert_checkpoint.py --kind=gpt_oss`) given `tokenizer_path`; there the
Lens defaults apply (max_length 512, offset computed from the tokenizer = 97, pad `<|endoftext|>` = 199999).

    encode_fn, tokenizer, pcfg, gcfg = load_text_encoder("data/tiny/text_encoder")
    tf = encode_fn(["a photo of two red circles"])   # TextFeatures: features [1, L, 4 * hidden] f32, mask [1, L]

L = pcfg.max_length - txt_offset unless `trim_to` is given (then the longest prompt rounded up to a multiple of it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from lens_jax.checkpoints import convert, orbax_io
from lens_jax.configs.base import DTYPES
from lens_jax.models.gpt_oss import GptOssConfig, GptOssEncoder
from lens_jax.text.harmony import DEFAULT_DATE, MAX_LENGTH
from lens_jax.text.prompt_encoding import (PromptEncodingConfig, TextFeatures, encode_prompts, load_tokenizer,
                                           resolve_pad_id, resolve_txt_offset)

TOKENIZER_DIR = "tokenizer"


def load_text_encoder(
    directory: str,
    tokenizer_path: Optional[str] = None,
    *,
    max_length: Optional[int] = None,
    date: Optional[str] = None,
    dtype: Any = None,
    trim_to: Optional[int] = None,
) -> Tuple[Callable[[Sequence[str]], TextFeatures], Any, PromptEncodingConfig, GptOssConfig]:
    """Restores a `gpt_oss` weights checkpoint and builds a jitted prompt encoder.

    Args:
      directory: an Orbax weights checkpoint of kind 'gpt_oss' (`lens_jax.json` + `tree/`).
      tokenizer_path: local tokenizer directory or tokenizer.json; default `<directory>/tokenizer`.
      max_length: whole templated sequence length in tokens; default the meta's `max_length`, else 512.
      date: Harmony date; default the meta's `date`, else the pinned 2026-05-23.
      dtype: compute dtype of the encoder; default the checkpoint's dtype (meta 'dtype'; float32 if absent).
      trim_to: passed to `encode_prompts` (trim the text length to the batch's longest prompt, rounded up).

    Returns:
      (encode_fn, tokenizer, prompt_config, model_config) where `encode_fn(prompts: list[str]) -> TextFeatures`
      with features float32 [B, L, len(selected_layers) * hidden] (zero where masked) and mask bool [B, L],
      L = max_length - txt_offset (the Harmony prefix stripped).

    Raises:
      FileNotFoundError: no checkpoint or no tokenizer.
      ValueError: the checkpoint is not of kind 'gpt_oss', or the tokenizer does not fit the recorded offset.
    """
    meta = orbax_io.load_meta(directory)
    if meta.get("kind") != "gpt_oss":
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, expected 'gpt_oss'")
    tok_path = tokenizer_path or os.path.join(directory, meta.get("tokenizer", TOKENIZER_DIR))
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}; pass tokenizer_path (a local tokenizer directory or "
                                "tokenizer.json)")
    tokenizer = load_tokenizer(tok_path)
    _, gcfg, variables = convert.load_converted(directory)

    pcfg = PromptEncodingConfig(
        date=date or meta.get("date", DEFAULT_DATE),
        max_length=int(max_length or meta.get("max_length", MAX_LENGTH)),
        txt_offset=meta.get("txt_offset"),   # None (real conversions): computed from the tokenizer (97 for GPT-OSS)
        pad_id=meta.get("pad_id"),           # None: the tokenizer's <|endoftext|>
    )
    # Resolve (and check) offset and pad id once, so the returned config is explicit.
    pcfg = dataclasses.replace(pcfg, txt_offset=resolve_txt_offset(tokenizer, pcfg),
                               pad_id=resolve_pad_id(tokenizer, pcfg))
    if len(tokenizer) > gcfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the encoder's vocabulary is {gcfg.vocab_size}")

    if dtype is None:
        dtype = DTYPES.get(meta.get("dtype", "float32"), jnp.float32)
    model = GptOssEncoder(gcfg, dtype=dtype)
    params = {"params": variables["params"]}

    # Parameters are a jit argument (not closed-over constants), which matters for the 20B encoder.
    apply = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask).astype(jnp.float32))

    def encoder_fn(input_ids, attention_mask):
        """int32 [B, S], bool [B, S] -> float32 [B, S, F]."""
        return apply(params, input_ids, attention_mask)

    def encode_fn(prompts: Sequence[str]) -> TextFeatures:
        """Prompts -> TextFeatures(features float32 [B, L, F], mask bool [B, L])."""
        return encode_prompts(encoder_fn, tokenizer, list(prompts), pcfg, trim_to=trim_to)

    encode_fn.params = params["params"]     # the loaded weights, for a reasoner that reuses them (loaded once)

    return encode_fn, tokenizer, pcfg, gcfg
