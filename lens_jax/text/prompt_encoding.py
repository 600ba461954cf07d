"""Tokenisation of Harmony-templated prompts and assembly of the text features the Lens DiT consumes.

Pipeline (LENS_SPEC §4.3-4.4, §7.6 step 2)::

    prompts --render_prompt--> strings --tokenize_prompts--> ids [B, S], mask [B, S]      (S = max_length = 512)
            --encoder_fn-->    features [B, S, F]                                         (F = 4 * 2880 = 11520)
            --strip_offset-->  TextFeatures(features [B, L, F], mask [B, L])              (L = S - txt_offset = 415)

`encoder_fn(input_ids int32 [B, S], attention_mask bool [B, S]) -> [B, S, F]` is any callable, typically
``functools.partial(GptOssEncoder(cfg).apply, {'params': p})`` from :mod:`lens_jax.models.gpt_oss`.

Conventions:
  * No special tokens are added beyond those in the rendered string (no BOS/EOS).
  * Sequences are truncated to ``max_length`` (whole templated sequence) and right-padded with ``pad_id``.
  * The first ``txt_offset`` tokens (the rendered prefix, up to ``<|start|>user<|message|>``) are removed from the
    features and the mask. What remains is prompt tokens, the fixed assistant suffix, then padding (mask False).
  * Masked-out feature positions are exactly zero.
  * An **empty positive prompt is allowed**: it is rendered with an empty user turn and encoded normally (its valid
    tokens are then only the assistant suffix). Only the *negative* prompt has the special "empty means
    unconditional" meaning: an empty negative prompt gives all-zero features with an all-false mask, and the encoder
    is not run for it.
  * Nothing here touches the network; tokenizers are loaded from local files only.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lens_jax.text.harmony import (
    DEFAULT_DATE,
    DEFAULT_TXT_OFFSET,
    LENS_SYSTEM_PROMPT,
    LENS_THINKING,
    MAX_LENGTH,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    render_prefix,
    render_prompt,
    validate_date,
)

__all__ = [
    "PromptEncodingConfig",
    "TextFeatures",
    "EncoderFn",
    "load_tokenizer",
    "resolve_txt_offset",
    "resolve_pad_id",
    "tokenize_prompts",
    "strip_offset",
    "encode_prompts",
    "encode_cfg_batch",
    "unconditional_features",
    "pad_text_features",
    "concat_text_features",
    "apply_caption_dropout",
]

# encoder_fn(input_ids int32 [B, S], attention_mask bool [B, S]) -> features [B, S, F]
EncoderFn = Callable[[Any, Any], Any]


# --------------------------------------------------------------------------------------------------------------------
# Config and containers
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptEncodingConfig:
    """Settings for rendering and tokenising prompts.

    Attributes:
      date: ``YYYY-MM-DD`` date in the Harmony system message (pinned, LENS_SPEC §4.3).
      max_length: maximum length of the whole templated sequence in tokens (prefix included); 512 for Lens.
      txt_offset: number of leading tokens stripped from the features. 97 for the real GPT-OSS tokenizer with the
        default date/system prompt. ``None`` computes it as the token count of ``render_prefix`` with the tokenizer
        in use (useful for test tokenizers). Either way it is checked against the tokenizer at tokenisation time.
      pad_id: right-padding token id; 199999 (``<|endoftext|>``) for GPT-OSS. ``None`` looks up ``<|endoftext|>``
        (or the tokenizer's pad token) in the tokenizer.
      system: the Lens system prompt (developer instructions).
      thinking: the assistant's analysis-channel text.
    """

    date: str = DEFAULT_DATE
    max_length: int = MAX_LENGTH
    txt_offset: int | None = DEFAULT_TXT_OFFSET
    pad_id: int | None = PAD_TOKEN_ID
    system: str = LENS_SYSTEM_PROMPT
    thinking: str = LENS_THINKING

    def __post_init__(self):
        # Normalise/validate the date once (accepts datetime.date too).
        object.__setattr__(self, "date", validate_date(self.date))
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length must be a positive int; got {self.max_length!r}")
        if self.txt_offset is not None and (not isinstance(self.txt_offset, int) or self.txt_offset < 0):
            raise ValueError(f"txt_offset must be a non-negative int or None; got {self.txt_offset!r}")
        if self.pad_id is not None and (not isinstance(self.pad_id, int) or self.pad_id < 0):
            raise ValueError(f"pad_id must be a non-negative int or None; got {self.pad_id!r}")


class TextFeatures(NamedTuple):
    """Text conditioning for the DiT (a pytree, so it can be passed through `jax.jit`).

    Attributes:
      features: [B, L, F] raw (un-normalised) concatenated GPT-OSS layer features after the offset; zero wherever
        `mask` is False.
      mask: [B, L] bool, True for valid text tokens. Right-padded: valid tokens form a prefix of each row.
    """

    features: Any
    mask: Any

    @property
    def lengths(self):
        """[B] int32 number of valid text tokens per row (the DiT's ``n_valid_txt``)."""
        return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer loading and tokenisation
# --------------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from local files only (never the network).

    Args:
      path: a local directory saved with ``save_pretrained`` (loaded with
        ``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a directory holding only ``tokenizer.json``
        also works), or the path of a ``tokenizer.json`` file (loaded with
        ``PreTrainedTokenizerFast(tokenizer_file=path)``).

    Raises:
      FileNotFoundError: if `path` does not exist (a hub repo id such as ``openai/gpt-oss-20b`` is *not* accepted).
      ValueError: if `path` is a file other than a ``*.json`` tokenizer file.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(
            f"Tokenizer path {p!r} does not exist. load_tokenizer only reads local files (a directory saved with "
            "save_pretrained, or a tokenizer.json file); it never downloads from a hub."
        )
    if os.path.isfile(p):
        if not p.endswith(".json"):
            raise ValueError(f"Tokenizer file {p!r} is not a tokenizer.json; pass its directory instead.")
        return PreTrainedTokenizerFast(tokenizer_file=p)
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # e.g. a bare directory with tokenizer.json but no tokenizer_config.json
        tok_json = os.path.join(p, "tokenizer.json")
        if os.path.isfile(tok_json):
            return PreTrainedTokenizerFast(tokenizer_file=tok_json)
        raise ValueError(f"Could not load a tokenizer from local directory {p!r}: {e}") from e


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without added special tokens (special-token strings in `text` are still recognised)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _prefix_ids(tokenizer, cfg: PromptEncodingConfig) -> list[int]:
    return _encode(tokenizer, render_prefix(cfg.date, cfg.system))


def resolve_txt_offset(tokenizer, cfg: PromptEncodingConfig) -> int:
    """The text offset for `cfg` with `tokenizer`, checked against the tokenised prefix.

    Returns ``len(tokenize(render_prefix(...)))`` when ``cfg.txt_offset`` is None; otherwise ``cfg.txt_offset``
    after checking that the prefix tokenises to exactly that many tokens.

    Raises:
      ValueError: on a tokenizer/config mismatch.
    """
    n = len(_prefix_ids(tokenizer, cfg))
    if cfg.txt_offset is None:
        return n
    if n != cfg.txt_offset:
        raise ValueError(
            f"Harmony prefix (date={cfg.date!r}) tokenises to {n} tokens with this tokenizer, but txt_offset="
            f"{cfg.txt_offset}. The configured offset does not match the tokenizer / date / system prompt; use the "
            "real GPT-OSS tokenizer for txt_offset=97, or set txt_offset=None to derive it from the prefix."
        )
    return n


def resolve_pad_id(tokenizer, cfg: PromptEncodingConfig) -> int:
    """The padding id: ``cfg.pad_id``, or (if None) the tokenizer's ``<|endoftext|>`` / pad token id.

    Raises:
      ValueError: if no pad id can be found, or it lies outside the tokenizer's vocabulary.
    """
    vocab_size = len(tokenizer)
    pad_id = cfg.pad_id
    if pad_id is None:
        vocab = tokenizer.get_vocab()
        if PAD_TOKEN in vocab:
            pad_id = vocab[PAD_TOKEN]
        elif getattr(tokenizer, "pad_token_id", None) is not None:
            pad_id = tokenizer.pad_token_id
        else:
            raise ValueError(f"pad_id=None but the tokenizer has neither {PAD_TOKEN!r} nor a pad token.")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(
            f"pad_id={pad_id} is outside this tokenizer's vocabulary (size {vocab_size}); set pad_id to match the "
            f"tokenizer (199999 is <|endoftext|> in GPT-OSS), or None to look up {PAD_TOKEN!r}."
        )
    return int(pad_id)


def _as_prompt_list(prompts, name: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} must contain at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str; got {type(p).__name__}")
    return prompts


def tokenize_prompts(tokenizer, prompts: Sequence[str], cfg: PromptEncodingConfig | None = None):
    """Renders and tokenises prompts into fixed-length, right-padded id/mask arrays.

    Each prompt is rendered with :func:`render_prompt`, tokenised without added special tokens, truncated to
    ``cfg.max_length`` and right-padded with the pad id. An empty prompt is allowed (template only).

    The offset is checked at tokenisation time: the rendered prefix must tokenise to exactly ``txt_offset`` tokens,
    and the first ``txt_offset`` ids of every (untruncated) rendered prompt must equal the prefix ids -- otherwise a
    token merge across the prefix/prompt boundary would silently shift the offset.

    Args:
      tokenizer: a HuggingFace tokenizer (see :func:`load_tokenizer`).
      prompts: B prompt strings (a single str is treated as a batch of one).
      cfg: encoding settings (defaults: the Lens constants).

    Returns:
      (input_ids, attention_mask): numpy int32 [B, max_length] and bool [B, max_length].

    Raises:
      ValueError: on an offset mismatch, or a pad id outside the vocabulary.
    """
    cfg = cfg or PromptEncodingConfig()
    prompts = _as_prompt_list(prompts, "prompts")
    prefix = _prefix_ids(tokenizer, cfg)
    offset = resolve_txt_offset(tokenizer, cfg)
    pad_id = resolve_pad_id(tokenizer, cfg)

    texts = [render_prompt(p, cfg.date, cfg.system, cfg.thinking) for p in prompts]
    all_ids = _encode_batch(tokenizer, texts)

    b, s = len(prompts), cfg.max_length
    input_ids = np.full((b, s), pad_id, dtype=np.int32)
    mask = np.zeros((b, s), dtype=bool)
    for i, ids in enumerate(all_ids):
        if ids[:offset] != prefix:
            raise ValueError(
                f"Prompt {i} ({prompts[i][:40]!r}...): the first {offset} tokens of the rendered conversation differ "
                "from the tokenised prefix (a token merge across the prefix/prompt boundary?), so the text offset "
                "would not line up with the start of the prompt."
            )
        ids = ids[:s]
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return input_ids, mask


# --------------------------------------------------------------------------------------------------------------------
# Feature assembly
# --------------------------------------------------------------------------------------------------------------------


def strip_offset(features, mask, offset: int) -> tuple[Any, Any]:
    """Removes the first `offset` tokens from the features and the mask, zeroing masked-out positions.

    Args:
      features: [B, S, F] encoder features.
      mask: [B, S] bool attention mask (right-padded).
      offset: number of leading tokens to drop (static).

    Returns:
      (features [B, max(S - offset, 0), F], mask [B, max(S - offset, 0)] bool). Features are exactly zero wherever
      the returned mask is False. If ``S <= offset`` both are empty along the sequence axis.
    """
    features = jnp.asarray(features)
    mask = jnp.asarray(mask).astype(bool)
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"expected features [B, S, F] and mask [B, S]; got {features.shape} and {mask.shape}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0; got {offset}")
    f = features[:, offset:]
    m = mask[:, offset:]
    f = jnp.where(m[..., None], f, jnp.zeros((), f.dtype))
    return f, m


def unconditional_features(batch: int, length: int, feature_dim: int, dtype=jnp.float32) -> TextFeatures:
    """The "no text" conditioning: zeros [batch, length, feature_dim] and an all-false mask [batch, length].

    Used for the empty negative prompt (CFG) and for caption dropout (LENS_SPEC §4.4).
    """
    return TextFeatures(
        features=jnp.zeros((batch, length, feature_dim), dtype=dtype),
        mask=jnp.zeros((batch, length), dtype=bool),
    )


def pad_text_features(tf: TextFeatures, length: int) -> TextFeatures:
    """Right-pads [B, L, F] / [B, L] to `length` >= L with zeros / False."""
    cur = tf.mask.shape[1]
    if length < cur:
        raise ValueError(f"cannot pad text features of length {cur} to shorter length {length}")
    if length == cur:
        return tf
    extra = length - cur
    return TextFeatures(
        features=jnp.pad(tf.features, ((0, 0), (0, extra), (0, 0))),
        mask=jnp.pad(tf.mask, ((0, 0), (0, extra)), constant_values=False),
    )


def concat_text_features(parts: Sequence[TextFeatures]) -> TextFeatures:
    """Right-pads every part to the longest length and concatenates along the batch axis."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat_text_features needs at least one part")
    length = max(p.mask.shape[1] for p in parts)
    dtype = jnp.result_type(*[p.features.dtype for p in parts])
    padded = [pad_text_features(p, length) for p in parts]
    return TextFeatures(
        features=jnp.concatenate([p.features.astype(dtype) for p in padded], axis=0),
        mask=jnp.concatenate([p.mask for p in padded], axis=0),
    )


def apply_caption_dropout(tf: TextFeatures, keep) -> TextFeatures:
    """Caption dropout as "drop the whole text": rows with ``keep[b] == False`` become zeros + all-false mask.

    Args:
      tf: features [B, L, F], mask [B, L].
      keep: [B] bool.
    """
    keep = jnp.asarray(keep).astype(bool)
    return TextFeatures(
        features=jnp.where(keep[:, None, None], tf.features, jnp.zeros((), tf.features.dtype)),
        mask=tf.mask & keep[:, None],
    )


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _encode_tokenized(encoder_fn: EncoderFn, input_ids: np.ndarray, mask: np.ndarray, offset: int,
                      trim_to: int | None) -> TextFeatures:
    """Runs the encoder on (optionally trimmed) ids and strips the offset. Returns [B, L, F] / [B, L]."""
    s = input_ids.shape[1]
    if trim_to is not None:
        if not isinstance(trim_to, int) or trim_to <= 0:
            raise ValueError(f"trim_to must be a positive int or None; got {trim_to!r}")
        n_txt = int(max(mask.sum(axis=1).max() - offset, 0))
        length = min(_round_up(n_txt, trim_to), max(s - offset, 0))
        # The encoder is causal and the sequences are right-padded, so dropping trailing (padding) positions does
        # not change the features at the kept positions.
        s = min(s, offset + length)
    ids_j = jnp.asarray(input_ids[:, :s], dtype=jnp.int32)
    mask_j = jnp.asarray(mask[:, :s], dtype=bool)
    feats = encoder_fn(ids_j, mask_j)
    if feats.ndim != 3 or tuple(feats.shape[:2]) != tuple(ids_j.shape):
        raise ValueError(f"encoder_fn returned shape {tuple(feats.shape)}; expected [B, S, F] with [B, S] = "
                         f"{tuple(ids_j.shape)}")
    return TextFeatures(*strip_offset(feats, mask_j, offset))


def encode_prompts(
    encoder_fn: EncoderFn,
    tokenizer,
    prompts: Sequence[str],
    cfg: PromptEncodingConfig | None = None,
    negative_prompts: str | Sequence[str | None] | None = None,
    *,
    trim_to: int | None = None,
) -> TextFeatures:
    """Encodes prompts into DiT text conditioning.

    Args:
      encoder_fn: ``(input_ids int32 [B, S], attention_mask bool [B, S]) -> [B, S, F]``.
      tokenizer: the GPT-OSS tokenizer (or a compatible test tokenizer).
      prompts: B prompts; empty strings are allowed and encoded with the template only.
      cfg: encoding settings.
      negative_prompts: if given (not None), returns the CFG batch ``[cond, uncond]`` of size 2B exactly as
        :func:`encode_cfg_batch`. Leave it None for the positive branch only.
      trim_to: if set, trim the sequence to the longest valid text length in the batch rounded up to a multiple of
        `trim_to` (e.g. 64) instead of the full ``max_length - txt_offset``; the encoder input is trimmed likewise,
        which is exact because the encoder is causal and the padding is on the right.

    Returns:
      TextFeatures with features [B, L, F] and mask [B, L] (L = max_length - txt_offset unless trimmed); features
      are zero where the mask is False.
    """
    cfg = cfg or PromptEncodingConfig()
    if negative_prompts is not None:
        return encode_cfg_batch(encoder_fn, tokenizer, prompts, cfg, negative_prompts, trim_to=trim_to)
    input_ids, mask = tokenize_prompts(tokenizer, prompts, cfg)
    offset = resolve_txt_offset(tokenizer, cfg)
    return _encode_tokenized(encoder_fn, input_ids, mask, offset, trim_to)


def _as_negative_list(negative_prompts, batch: int) -> list[str]:
    if negative_prompts is None:
        return [""] * batch
    if isinstance(negative_prompts, str):
        return [negative_prompts] * batch
    negs = ["" if n is None else n for n in negative_prompts]
    if len(negs) != batch:
        raise ValueError(f"got {len(negs)} negative prompts for {batch} prompts")
    for i, n in enumerate(negs):
        if not isinstance(n, str):
            raise TypeError(f"negative_prompts[{i}] must be a str or None; got {type(n).__name__}")
    return negs


def encode_cfg_batch(
    encoder_fn: EncoderFn,
    tokenizer,
    prompts: Sequence[str],
    cfg: PromptEncodingConfig | None = None,
    negative_prompts: str | Sequence[str | None] | None = None,
    *,
    trim_to: int | None = None,
) -> TextFeatures:
    """Encodes the classifier-free-guidance batch ``[cond, uncond]`` (LENS_SPEC §4.4).

    * cond: the B positive prompts, encoded as in :func:`encode_prompts`.
    * uncond: for each row, an empty negative prompt (``""`` or None; the default) gives all-zero features with an
      all-false mask and is **not** passed to the encoder; a non-empty negative prompt is encoded exactly like a
      positive one. Positives and non-empty negatives share one encoder call.

    Args:
      negative_prompts: None (all empty), one str for every row, or B strings/None.
      Other arguments: as :func:`encode_prompts`.

    Returns:
      TextFeatures with features [2B, L, F] and mask [2B, L]: rows 0..B-1 are cond, rows B..2B-1 uncond, both
      right-padded with zeros/False to the common length L.
    """
    cfg = cfg or PromptEncodingConfig()
    prompts = _as_prompt_list(prompts, "prompts")
    b = len(prompts)
    negs = _as_negative_list(negative_prompts, b)
    neg_rows = [i for i, n in enumerate(negs) if n != ""]

    to_encode = prompts + [negs[i] for i in neg_rows]
    input_ids, mask = tokenize_prompts(tokenizer, to_encode, cfg)
    offset = resolve_txt_offset(tokenizer, cfg)
    enc = _encode_tokenized(encoder_fn, input_ids, mask, offset, trim_to)
    cond = TextFeatures(enc.features[:b], enc.mask[:b])

    length, feat_dim = enc.features.shape[1], enc.features.shape[2]
    uncond = unconditional_features(b, length, feat_dim, enc.features.dtype)
    if neg_rows:
        rows = jnp.asarray(neg_rows, dtype=jnp.int32)
        uncond = TextFeatures(
            features=uncond.features.at[rows].set(enc.features[b:]),
            mask=uncond.mask.at[rows].set(enc.mask[b:]),
        )
    return concat_text_features([cond, uncond])
