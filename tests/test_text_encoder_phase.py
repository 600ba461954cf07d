"""Tests for the `text_encoder` phase and the shipped research-scale encoder (`data/tiny/text_encoder/`).

(a) The shipped artifact loads offline, tokenises dense captions and GenEval-style prompts, gives finite causal
    features of the documented shape, and is a *trained* LM: its held-out perplexity on fresh captions is far below
    a random-init model's (~vocab size).
(b) The recipe still runs end to end at a micro setting through `lens_jax.main.run`.
"""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.checkpoints import convert, orbax_io
from lens_jax.configs.base import ConfigError, load_experiment
from lens_jax.data import synthetic
from lens_jax.models.gpt_oss import GptOssEncoder
from lens_jax.models.gpt_oss_lm import GptOssLM, encoder_params, lm_params_from_parts, next_token_loss
from lens_jax.recipes import text_encoder as phase
from lens_jax.text.harmony import HARMONY_SPECIAL_TOKENS, render_prefix
from lens_jax.text.prompt_encoding import tokenize_prompts
from lens_jax.text.tiny_encoder import load_text_encoder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO_ROOT, "data", "tiny", "text_encoder")
GENEVAL = ["a photo of two red circles", "a photo of three red circles",
           "a photo of a red circle left of a blue square", "a photo of a blue circle"]


@pytest.fixture(scope="module")
def shipped():
    assert os.path.isdir(SHIPPED), f"missing shipped encoder {SHIPPED}; run experiments/text_encoder.py:tiny"
    return load_text_encoder(SHIPPED)


def _fresh_captions(n, start=5_000_000):
    world = synthetic.ShapesWorldConfig()
    exs = [synthetic.example(start + i, world) for i in range(n)]
    return [e["dense"] for e in exs], [e["brief"] for e in exs]


def test_shipped_meta_and_tokenizer(shipped):
    _, tok, pcfg, gcfg = shipped
    meta = orbax_io.load_meta(SHIPPED)
    assert meta["kind"] == "gpt_oss" and len(gcfg.selected_layers) == 4
    assert meta["txt_offset"] == pcfg.txt_offset == len(tok(render_prefix(pcfg.date), add_special_tokens=False)
                                                         ["input_ids"])
    assert meta["pad_id"] == pcfg.pad_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(tok) == gcfg.vocab_size
    for s in HARMONY_SPECIAL_TOKENS:   # never split
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1
    dense, brief = _fresh_captions(16)
    ids, mask = tokenize_prompts(tok, dense + brief + GENEVAL, pcfg)   # offset check passes, nothing truncated
    assert mask[:, -1].sum() == 0, "a fresh caption fills max_length (truncated)"
    assert (ids < gcfg.vocab_size).all()
    # GenEval words are whole pieces (seen in training), not bytes / fragments.
    assert tok.tokenize("a photo of two red circles") == ["▁a", "▁photo", "▁of", "▁two", "▁red", "▁circles"]
    # The encoder params are exactly GptOssEncoder's tree.
    _, _, variables = convert.load_converted(SHIPPED)
    abstract = jax.eval_shape(GptOssEncoder(gcfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                              jnp.ones((1, 4), bool))
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)   # noqa: E731
    assert shapes(variables["params"]) == shapes(nn.meta.unbox(abstract["params"]))


def test_shipped_features(shipped):
    encode_fn, tok, pcfg, gcfg = shipped
    dense, _ = _fresh_captions(1)
    tf = encode_fn([dense[0]] + GENEVAL)
    b, L = 1 + len(GENEVAL), pcfg.max_length - pcfg.txt_offset
    assert tf.features.shape == (b, L, 4 * gcfg.hidden_size) and tf.features.dtype == jnp.float32
    assert tf.mask.shape == (b, L)
    f, m = np.asarray(tf.features), np.asarray(tf.mask)
    assert np.isfinite(f).all()
    assert (f[~m] == 0).all() and (np.abs(f[m]).sum(-1) > 0).all()
    # "two" vs "three": identical (causal) features before the differing token, different from it on.
    ids2 = tok("a photo of two red circles", add_special_tokens=False)["input_ids"]
    ids3 = tok("a photo of three red circles", add_special_tokens=False)["input_ids"]
    k = next(i for i, (x, y) in enumerate(zip(ids2, ids3)) if x != y)
    np.testing.assert_allclose(f[1, :k], f[2, :k], atol=1e-5)
    assert np.abs(f[1, k] - f[2, k]).max() > 1e-2
    # Every selected layer responds to the colour word ("red" vs "blue" circle).
    red, blue = encode_fn(["a photo of a red circle"]), encode_fn(["a photo of a blue circle"])
    j = len(tok("a photo of a", add_special_tokens=False)["input_ids"])
    diff = np.abs(np.asarray(red.features[0, j]) - np.asarray(blue.features[0, j])).reshape(4, -1).max(-1)
    assert (diff > 1e-2).all(), diff


