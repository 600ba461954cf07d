"""The conditioning diagnostics (lens_jax/eval/conditioning.py): loss gaps and recorded image->text attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.eval import conditioning
from lens_jax.models.mmdit import MMDiT, image_positions, mmdit_config

B, S, SIDE = 4, 6, 2


@pytest.fixture(scope="module")
def model_and_inputs():
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg, attention="einsum", remat_policy="none", dtype=jnp.float32)
    n = SIDE * SIDE
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(B, n, cfg.in_channels)), jnp.float32)
    pos = jnp.broadcast_to(jnp.asarray(image_positions(SIDE, SIDE)), (B, n, 3))
    txt = jnp.asarray(rng.normal(size=(B, S, cfg.num_text_layers * cfg.text_dim)), jnp.float32)
    mask = jnp.asarray(np.arange(S)[None] < np.array([6, 5, 4, 6])[:, None])
    txt = txt * mask[..., None]
    params = model.init(jax.random.key(0), img, pos, txt, mask, jnp.full((B,), 0.5))["params"]
    # Perturb every weight (zero biases and unit norm scales included) so that the text visibly moves the output.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return model, params, dict(img=img, img_pos=pos, txt=txt, txt_mask=mask)


def test_loss_gaps_match_a_direct_computation(model_and_inputs):
    model, params, batch = model_and_inputs
    rows = conditioning.caption_loss_gaps(model, params, batch, [0.5, 0.9], seed=3)
    assert [r["sigma"] for r in rows] == [0.5, 0.9]
    eps = jax.random.normal(jax.random.fold_in(jax.random.key(3), 1), batch["img"].shape)
    xt = 0.1 * batch["img"] + 0.9 * eps
    v = model.apply({"params": params}, xt, batch["img_pos"], batch["txt"], batch["txt_mask"], jnp.full((B,), 0.9))
    assert rows[1]["correct"] == pytest.approx(float(jnp.mean((v - (eps - batch["img"])) ** 2)), rel=1e-5)
    for r in rows:
        assert r["shuffled"] != pytest.approx(r["correct"], rel=1e-4)     # another example's caption changes it
        assert r["null"] != pytest.approx(r["correct"], rel=1e-4)
        assert r["caption_gain"] == pytest.approx(r["shuffled"] - r["correct"])


def test_identical_captions_give_zero_gain(model_and_inputs):
    model, params, batch = model_and_inputs
    same = dict(batch, txt=jnp.broadcast_to(batch["txt"][:1], batch["txt"].shape),
                txt_mask=jnp.broadcast_to(batch["txt_mask"][:1], batch["txt_mask"].shape))
    (row,) = conditioning.caption_loss_gaps(model, params, same, [0.7])
    assert row["caption_gain"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        conditioning.caption_loss_gaps(model, params, batch, [1.5])
    with pytest.raises(ValueError, match="at least 2"):
        conditioning.caption_loss_gaps(model, params, {k: v[:1] for k, v in batch.items()}, [0.5])


def test_recording_kernel_is_the_einsum_kernel_and_masses_add_up(model_and_inputs):
    model, params, batch = model_and_inputs
    args = (batch["img"], batch["img_pos"], batch["txt"], batch["txt_mask"], jnp.full((B,), 0.6))
    ref = model.apply({"params": params}, *args)
    with conditioning.recorded_attention() as probs:
        out = model.clone(attention=conditioning.RECORDING_KERNEL).apply({"params": params}, *args)
        jax.block_until_ready(out)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    n = SIDE * SIDE
    assert len(probs) == model.config.num_layers
    assert probs[0].shape == (B, model.config.num_heads, n + S, n + S)
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[0][1, ..., n + 5] == 0)                # a padded text key gets no attention

    mask = np.asarray(batch["txt_mask"])
    all_text = conditioning.attention_to_text(model, params, batch["img"], batch["img_pos"], batch["txt"], mask,
                                              mask, 0.6)
    assert len(all_text) == model.config.num_layers
    for r in all_text:                                         # focus = every valid text token
        assert r["focus_mass"] == pytest.approx(r["text_mass"], rel=1e-6)
        assert 0.0 < r["text_mass"] < 1.0
    assert all_text[0]["focus_uniform"] == pytest.approx(np.mean(mask.sum(1) / (n + mask.sum(1))))
    one = np.zeros_like(mask)
    one[:, 0] = True
    part = conditioning.attention_to_text(model, params, batch["img"], batch["img_pos"], batch["txt"], mask, one, 0.6)
    assert all(p["focus_mass"] < a["focus_mass"] for p, a in zip(part, all_text))
    with pytest.raises(ValueError, match="padded"):
        bad = np.zeros_like(mask)
        bad[2, 5] = True                                       # example 2 has 4 valid tokens
        conditioning.attention_to_text(model, params, batch["img"], batch["img_pos"], batch["txt"], mask, bad, 0.6)


def test_word_token_mask_finds_colour_and_shape_words():
    from lens_jax.text.prompt_encoding import load_tokenizer, PromptEncodingConfig, tokenize_prompts
    tok = load_tokenizer("data/tiny/text_encoder/tokenizer")
    cfg = PromptEncodingConfig(max_length=448, txt_offset=107, pad_id=6)
    ids, _ = tokenize_prompts(tok, ["a photo of a red circle", "a photo of two blue squares"], cfg)
    m = conditioning.word_token_mask(tok, ids, ["red", "blue", "circle", "square"], 107, length=10)
    assert m.shape == (2, 10)
    assert m.sum(1).tolist() == [2, 2]
    assert m[0].nonzero()[0].tolist() == [4, 5] and m[1].nonzero()[0].tolist() == [4, 5]
