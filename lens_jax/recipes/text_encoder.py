"""The `text_encoder` recipe (phase 'text_encoder'): a caption tokenizer and a small GPT-OSS-architecture causal LM (LENS_SPEC §4).

Steps of `run(config, workdir)`:
  1. captions: dense and brief captions of shapes-world scenes (`lens_jax.data.synthetic.example`); training scenes
     [0, data.num_examples), held-out scenes [data.heldout_start, data.heldout_start + data.eval_examples);
  2. tokenizer: a SentencePiece BPE model (byte fallback) trained on captions plus the Harmony template text, with
     the Harmony tokens (`<|start|>`, `<|message|>`, `<|end|>`, `<|channel|>`, `<|return|>`, `<|endoftext|>`) and
     the newline as user-defined symbols; exported as an equivalent `tokenizers` BPE model (same vocabulary and
     ids, merges derived from the piece order, Metaspace pre-tokenisation, Harmony tokens as special added
     tokens that are never split or merged) in a transformers fast-tokenizer directory that
     `prompt_encoding.load_tokenizer` loads offline. The prefix/prompt boundary (`...<|start|>user<|message|>`) is a
     special token, so the offset check of `tokenize_prompts` holds; it is verified on every training caption;
  3. LM: `GptOssLM` (the encoder trunk + final norm + untied head) trained with masked next-token cross-entropy on
     `render_prompt(caption)` token sequences; the loss covers the prompt and assistant-suffix tokens (positions
     >= txt_offset; the constant prefix is context only) and never padding. Sequences are right-padded to a few
     static lengths (`seq_buckets`), one bucket per batch. Net 'lm' of the shared trainer (lens_jax/train/:
     config.optim through train/optim.py, checkpoints every `checkpoint_every` steps and exact resume, the
     sampler's generator state being the data position); `workdir/metrics.jsonl` gets one JSON line per logged
     step (loss, target_tokens, norms, lr/lm, and the batch's `seq_len` and non-padding `tokens`);
  4. held-out loss / perplexity on fresh captions (nats per token, prompt + suffix tokens and caption tokens only);
  5. outputs under `<workdir>/text_encoder/` (or `config.output_dir`):
       tree/ + lens_jax.json   Orbax weights {'params': GptOssEncoder params}, meta kind 'gpt_oss' with the full
                               GptOssConfig, txt_offset, pad_id, max_length, date (`convert.load_converted` restores it)
       lm_head/                Orbax weights {'params': {final_norm, lm_head}} (LM evaluation only)
       tokenizer/              transformers fast tokenizer (tokenizer.json, tokenizer_config.json) + spm.model
     and `workdir/text_encoder_summary.json`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import time
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lens_jax.checkpoints import orbax_io
from lens_jax.configs.base import ConfigError, validate_trainer
from lens_jax.data import synthetic
from lens_jax.models.gpt_oss import EMBEDDING_INIT_STD, GptOssConfig, GptOssEncoder, gpt_oss_config
from lens_jax.models.gpt_oss_lm import GptOssLM, encoder_params, lm_head_params, next_token_loss
from lens_jax.text.harmony import HARMONY_SPECIAL_TOKENS, PAD_TOKEN, render_prefix, render_prompt, render_suffix
from lens_jax.text.prompt_encoding import PromptEncodingConfig, load_tokenizer, resolve_pad_id, tokenize_prompts
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.loop import LoopOptions
from lens_jax.train.optim import make_optimizer, validate_optim
from lens_jax.train.sharding import DEFAULT_RULES
from lens_jax.train.state import Net, TrainSpec
from lens_jax.train.step import Objective
from lens_jax.train.trainer import fit, one_device_mesh

CHECKPOINT_KIND = "gpt_oss"
LM_HEAD_KIND = "gpt_oss_lm_head"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "text_encoder_summary.json"
TOKENIZER_DIR = "tokenizer"
LM_HEAD_DIR = "lm_head"
NEWLINE = "\n"
UNK = "<unk>"
MODEL_TYPES = ("bpe",)


# ----------------------------------------------------------------------------------------------------
# Configuration


def build_model_config(config, vocab_size: int) -> GptOssConfig:
    """`config.model` (preset + GptOssConfig field overrides) with the tokenizer's vocabulary size."""
    fields = {k: v for k, v in config.model.items() if k != "preset"}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    fields["vocab_size"] = int(vocab_size)
    try:
        return gpt_oss_config(config.model.preset, **fields)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None


