"""Tests for the Lens MMDiT: exact size, official-layout loading vs a float64 NumPy reference,
padding invariance, attention kernels, remat, scan, precision and logical axis names."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lens_jax.checkpoints import lens_convert
from lens_jax.checkpoints.keys import CheckpointKeyError
from lens_jax.checkpoints.safetensors_io import open_checkpoint, save_file
from lens_jax.models import attention as attention_lib
from lens_jax.models import remat as remat_lib
from lens_jax.models.mmdit import (MMDiT, abstract_params, apply_official, count_params, image_positions,
                                   mmdit_config)
from tests.mmdit_reference import reference_forward

TINY = mmdit_config("tiny")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_official_state_dict(cfg, seed=0):
    """Random weights in the official layout; norms near 1, everything else O(0.3/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in lens_convert.official_shapes(cfg).items():
        if "norm" in name and name.endswith(".weight") and len(shape) == 1:
            sd[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 2:
            sd[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        else:
            sd[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return sd


def official_inputs(cfg, b=2, h=4, w=6, s=7, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, cfg.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((b, s, cfg.num_text_layers * cfg.text_dim)).astype(np.float32) * 3
    mask = np.ones((b, s), bool)
    if b > 1:
        mask[1, 4:] = False                  # second prompt is right-padded
    sigma = np.array([0.83, 0.21], np.float32)[:b]
    return x, sigma, ctx, mask


def test_lens_3p8b_has_exact_parameter_count_and_initialises_abstractly():
    model = MMDiT(mmdit_config("lens_3p8b"))
    abstract = abstract_params(model)
    leaves = jax.tree.leaves(nn.meta.unbox(abstract))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)   # nothing was allocated
    assert count_params(abstract) == 4_104_225_152
    # The official layout describes the same number of weights.
    assert sum(int(np.prod(s)) for s in lens_convert.official_shapes(model.config).values()) == 4_104_225_152


def test_every_parameter_has_logical_axis_names():
    specs = nn.get_partition_spec(abstract_params(MMDiT(TINY)))
    shapes = nn.meta.unbox(abstract_params(MMDiT(TINY)))
    for (path, spec), leaf in zip(jax.tree_util.tree_flatten_with_path(specs)[0], jax.tree.leaves(shapes)):
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) == len(leaf.shape), (path, spec, leaf.shape)
        assert spec[0] == "layers" or "transformer_blocks" not in jax.tree_util.keystr(path)


def test_official_checkpoint_matches_float64_numpy_reference():
    sd = random_official_state_dict(TINY)
    params = lens_convert.convert_lens_dit(sd, TINY)
    x, sigma, ctx, mask = official_inputs(TINY)
    cfg = dict(num_heads=TINY.num_heads, head_dim=TINY.head_dim, num_layers=TINY.num_layers,
               timestep_dim=TINY.timestep_dim, rope_axes=TINY.rope_axes)
    ref = reference_forward(sd, cfg, x, sigma, ctx, mask)
    out = apply_official(MMDiT(TINY), jax.tree.map(jnp.asarray, params), x, sigma, ctx, mask)
    assert out.shape == x.shape
    err = rel_err(out, ref)
    assert err <= 1e-4, err
    # Per-sample too, so the padded prompt is checked on its own.
    assert rel_err(out[1], ref[1]) <= 1e-4


def test_reference_detects_wrong_conventions():
    """The reference is sensitive to the conventions it checks (so the parity test can fail)."""
    sd = random_official_state_dict(TINY)
    x, sigma, ctx, mask = official_inputs(TINY)
    cfg = dict(num_heads=TINY.num_heads, head_dim=TINY.head_dim, num_layers=TINY.num_layers,
               timestep_dim=TINY.timestep_dim, rope_axes=TINY.rope_axes)
    ref = reference_forward(sd, cfg, x, sigma, ctx, mask)
    params = jax.tree.map(jnp.asarray, lens_convert.convert_lens_dit(sd, TINY))
    # Swap (scale, shift) of the final layer: must give a clearly different result.
    k = params["norm_out_linear"]["kernel"]
    d = TINY.hidden
    swapped = dict(params, norm_out_linear=dict(kernel=jnp.concatenate([k[:, d:], k[:, :d]], 1),
                                                bias=jnp.roll(params["norm_out_linear"]["bias"], d)))
    assert rel_err(apply_official(MMDiT(TINY), swapped, x, sigma, ctx, mask), ref) > 1e-2
    # Flipping sigma -> 1 - sigma (the Z-Image convention) must also differ.
    assert rel_err(apply_official(MMDiT(TINY), params, x, 1 - sigma, ctx, mask), ref) > 1e-2


def test_export_official_round_trips():
    sd = random_official_state_dict(TINY, seed=3)
    back = lens_convert.export_official(lens_convert.convert_lens_dit(sd, TINY), TINY)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_loads_bf16_safetensors_streaming(tmp_path):
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_official_state_dict(TINY, seed=4).items()}
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd, str(path))
    reader = open_checkpoint(str(tmp_path))
    seen = []
    params = lens_convert.convert_lens_dit(reader, TINY, dtype=np.float32, progress=seen.append)
    assert len(seen) == len(sd)
    np.testing.assert_array_equal(params["img_in"]["kernel"], sd["img_in.weight"].astype(np.float32).T)
    layer1_w2 = params["transformer_blocks"]["txt_mlp"]["w2"]["kernel"][1]
    np.testing.assert_array_equal(layer1_w2, sd["transformer_blocks.1.txt_mlp.w2.weight"].astype(np.float32).T)


def test_bad_checkpoint_keys_are_listed():
    sd = random_official_state_dict(TINY)
    del sd["proj_out.bias"]
    sd["transformer_blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    sd["img_in.weight"] = np.zeros((7, 7), np.float32)
    with pytest.raises(CheckpointKeyError) as e:
        lens_convert.convert_lens_dit(sd, TINY)
    msg = str(e.value)
    assert "proj_out.bias" in msg and "attn.extra.weight" in msg and "img_in.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def _init(cfg=TINY, seed=0, **kw):
    model = MMDiT(cfg, **kw)
    sd = random_official_state_dict(cfg, seed)
    return model, jax.tree.map(jnp.asarray, lens_convert.convert_lens_dit(sd, cfg))


def _tokens(x):
    b, c, h, w = x.shape
    return jnp.asarray(x.transpose(0, 2, 3, 1).reshape(b, h * w, c))


def test_padded_text_tokens_do_not_change_outputs():
    model, params = _init()
    x, sigma, ctx, mask = official_inputs(TINY, b=1, s=5)
    mask[:] = True
    pos = jnp.asarray(image_positions(4, 6))[None]
    base = model.apply({"params": params}, _tokens(x), pos, jnp.asarray(ctx), jnp.asarray(mask), jnp.asarray(sigma))
    # Append 6 padded text tokens holding large garbage values.
    junk = np.random.default_rng(9).standard_normal((1, 6, ctx.shape[-1])).astype(np.float32) * 50
    ctx2 = np.concatenate([ctx, junk], 1)
    mask2 = np.concatenate([mask, np.zeros((1, 6), bool)], 1)
    padded = model.apply({"params": params}, _tokens(x), pos, jnp.asarray(ctx2), jnp.asarray(mask2), jnp.asarray(sigma))
    assert rel_err(padded, base) <= 1e-5


def test_mixed_aspect_ratio_batch_with_padded_image_tokens():
    """Two aspect ratios in one batch, image tokens padded to a common N with a mask."""
    model, params = _init(seed=5)
    rng = np.random.default_rng(2)
    grids = [(4, 6), (6, 3)]                      # 24 and 18 tokens
    n = max(h * w for h, w in grids)
    s = 5
    ctx = rng.standard_normal((2, s, TINY.num_text_layers * TINY.text_dim)).astype(np.float32)
    tmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    sigma = np.array([0.4, 0.9], np.float32)
    img = np.zeros((2, n, TINY.in_channels), np.float32)
    pos = np.zeros((2, n, 3), np.int32)
    imask = np.zeros((2, n), bool)
    singles = []
    for i, (h, w) in enumerate(grids):
        tok = rng.standard_normal((h * w, TINY.in_channels)).astype(np.float32)
        img[i, :h * w], pos[i, :h * w], imask[i, :h * w] = tok, image_positions(h, w), True
        img[i, h * w:] = 100.0                    # garbage in padded slots
        pos[i, h * w:] = 77
        singles.append(model.apply({"params": params}, jnp.asarray(tok[None]), jnp.asarray(image_positions(h, w)[None]),
                                   jnp.asarray(ctx[i:i + 1]), jnp.asarray(tmask[i:i + 1]), jnp.asarray(sigma[i:i + 1])))
    out = model.apply({"params": params}, jnp.asarray(img), jnp.asarray(pos), jnp.asarray(ctx), jnp.asarray(tmask),
                      jnp.asarray(sigma), img_mask=jnp.asarray(imask))
    for i, (h, w) in enumerate(grids):
        assert rel_err(out[i, :h * w], singles[i][0]) <= 1e-5
        assert np.all(np.asarray(out[i, h * w:]) == 0)


def test_unconditional_branch_all_false_mask_is_finite():
    model, params = _init()
    x, sigma, ctx, mask = official_inputs(TINY)
    out = apply_official(model, params, x, sigma, np.zeros_like(ctx), np.zeros_like(mask))
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("use_image_mask", [False, True])
def test_attention_kernels_agree(use_image_mask):
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 19, 3, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    mask = np.ones((b, t), bool)
    mask[0, 15:] = False
    if use_image_mask:
        mask[1, 3:5] = False                 # not a prefix
        prefix = None
    else:
        prefix = jnp.asarray(mask.sum(1), jnp.int32)
    ref = attention_lib.get_attention("einsum")(q, k, v, mask=jnp.asarray(mask), prefix_lengths=prefix)
    for name in attention_lib.available():
        if name == "cudnn" and jax.default_backend() != "gpu":
            continue                         # cuDNN flash attention needs an NVIDIA GPU (tools/bench_dit.py)
        out = attention_lib.get_attention(name)(q, k, v, mask=jnp.asarray(mask), prefix_lengths=prefix)
        assert rel_err(out, ref) <= 1e-5, name
    # Masked keys really are ignored.
    v2 = v.at[0, 15:].set(1e3)
    out2 = attention_lib.get_attention("xla")(q, k, v2, mask=jnp.asarray(mask), prefix_lengths=prefix)
    assert rel_err(out2, ref) <= 1e-5


def test_model_output_same_for_each_attention_kernel():
    x, sigma, ctx, mask = official_inputs(TINY)
    outs = {}
    for name in ("einsum", "xla"):
        model, params = _init(attention=name)
        outs[name] = apply_official(model, params, x, sigma, ctx, mask)
    assert rel_err(outs["xla"], outs["einsum"]) <= 1e-5


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown attention"):
        attention_lib.get_attention("flash9")
    with pytest.raises(ValueError, match="unknown remat"):
        remat_lib.get_policy("sometimes")
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        mmdit_config("lens_9b")
    with pytest.raises(ValueError, match="unknown MMDiTConfig field"):
        mmdit_config("tiny", num_layer=3)
    with pytest.raises(ValueError, match="sum to head_dim"):
        mmdit_config("tiny", rope_axes=(4, 4, 4))


def _loss_and_grads(model, params, args):
    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, *args)))
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "save_qkv_attn"])
def test_remat_policies_match_no_remat(policy):
    x, sigma, ctx, mask = official_inputs(TINY)
    args = (_tokens(x), jnp.broadcast_to(jnp.asarray(image_positions(4, 6)), (2, 24, 3)), jnp.asarray(ctx),
            jnp.asarray(mask), jnp.asarray(sigma))
    base_model, params = _init()
    l0, g0 = _loss_and_grads(base_model, params, args)
    l1, g1 = _loss_and_grads(MMDiT(TINY, remat_policy=policy), params, args)
    assert abs(float(l1 - l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel_err(a, b) <= 1e-5 or np.linalg.norm(np.asarray(b)) == 0


def test_last_block_text_mlp_gets_zero_gradient():
    """Spec §2.3: the text MLP half of the last block cannot affect the output."""
    x, sigma, ctx, mask = official_inputs(TINY)
    args = (_tokens(x), jnp.broadcast_to(jnp.asarray(image_positions(4, 6)), (2, 24, 3)), jnp.asarray(ctx),
            jnp.asarray(mask), jnp.asarray(sigma))
    model, params = _init()
    _, g = _loss_and_grads(model, params, args)
    w1 = np.asarray(g["transformer_blocks"]["txt_mlp"]["w1"]["kernel"])
    assert np.all(w1[-1] == 0) and np.any(w1[0] != 0)


def test_unscanned_layers_match_scanned():
    x, sigma, ctx, mask = official_inputs(TINY)
    model, params = _init()
    blocks = params.pop("transformer_blocks")
    loop_params = dict(params)
    for i in range(TINY.num_layers):
        loop_params[f"transformer_blocks_{i}"] = jax.tree.map(lambda a: a[i], blocks)
    params["transformer_blocks"] = blocks
    a = apply_official(model, params, x, sigma, ctx, mask)
    b = apply_official(MMDiT(TINY, scan_layers=False), loop_params, x, sigma, ctx, mask)
    assert rel_err(b, a) <= 1e-6


def test_bf16_compute_with_fp32_params():
    x, sigma, ctx, mask = official_inputs(TINY)
    model, params = _init()
    ref = apply_official(model, params, x, sigma, ctx, mask)
    out = apply_official(MMDiT(TINY, dtype=jnp.bfloat16), params, x, sigma, ctx, mask)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 5e-2
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_text_positions_follow_the_image_grid():
    """1024^2 (64x64 tokens): text starts at 32; 1440^2 (90x90): rows -45..44, text starts at 45."""
    from lens_jax.models.mmdit import text_positions
    for (h, w), start in (((64, 64), 32), ((90, 90), 45), ((46, 92), 46), ((3, 5), 2)):
        pos = image_positions(h, w)
        assert pos[:, 1].min() == -(h - h // 2) and pos[:, 1].max() == h // 2 - 1
        tp = np.asarray(text_positions(jnp.asarray(pos[None]), None, 3))
        assert tp[0, 0].tolist() == [start] * 3 and tp[0, 2].tolist() == [start + 2] * 3