def _normalised_word_gap(encode_fn, a: str, b: str, j: int) -> np.ndarray:
    """Per selected layer, the RMS of the difference of the RMS-normalised features (what the DiT's txt_norm sees)
    at token j of two prompts."""
    fa, fb = (np.asarray(encode_fn([p]).features[0, j]).reshape(4, -1) for p in (a, b))
    norm = lambda x: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)
    return np.sqrt(np.mean((norm(fa) - norm(fb)) ** 2, axis=-1))


def test_shipped_features_tell_the_words_apart(shipped):
    # The DiT reads RMS-normalised layers. An encoder trained from 0.02-scale embeddings (the GPT-OSS init) let its
    # blocks dwarf the embeddings: "circle" vs "square" differed by only 0.13 / 0.08 / 0.04 / 0.04 of the RMS and
    # the tiny DiT did not learn shape words; embedding_init_std=1.0 gives ~0.85 / 0.57 / 0.39 / 0.27 (RESULTS.md).
    encode_fn, tok, _, _ = shipped
    j = len(tok("a photo of a red", add_special_tokens=False)["input_ids"])
    for a, b in (("circle", "square"), ("circle", "triangle"), ("square", "triangle")):
        gap = _normalised_word_gap(encode_fn, f"a photo of a red {a}", f"a photo of a red {b}", j)
        assert gap[0] > 0.4 and (gap > 0.15).all(), (a, b, gap)
    gap = _normalised_word_gap(encode_fn, "a photo of a red circle", "a photo of a blue circle", j - 1)
    assert gap[0] > 0.4 and (gap > 0.15).all(), gap