def validate(config) -> None:
    """Checks the text_encoder config once; raises ConfigError naming the offending option."""
    d, t = config.data, config.tokenizer
    if t.model_type not in MODEL_TYPES:
        raise ConfigError(f"config.tokenizer.model_type={t.model_type!r}; choose one of {MODEL_TYPES}")
    min_vocab = len(HARMONY_SPECIAL_TOKENS) + 2 + (256 if t.byte_fallback else 0) + 16
    if t.vocab_size < min_vocab:
        raise ConfigError(f"config.tokenizer.vocab_size={t.vocab_size} is too small; need >= {min_vocab}")
    if not config.embedding_init_std > 0:
        raise ConfigError(f"config.embedding_init_std={config.embedding_init_std} must be > 0")
    if len(tuple(config.model.selected_layers)) != 4:
        raise ConfigError(f"config.model.selected_layers={tuple(config.model.selected_layers)}: the Lens DiT reads "
                          "exactly 4 encoder layers")
    if max(config.model.selected_layers) != config.model.num_layers - 1:
        raise ConfigError("config.model.selected_layers must end with the last layer (num_layers - 1) so the encoder "
                          "is the whole LM trunk (the LM head reads the last layer)")
    for key in ("num_examples", "eval_examples", "tokenizer_examples"):
        if d[key] < 1:
            raise ConfigError(f"config.data.{key}={d[key]} must be >= 1")
    if d.heldout_start < d.num_examples:
        raise ConfigError(f"config.data.heldout_start={d.heldout_start} overlaps the training scenes "
                          f"[0, {d.num_examples})")
    if not 0.0 <= d.brief_fraction <= 1.0:
        raise ConfigError(f"config.data.brief_fraction={d.brief_fraction} must be in [0, 1]")
    buckets = tuple(config.seq_buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
        raise ConfigError(f"config.seq_buckets={buckets} must be increasing lengths >= 2")
    if config.max_length < buckets[-1]:
        raise ConfigError(f"config.max_length={config.max_length} < largest seq bucket {buckets[-1]}")
    for key in ("batch_size", "num_steps", "log_every", "eval_batch_size"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be >= 1")
    validate_optim(config.optim)
    validate_trainer(config)


# ----------------------------------------------------------------------------------------------------
# Captions


def captions(cfg: synthetic.ShapesWorldConfig, start: int, count: int) -> Tuple[List[str], List[str]]:
    """(dense, brief) caption lists of shapes-world scenes [start, start + count)."""
    dense, brief = [], []
    for i in range(start, start + count):
        ex = synthetic.example(i, cfg)
        dense.append(ex["dense"])
        brief.append(ex["brief"])
    return dense, brief


def template_lines(date: str) -> List[str]:
    """The Harmony template text split at special tokens and newlines (what the tokenizer sees between them)."""
    text = render_prefix(date) + render_suffix()
    pattern = "|".join(re.escape(s) for s in HARMONY_SPECIAL_TOKENS + (NEWLINE,))
    return [p for p in re.split(pattern, text) if p.strip()]


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _bpe_merges(pieces: Sequence[str], mergeable: Sequence[bool]) -> List[Tuple[str, str]]:
    """BPE merges reproducing SentencePiece's merge order from its piece list.

    A piece p (of a mergeable kind) comes from every split p = a + b with a and b in the vocabulary; merges are
    ranked by the id of the merged piece (SentencePiece orders BPE pieces by merge time), then by the parts' ids.
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for i, p in enumerate(pieces):
        if not mergeable[i] or len(p) < 2:
            continue
        for k in range(1, len(p)):
            a, b = p[:k], p[k:]
            if a in vocab and b in vocab and mergeable[vocab[a]] and mergeable[vocab[b]]:
                ranked.append((i, vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def train_tokenizer(lines: Sequence[str], vocab_size: int, byte_fallback: bool, out_dir: str):
    """Trains a SentencePiece BPE model on `lines` and exports it as a transformers fast tokenizer in `out_dir`.

    Ids: 0 = <unk>, then the Harmony special tokens in `HARMONY_SPECIAL_TOKENS` order, then '\\n', then (with byte
    fallback) the 256 byte pieces <0x00>..<0xFF>, then the learned pieces. No BOS/EOS are ever added.
    Returns the tokenizer as `load_tokenizer(out_dir)` loads it.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(HARMONY_SPECIAL_TOKENS)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=int(vocab_size), model_type="bpe",
        user_defined_symbols=specials + [NEWLINE], normalization_rule_name="identity", character_coverage=1.0,
        byte_fallback=bool(byte_fallback), split_digits=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        unk_piece=UNK, hard_vocab_limit=False, num_threads=2, minloglevel=2)
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special_ids = set(sp.piece_to_id(s) for s in specials + [NEWLINE])
    mergeable = [not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i) or sp.is_unused(i) or i in special_ids)
                 for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(pieces, mergeable), unk_token=UNK, fuse_unk=True,
                               byte_fallback=bool(byte_fallback)))
    # SentencePiece's whitespace convention: spaces become '▁' and every segment (between special tokens / newlines)
    # starts with one, as each SentencePiece training line did.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # Metaspace decoding after Fuse would drop every space ("abigredcircle"); replace "▁" first instead.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, unk_token=UNK,
                                 model_max_length=1 << 20)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "spm.model"), "wb") as f:
        f.write(proto)
    loaded = load_tokenizer(out_dir)
    for s in specials + [NEWLINE]:   # the exported ids must be SentencePiece's ids
        ids = loaded(s, add_special_tokens=False)["input_ids"]
        if ids != [sp.piece_to_id(s)]:
            raise RuntimeError(f"tokenizer export: {s!r} encodes to {ids}, expected [{sp.piece_to_id(s)}]")
    return loaded


