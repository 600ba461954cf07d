"""GPT-OSS text encoder: parity with transformers, MXFP4, checkpoint conversion and the 20B preset."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lens_jax.checkpoints.gpt_oss_convert import abstract_variables, convert_gpt_oss, expected_hf_shapes
from lens_jax.checkpoints.keys import CheckpointKeyError
from lens_jax.checkpoints.mxfp4 import dequantize_mxfp4
from lens_jax.checkpoints.safetensors_io import open_checkpoint, save_file
from lens_jax.models.gpt_oss import GptOssEncoder, gpt_oss_config, yarn_inv_freq

# The small parity configuration: hidden 64, 4 layers, 4 heads / 2 KV heads, head_dim 16, 8 experts top-2,
# window 8 (< sequence length 24), the real YaRN numbers; layers 1 and 3 are captured.
TINY = gpt_oss_config("tiny", vocab_size=128)
SEQ = 24
LENGTHS = (24, 15)


def _hf_config(cfg, **kw):
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
    hf = transformers.GptOssConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
        intermediate_size=cfg.intermediate_size, sliding_window=cfg.sliding_window, rms_norm_eps=cfg.rms_eps,
        swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
        rope_parameters={"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                         "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
                         "original_max_position_embeddings": cfg.rope_original_max_position,
                         "truncate": cfg.rope_truncate},
        **kw)
    hf._attn_implementation = "eager"
    return hf


def _random_hf_model(cfg, seed=0):
    """A GptOssForCausalLM with every weight randomised (norms, biases and sinks included), float32."""
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    transformers = pytest.importorskip("transformers")
    hf_cfg = _hf_config(cfg)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(hf_cfg).eval().float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("sinks"):
                p.copy_(r)
            elif name.endswith("router.weight"):
                p.copy_(r * 2.0 / np.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(r)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.copy_(r / np.sqrt(p.shape[1]))            # [E, in, out]
            else:
                p.copy_(r / np.sqrt(p.shape[-1]))           # Linear [out, in]
    return model


def _state_dict_np(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _inputs(cfg, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (len(LENGTHS), SEQ)).astype(np.int32)
    mask = np.arange(SEQ)[None, :] < np.array(LENGTHS)[:, None]
    ids = np.where(mask, ids, 0).astype(np.int32)
    return ids, mask


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _hf_selected(model, cfg, ids, mask):
    """Pre-final-norm outputs of the selected layers via forward hooks, plus the experts routed to."""
    torch = pytest.importorskip("torch")
    captured, experts = {}, set()
    hooks = []
    for k in cfg.selected_layers:
        hooks.append(model.model.layers[k].register_forward_hook(
            lambda mod, args, out, k=k: captured.__setitem__(k, (out[0] if isinstance(out, tuple) else out)
                                                             .detach().numpy().copy())))
    for layer in model.model.layers:
        hooks.append(layer.mlp.router.register_forward_hook(
            lambda mod, args, out: experts.update(out[2].flatten().tolist())))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return [captured[k] for k in cfg.selected_layers], experts


@pytest.fixture(scope="module")
def tiny_setup():
    model = _random_hf_model(TINY)
    sd = _state_dict_np(model)
    variables = convert_gpt_oss(sd, TINY, dtype=np.float32)
    return model, sd, variables


def _apply(cfg, variables, ids, mask):
    fn = jax.jit(lambda v, i, m: GptOssEncoder(cfg).apply(v, i, m))
    return np.asarray(fn(variables, jnp.asarray(ids), jnp.asarray(mask)))


def test_parity_with_transformers(tiny_setup):
    model, _, variables = tiny_setup
    ids, mask = _inputs(TINY)
    ref, experts = _hf_selected(model, TINY, ids, mask)
    assert len(experts) >= 4, f"routing is trivial: experts used {sorted(experts)}"
    feats = _apply(TINY, variables, ids, mask)
    h = TINY.hidden_size
    assert feats.shape == (2, SEQ, len(TINY.selected_layers) * h)
    assert np.isfinite(feats).all()
    for j, k in enumerate(TINY.selected_layers):
        for b, n in enumerate(LENGTHS):
            err = _rel_err(feats[b, :n, j * h:(j + 1) * h], ref[j][b, :n])
            print(f"layer {k} batch {b}: rel err {err:.2e}")
            assert err <= 1e-4, (k, b, err)
    # Padded positions are zero.
    assert not np.any(feats[1, LENGTHS[1]:])


def test_padding_does_not_change_valid_tokens(tiny_setup):
    _, _, variables = tiny_setup
    ids, mask = _inputs(TINY)
    ids = ids.copy()
    ids[1, LENGTHS[1]:] = TINY.vocab_size + 7  # out-of-range garbage at padded positions
    padded = _apply(TINY, variables, ids, mask)
    n = LENGTHS[1]
    single = _apply(TINY, variables, ids[1:, :n], mask[1:, :n])
    assert np.isfinite(padded).all()
    np.testing.assert_allclose(padded[1, :n], single[0], rtol=1e-5, atol=1e-5 * np.abs(single).max())


def test_ragged_matches_dense(tiny_setup):
    _, _, variables = tiny_setup
    ids, mask = _inputs(TINY, seed=3)
    ragged = _apply(TINY, variables, ids, mask)
    dense = _apply(dataclasses.replace(TINY, moe_impl="dense"), variables, ids, mask)
    assert _rel_err(ragged, dense) < 1e-5


def test_yarn_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
    for cfg in (gpt_oss_config("gpt_oss_20b"), TINY):
        rot = GptOssRotaryEmbedding(_hf_config(cfg))
        inv, factor = yarn_inv_freq(cfg)
        np.testing.assert_allclose(inv, rot.inv_freq.numpy(), rtol=3e-7, atol=0)  # <= ~1 ulp
        assert factor == rot.attention_scaling
        assert abs(factor - (0.1 * np.log(32) + 1)) < 1e-12


def test_dequantize_mxfp4_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 40, 5, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (3, 40, 5), dtype=np.uint8)   # the whole range, inf/subnormals included
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    ours = dequantize_mxfp4(blocks, scales, ml_dtypes.bfloat16, rows_per_chunk=7)
    assert ours.shape == tuple(ref.shape) == (3, 5 * 32, 40)
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.view(np.int16), ref.view(torch.int16).numpy())  # bit-exact
    # Untransposed layout [..., R, G*32].
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales, transpose=False).view(np.int16),
                                  ref.transpose(1, 2).contiguous().view(torch.int16).numpy())


def _quantize_sd(sd, cfg, rng):
    """Replace the plain expert weights by random MXFP4 blocks/scales; also return the dequantised plain dict."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    q, plain = {}, {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = v.shape
            blocks = rng.integers(0, 256, (e, n_out, n_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 126, (e, n_out, n_in // 32), dtype=np.uint8)
            q[k + "_blocks"], q[k + "_scales"] = blocks, scales
            ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                             dtype=torch.bfloat16)
            plain[k] = ref.float().numpy()
        else:
            q[k] = v.astype(ml_dtypes.bfloat16)
            plain[k] = q[k].astype(np.float32)
    return q, plain


def test_mxfp4_checkpoint_converts_and_runs(tiny_setup, tmp_path):
    torch = pytest.importorskip("torch")
    model, sd, _ = tiny_setup
    q, plain = _quantize_sd(sd, TINY, np.random.default_rng(5))
    path = os.path.join(tmp_path, "model.safetensors")
    save_file(q, path)
    reader = open_checkpoint(str(tmp_path))
    got = convert_gpt_oss(reader, TINY, dtype=np.float32)          # the full MXFP4 path, from safetensors
    want = convert_gpt_oss(plain, TINY, dtype=np.float32)          # the same weights, dequantised by transformers
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # The converted MXFP4 model matches transformers loaded with the dequantised weights.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in plain.items()})
    ids, mask = _inputs(TINY, seed=2)
    ref, _ = _hf_selected(model, TINY, ids, mask)
    feats = _apply(TINY, got, ids, mask)
    h = TINY.hidden_size
    for j in range(len(TINY.selected_layers)):
        for b, n in enumerate(LENGTHS):
            assert _rel_err(feats[b, :n, j * h:(j + 1) * h], ref[j][b, :n]) <= 1e-4
    # bfloat16 conversion (the default) gives bfloat16 leaves.
    bf = convert_gpt_oss(reader, TINY)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(bf))


def test_hf_names_and_key_errors(tiny_setup):
    _, sd, _ = tiny_setup
    # The names and shapes of the full causal-LM checkpoint are exactly what transformers produces.
    assert {k: v.shape for k, v in sd.items()} == expected_hf_shapes(TINY, quantized=False, full=True)

    # Later layers, model.norm and lm_head are ignored; only layers 0..1 are converted.
    cfg1 = dataclasses.replace(TINY, selected_layers=(1,))
    v = convert_gpt_oss(sd, cfg1, dtype=np.float32)
    assert sorted(v["params"]) == ["embedding", "layers_0", "layers_1"]

    bad = dict(sd)
    del bad["model.layers.0.self_attn.sinks"]
    del bad["model.layers.3.mlp.router.bias"]
    bad["model.layers.1.self_attn.q_proj.bias"] = np.zeros(3, np.float32)
    bad["model.layers.2.mlp.experts.gate_up_proj_blocks"] = np.zeros((8, 64, 2, 16), np.uint8)
    bad["model.extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointKeyError) as e:
        convert_gpt_oss(bad, TINY)
    msg = str(e.value)
    for name in ("model.layers.0.self_attn.sinks", "model.layers.3.mlp.router.bias",
                 "model.layers.1.self_attn.q_proj.bias", "model.extra.weight"):
        assert name in msg, name
    # The blocks switch detection to MXFP4, so every expert layer now misses its blocks/scales.
    assert "model.layers.0.mlp.experts.down_proj_scales" in msg
    assert "mis-shaped" in msg and "missing" in msg and "unexpected" in msg


def test_config_validation():
    with pytest.raises(ValueError, match="unknown GPT-OSS preset"):
        gpt_oss_config("gpt_oss_120b")
    with pytest.raises(ValueError, match="unknown GptOssConfig field"):
        gpt_oss_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="sorted and unique"):
        gpt_oss_config("tiny", selected_layers=(3, 1))
    with pytest.raises(ValueError, match="sorted and unique"):
        gpt_oss_config("tiny", selected_layers=(1, 1))
    with pytest.raises(ValueError, match="num_layers"):
        gpt_oss_config("tiny", selected_layers=(1, 4))
    with pytest.raises(ValueError, match="moe_impl"):
        gpt_oss_config("tiny", moe_impl="megablocks")
    c = gpt_oss_config("gpt_oss_20b")
    assert c.selected_layers == (5, 11, 17, 23) and c.feature_dim == 4 * 2880
    assert [c.is_sliding(i) for i in range(4)] == [True, False, True, False]


def test_gpt_oss_20b_abstract_init_and_param_count():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = gpt_oss_config("gpt_oss_20b")
    variables = abstract_variables(cfg)
    leaves = jax.tree.leaves(variables)
    ours = sum(int(np.prod(x.shape)) for x in leaves)
    assert sorted(variables["params"]) == ["embedding"] + sorted(f"layers_{i}" for i in range(24))

    hf_cfg = _hf_config(cfg)  # 24 layers, 32 experts (the HF defaults are 36 and 128)
    with torch.device("meta"):
        hf = transformers.GptOssModel(hf_cfg)
    hf_shapes = {"model." + k: tuple(v.shape) for k, v in hf.state_dict().items()}
    hf_count = sum(int(np.prod(s)) for k, s in hf_shapes.items() if k != "model.norm.weight")
    assert ours == hf_count == 20_335_620_864
    # The converter's expected names/shapes are exactly the meta model's (minus the final norm).
    assert expected_hf_shapes(cfg, quantized=False) == {k: s for k, s in hf_shapes.items()
                                                        if k != "model.norm.weight"}
    q = expected_hf_shapes(cfg, quantized=True)
    assert q["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (32, 5760, 90, 16)
    assert q["model.layers.23.mlp.experts.down_proj_scales"] == (32, 2880, 90)


def test_preset_truncates_layers():
    cfg = gpt_oss_config("gpt_oss_20b", selected_layers=(5,))
    variables = abstract_variables(cfg)
    assert sorted(variables["params"]) == ["embedding"] + sorted(f"layers_{i}" for i in range(6))
    specs = jax.eval_shape(GptOssEncoder(cfg).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 4), jnp.int32), jax.ShapeDtypeStruct((1, 4), jnp.bool_))
    import flax.linen as nn
    names = nn.get_partition_spec(specs)["params"]
    assert tuple(names["embedding"]) == ("vocab", "embed")
    assert tuple(names["layers_0"]["attn"]["q"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(names["layers_0"]["mlp"]["experts"]["down_kernel"]) == ("expert", "mlp", "embed")
    assert tuple(names["layers_0"]["attn"]["sinks"]) == ("heads",)