def test_shipped_lm_perplexity(shipped):
    """The LM (encoder trunk + saved head) predicts fresh captions far better than chance (ln V ~ 6.9 nats)."""
    _, tok, pcfg, gcfg = shipped
    _, _, variables = convert.load_converted(SHIPPED)
    head = orbax_io.restore_weights(os.path.join(SHIPPED, "lm_head"))["params"]
    params = lm_params_from_parts(variables["params"], head)
    dense, brief = _fresh_captions(8)
    ids, mask = tokenize_prompts(tok, dense + brief, pcfg)
    loss_mask = mask & (np.arange(mask.shape[1])[None] >= pcfg.txt_offset)
    logits = jax.jit(GptOssLM(gcfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    loss, n = next_token_loss(logits, jnp.asarray(ids), jnp.asarray(loss_mask))
    assert int(n) > 500
    assert float(loss) < 1.0, f"held-out loss {float(loss):.3f} nats/token: the shipped LM looks untrained"
    assert math.log(gcfg.vocab_size) > 6.0


def test_lm_trunk_is_encoder():
    """GptOssLM's trunk params are exactly GptOssEncoder's, and the encoder reproduces the trunk's activations."""
    from lens_jax.models.gpt_oss import gpt_oss_config
    cfg = gpt_oss_config("tiny", vocab_size=50, num_layers=4, selected_layers=(0, 1, 2, 3), moe_impl="dense")
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
    mask = jnp.arange(12)[None] < jnp.array([[12], [7]])
    lm = nn.meta.unbox(GptOssLM(cfg).init(jax.random.key(0), ids, mask)["params"])
    enc = nn.meta.unbox(GptOssEncoder(cfg).init(jax.random.key(0), ids, mask)["params"])
    sub = encoder_params(lm, cfg)
    assert jax.tree.structure(sub) == jax.tree.structure(enc)
    assert jax.tree.map(jnp.shape, sub) == jax.tree.map(jnp.shape, enc)
    feats = GptOssEncoder(cfg).apply({"params": sub}, ids, mask)
    assert feats.shape == (2, 12, 4 * cfg.hidden_size) and bool(jnp.isfinite(feats).all())


def test_config_variants():
    c = load_experiment("text_encoder", "tiny")
    assert c.phase == "text_encoder" and len(c.model.selected_layers) == 4
    assert load_experiment("text_encoder").name == "tiny"
    with pytest.raises(ValueError, match="valid variants"):
        load_experiment("text_encoder", "huge")


def test_micro_run(tmp_path):
    from lens_jax import main as lens_main
    c = load_experiment("text_encoder", "tiny")
    c.data.num_examples = 64
    c.data.tokenizer_examples = 64
    c.data.eval_examples = 4
    c.data.template_repeats = 20
    c.tokenizer.vocab_size = 300
    c.tokenizer.byte_fallback = False
    c.model.hidden_size = 16
    c.model.num_heads = 2
    c.model.num_kv_heads = 1
    c.model.head_dim = 8
    c.model.num_experts = 4
    c.model.intermediate_size = 8
    c.seq_buckets = (384,)
    c.max_length = 384
    c.batch_size = 4
    c.eval_batch_size = 4
    c.num_steps = 3
    c.log_every = 1
    summary = lens_main.run(c, str(tmp_path))
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) and x["tokens"] > 0 and x["seq_len"] == 384 for x in train)
    assert math.isfinite(lines[-1]["heldout_loss"])
    out = tmp_path / "text_encoder"
    assert (out / "tree").is_dir() and (out / "lm_head" / "tree").is_dir()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.load(open(tmp_path / "text_encoder_summary.json"))["vocab_size"] == summary["vocab_size"]
    encode_fn, tok, pcfg, gcfg = load_text_encoder(str(out))
    assert pcfg.txt_offset == summary["txt_offset"] and gcfg.hidden_size == 16
    tf = encode_fn(["a photo of two red circles"])
    assert tf.features.shape == (1, 384 - pcfg.txt_offset, 64)
    assert np.isfinite(np.asarray(tf.features)).all() and int(tf.mask.sum()) > 5


def test_config_errors(tmp_path):
    c = load_experiment("text_encoder", "tiny")
    c.model.selected_layers = (1, 3)
    with pytest.raises(ConfigError, match="selected_layers"):
        phase.run(c, str(tmp_path))


def test_loader_on_a_converted_gpt_oss_directory(tmp_path):
    """A converted (HF-layout) GPT-OSS checkpoint has no prompt meta: offset, pad and max_length fall back to the
    Lens defaults computed from the given tokenizer."""
    from lens_jax.checkpoints.gpt_oss_convert import expected_hf_shapes
    from lens_jax.checkpoints.safetensors_io import save_file
    from lens_jax.models.gpt_oss import gpt_oss_config
    from tools import convert_checkpoint
    rng = np.random.default_rng(0)
    sd = {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
          for k, s in expected_hf_shapes(gpt_oss_config("tiny"), quantized=False, full=True).items()}
    sd = {k: v for k, v in sd.items() if v.ndim > 0}
    save_file(sd, str(tmp_path / "gpt_oss.safetensors"))
    dst = tmp_path / "converted"
    assert convert_checkpoint.main(["--kind=gpt_oss", f"--src={tmp_path / 'gpt_oss.safetensors'}", f"--dst={dst}",
                                    "--preset=tiny", "--dtype=float32"]) == 0
    dense, brief = _fresh_captions(20)
    lines = dense + brief + phase.template_lines("2026-05-23") * 5
    phase.train_tokenizer(lines, 200, False, str(tmp_path / "tok"))    # <= 256 ids: fits the 'tiny' preset
    encode_fn, tok, pcfg, gcfg = load_text_encoder(str(dst), tokenizer_path=str(tmp_path / "tok"))
    assert pcfg.max_length == 512 and pcfg.txt_offset == len(tok(render_prefix(), add_special_tokens=False)
                                                              ["input_ids"])
    assert pcfg.pad_id == tok.convert_tokens_to_ids("<|endoftext|>")
    tf = encode_fn(["a photo of two red circles"])
    assert tf.features.shape == (1, 512 - pcfg.txt_offset, gcfg.feature_dim)
    assert np.isfinite(np.asarray(tf.features)).all()