def check_tokenizer(tokenizer, texts: Sequence[str], pcfg: PromptEncodingConfig,
                    byte_fallback: bool = True) -> Dict[str, Any]:
    """Verifies the template tokenises consistently: special tokens are single ids, the prefix ids are a prefix of
    every rendered caption (`tokenize_prompts` raises otherwise), and decoding keeps every non-space character. Returns statistics."""
    for s in HARMONY_SPECIAL_TOKENS:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"special token {s!r} tokenises to {len(ids)} ids")
    prefix = tokenizer(render_prefix(pcfg.date), add_special_tokens=False)["input_ids"]
    big = dataclasses.replace(pcfg, max_length=1 << 16)
    for i in range(0, len(texts), 512):   # raises ValueError on a prefix/prompt boundary merge
        tokenize_prompts(tokenizer, list(texts[i:i + 512]), big)
    # Lossless up to whitespace around special tokens and newlines (the Metaspace convention adds a space after
    # each special token on decode); words keep their boundaries (the reasoner decodes generated text).
    sample = render_prompt(texts[0] + (" Ünïcode ✓" if byte_fallback else ""), pcfg.date)
    decoded = tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"])
    words = lambda t: t.replace("<|", " <|").replace("|>", "|> ").split()  # noqa: E731
    if words(decoded) != words(sample):
        raise RuntimeError(f"tokenizer decode(encode(x)) loses text: {decoded[-200:]!r}")
    suffix = tokenizer(render_suffix(), add_special_tokens=False)["input_ids"]
    return {"prefix_tokens": len(prefix), "suffix_tokens": len(suffix), "checked_texts": len(texts)}


def tokenize_texts(tokenizer, texts: Sequence[str], date: str) -> List[np.ndarray]:
    """Rendered-and-tokenised captions (no truncation, no padding): a list of int32 [n_i] arrays."""
    rendered = [render_prompt(t, date) for t in texts]
    out = []
    for i in range(0, len(rendered), 1024):
        ids = tokenizer(rendered[i:i + 1024], add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(x, np.int32) for x in ids)
    return out


# ----------------------------------------------------------------------------------------------------
# Batches


def pad_batch(seqs: Sequence[np.ndarray], length: int, pad_id: int, offset: int):
    """Right-pads (and truncates) sequences to `length`.

    Returns dict of numpy arrays: input_ids int32 [B, length], attention_mask bool [B, length], loss_mask bool
    [B, length] (valid tokens at positions >= offset: the prompt and the assistant suffix).
    """
    b = len(seqs)
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for i, s in enumerate(seqs):
        s = s[:length]
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    loss_mask = mask & (np.arange(length)[None, :] >= offset)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


class BucketSampler:
    """Samples training batches: a kind (brief with probability `brief_fraction`, else dense), then a length
    bucket of that kind (proportional to its size), then `batch_size` distinct sequences of that bucket, padded to
    the bucket length. Deterministic given the seed."""

    def __init__(self, dense: List[np.ndarray], brief: List[np.ndarray], buckets: Sequence[int], batch_size: int,
                 brief_fraction: float, pad_id: int, offset: int, seed: int):
        self.buckets = tuple(int(x) for x in buckets)
        self.batch_size, self.brief_fraction = batch_size, brief_fraction
        self.pad_id, self.offset = pad_id, offset
        self.rng = np.random.default_rng(seed)
        self.pools = {}
        for kind, seqs in (("dense", dense), ("brief", brief)):
            pools = {}
            for s in seqs:   # longer than the last bucket: truncated into it
                blen = next((b for b in self.buckets if len(s) <= b), self.buckets[-1])
                pools.setdefault(blen, []).append(s)
            self.pools[kind] = {b: p for b, p in pools.items() if len(p) >= batch_size}
        if not self.pools["dense"] and not self.pools["brief"]:
            raise ConfigError(f"config.batch_size={batch_size} exceeds every length bucket's size; lower it or raise "
                              "config.data.num_examples")

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = self.next()
        self._last = {"seq_len": int(batch["input_ids"].shape[1]), "tokens": int(batch["attention_mask"].sum())}
        return batch

    def metrics(self) -> Dict[str, int]:
        """The last batch's padded length and non-padding tokens (merged into its metrics.jsonl row)."""
        return dict(getattr(self, "_last", {}))

    def get_state(self) -> Dict[str, Any]:
        """The sampler's position: its NumPy generator state (JSON-able)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def set_state(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def next(self) -> Dict[str, np.ndarray]:
        kind = "brief" if self.rng.random() < self.brief_fraction else "dense"
        if not self.pools[kind]:
            kind = "dense" if kind == "brief" else "brief"
        pools = self.pools[kind]
        lens = sorted(pools)
        sizes = np.array([len(pools[b]) for b in lens], np.float64)
        blen = lens[int(self.rng.choice(len(lens), p=sizes / sizes.sum()))]
        idx = self.rng.choice(len(pools[blen]), size=self.batch_size, replace=False)
        return pad_batch([pools[blen][i] for i in idx], blen, self.pad_id, self.offset)


# ----------------------------------------------------------------------------------------------------
# Training


def lm_objective(model: GptOssLM) -> Objective:
    """Masked next-token cross-entropy of net 'lm' (metrics: target_tokens)."""

    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params["lm"]}, batch["input_ids"], batch["attention_mask"])
        loss, n_tgt = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"target_tokens": n_tgt}
    return Objective(loss_fn=loss_fn, updates=("lm",), name="lm")


def evaluate(model: GptOssLM, params, seqs: Sequence[np.ndarray], length: int, pad_id: int, offset: int,
             suffix_tokens: int, batch_size: int) -> Dict[str, float]:
    """Held-out next-token loss in nats per token over (a) prompt + suffix tokens and (b) caption tokens only.

    All sequences are padded to `length` (one compiled shape). Returns {'loss', 'perplexity', 'caption_loss',
    'caption_perplexity', 'tokens', 'caption_tokens'}.
    """

    @jax.jit
    def nll_sums(params, ids, mask, loss_mask, cap_mask):
        logits = model.apply({"params": params}, ids, mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return (jnp.sum(nll * loss_mask[:, 1:]), jnp.sum(loss_mask[:, 1:]),
                jnp.sum(nll * cap_mask[:, 1:]), jnp.sum(cap_mask[:, 1:]))

    tot = np.zeros(4, np.float64)
    for i in range(0, len(seqs), batch_size):
        chunk = list(seqs[i:i + batch_size])
        n_real = len(chunk)
        chunk += [chunk[0]] * (batch_size - n_real)   # fixed batch shape; padded rows get an all-false loss mask
        b = pad_batch(chunk, length, pad_id, offset)
        b["loss_mask"][n_real:] = False
        lens = b["attention_mask"].sum(1)
        pos = np.arange(length)[None, :]
        cap = b["loss_mask"] & (pos < (lens - suffix_tokens)[:, None])
        out = nll_sums(params, *(jax.device_put(x) for x in (b["input_ids"], b["attention_mask"],
                                                              b["loss_mask"].astype(np.float32),
                                                              cap.astype(np.float32))))
        tot += np.array([float(x) for x in jax.device_get(out)])
    loss, cap_loss = tot[0] / max(tot[1], 1), tot[2] / max(tot[3], 1)
    return {"loss": loss, "perplexity": math.exp(loss), "caption_loss": cap_loss,
            "caption_perplexity": math.exp(cap_loss), "tokens": int(tot[1]), "caption_tokens": int(tot[3])}


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run(config, workdir: str) -> Dict[str, Any]:
    """Trains the tokenizer and the LM, saves the encoder checkpoint + tokenizer; returns the summary dict."""
    validate(config)
    t_start = time.time()
    out_dir = os.path.abspath(config.output_dir or os.path.join(workdir, "text_encoder"))
    world = synthetic.world_config(config.data.world, seed=config.data.seed)
    d = config.data

    # 1. Captions.
    dense, brief = captions(world, 0, d.num_examples)
    ho_dense, ho_brief = captions(world, d.heldout_start, d.eval_examples)
    logging.info("captions: %d train scenes, %d held-out scenes (%.1fs)", d.num_examples, d.eval_examples,
                 time.time() - t_start)

    # 2. Tokenizer.
    n_tok = min(d.tokenizer_examples, d.num_examples)
    lines = dense[:n_tok] + brief[:n_tok] + template_lines(config.date) * d.template_repeats
    tokenizer = train_tokenizer(lines, config.tokenizer.vocab_size, config.tokenizer.byte_fallback,
                                os.path.join(out_dir, TOKENIZER_DIR))
    pcfg = PromptEncodingConfig(date=config.date, max_length=int(config.max_length), txt_offset=None, pad_id=None)
    tok_stats = check_tokenizer(tokenizer, dense + brief + ho_dense + ho_brief, pcfg, config.tokenizer.byte_fallback)
    offset = tok_stats["prefix_tokens"]
    pad_id = resolve_pad_id(tokenizer, pcfg)
    pcfg = dataclasses.replace(pcfg, txt_offset=offset, pad_id=pad_id)
    vocab_size = len(tokenizer)
    logging.info("tokenizer: %d pieces, prefix %d tokens, suffix %d tokens, pad id %d", vocab_size, offset,
                 tok_stats["suffix_tokens"], pad_id)

    tr_dense = tokenize_texts(tokenizer, dense, config.date)
    tr_brief = tokenize_texts(tokenizer, brief, config.date)
    ho = tokenize_texts(tokenizer, ho_dense + ho_brief, config.date)
    lens = np.array([len(s) for s in tr_dense + tr_brief + ho])
    longest = int(lens.max())
    n_trunc = int((lens > config.max_length).sum())
    if n_trunc:
        logging.warning("%d of %d templated captions exceed max_length=%d tokens (longest %d) and are truncated",
                        n_trunc, len(lens), config.max_length, longest)

    # 3. Model and optimiser.
    mcfg = build_model_config(config, vocab_size)
    model = GptOssLM(mcfg)
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy, jnp.ones((1, 8), bool))["params"])
    enc_abstract = nn.meta.unbox(jax.eval_shape(GptOssEncoder(mcfg).init, jax.random.key(0), dummy,
                                                jnp.ones((1, 8), bool))["params"])
    enc_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), encoder_params(params, mcfg))
    if enc_shapes != jax.tree.map(lambda x: (x.shape, x.dtype), enc_abstract):
        raise RuntimeError("GptOssLM's trunk does not match GptOssEncoder's parameter tree")
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    n_enc = sum(int(x.size) for x in jax.tree.leaves(enc_abstract))
    tx, schedule = make_optimizer(config.optim, config.num_steps)

    def init(key):   # the seed's key; larger embeddings keep each word's identity in the features the DiT reads
        p = model.init(key, dummy, jnp.ones((1, 8), bool))["params"]
        return dict(p, embedding=jax.tree.map(lambda e: e * (config.embedding_init_std / EMBEDDING_INIT_STD),
                                              p["embedding"]))
    spec = TrainSpec([Net("lm", init=init, rules=DEFAULT_RULES, optimizer=tx, schedule=schedule)], seed=config.seed)
    sampler = BucketSampler(tr_dense, tr_brief, config.seq_buckets, config.batch_size, d.brief_fraction, pad_id,
                            offset, config.seed)
    logging.info("LM: %d parameters (encoder %d); %s", n_params, n_enc, mcfg)
    print(f"text_encoder: vocab {vocab_size}, prefix {offset} tokens, longest caption {longest} tokens, "
          f"LM {n_params:,} params (encoder {n_enc:,})", flush=True)

    mesh = one_device_mesh()
    shardings = {k: sharding_lib.batch_sharding(mesh, 2) for k in ("input_ids", "attention_mask", "loss_mask")}

    def make_source(start):
        if start.data_state is not None:
            sampler.set_state(start.data_state)
        return sampler

    t_train = time.time()
    result = fit(config, workdir, spec, [lm_objective(model)], make_source, mesh=mesh, batch_shardings=shardings,
                 options=LoopOptions(num_steps=int(config.num_steps), log_every=int(config.log_every),
                                     max_nonfinite_steps=int(config.max_nonfinite_steps)),
                 say=lambda m: print(m, flush=True))
    if result.preempted:
        print(f"stopped by SIGTERM at step {result.step}; rerun the same command to resume", flush=True)
        return dict(preempted=True, step=result.step)
    train_time = time.time() - t_train
    last = result.loop.last_metrics
    params = jax.device_get(result.state["nets"]["lm"]["params"])

    # 4. Held-out evaluation on fresh captions.
    ev = evaluate(model, params, ho, int(config.max_length), pad_id, offset, tok_stats["suffix_tokens"],
                  config.eval_batch_size)
    print(f"held-out: loss {ev['loss']:.4f} nats/token (ppl {ev['perplexity']:.3f}), caption-only loss "
          f"{ev['caption_loss']:.4f} (ppl {ev['caption_perplexity']:.3f}) over {ev['tokens']} tokens", flush=True)
    with open(os.path.join(workdir, METRICS_FILE), "a") as mf:
        mf.write(json.dumps({"step": config.num_steps, **{f"heldout_{k}": v for k, v in ev.items()}}) + "\n")

    # 5. Save the encoder subtree, the LM head and the meta.
    enc = encoder_params(params, mcfg)
    meta = {
        "kind": CHECKPOINT_KIND, "preset": config.model.preset, "config": dataclasses.asdict(mcfg),
        "dtype": "float32", "source": "lens_jax text_encoder phase (shapes-world captions)",
        "tokenizer": TOKENIZER_DIR, "lm_head": LM_HEAD_DIR,
        "txt_offset": offset, "pad_id": pad_id, "max_length": int(config.max_length), "date": config.date,
        "vocab_size": vocab_size, "num_parameters": n_enc, "heldout_loss": ev["loss"],
        "heldout_caption_loss": ev["caption_loss"], "train_steps": int(config.num_steps),
    }
    orbax_io.save_weights(out_dir, {"params": enc}, meta, overwrite=True)
    orbax_io.save_weights(os.path.join(out_dir, LM_HEAD_DIR), {"params": lm_head_params(params)},
                          {"kind": LM_HEAD_KIND, "config": dataclasses.asdict(mcfg)}, overwrite=True)

    summary = {
        "name": config.name, "output_dir": out_dir, "vocab_size": vocab_size, "txt_offset": offset, "pad_id": pad_id,
        "suffix_tokens": tok_stats["suffix_tokens"], "max_length": int(config.max_length),
        "longest_templated_caption_tokens": longest, "longest_caption_tokens": longest - offset
        - tok_stats["suffix_tokens"], "truncated_captions": n_trunc,
        "model": dataclasses.asdict(mcfg), "num_parameters": n_params, "encoder_parameters": n_enc,
        "feature_dim": mcfg.feature_dim, "train_steps": int(config.num_steps), "train_time_s": train_time,
        "total_time_s": time.time() - t_start, "final_train_loss": last.get("loss"),
        "heldout": ev, "artifact_bytes": _dir_size(out_dir), "date": config.date,
    }
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"saved encoder + tokenizer to {out_dir} ({summary['artifact_bytes'] / 1e6:.2f} MB) in "
          f"{summary['total_time_s']:.0f}s", flush=True)
    return summary
