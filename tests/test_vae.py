"""FLUX.2 VAE: parity with diffusers `AutoencoderKLFlux2`, the token paths, and the checkpoint converter."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.checkpoints.keys import CheckpointKeyError, check_tree_shapes
from lens_jax.checkpoints.safetensors_io import open_checkpoint, save_file
from lens_jax.checkpoints.vae_convert import (abstract_variables, config_from_diffusers, convert_vae,
                                              expected_diffusers_shapes)
from lens_jax.models.vae import (FluxVAE, VAEConfig, decode_from_tokens, denormalize_latents,
                                 encode_to_tokens, normalize_latents, patchify, unpatchify, vae_config)

# Three stages with equal last widths (like FLUX.2's [.., 512, 512]) so every shortcut/up/down path occurs.
SMALL = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8)
B, H, W = 2, 16, 32  # non-square to catch H/W mix-ups


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_nchw(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def to_nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------------
# Pure functions and config (no torch)


def test_patchify_channel_order_and_inverse():
    z = np.random.default_rng(0).normal(size=(2, 6, 8, 5)).astype(np.float32)
    zp = np.asarray(patchify(jnp.asarray(z)))
    assert zp.shape == (2, 3, 4, 20)
    for c, p1, p2 in [(0, 0, 0), (0, 1, 0), (0, 0, 1), (3, 1, 1), (4, 1, 0)]:
        k = 4 * c + 2 * p1 + p2
        np.testing.assert_array_equal(zp[:, :, :, k], z[:, p1::2, p2::2, c])
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(zp))), z)


def test_normalize_roundtrip():
    rng = np.random.default_rng(1)
    zp = jnp.asarray(rng.normal(size=(2, 3, 3, 12)), jnp.float32)
    mean, var = rng.normal(size=12), rng.uniform(0.2, 2.0, size=12)
    zn = normalize_latents(zp, mean, var)
    np.testing.assert_allclose(np.asarray(zn), (np.asarray(zp) - mean) / np.sqrt(var + 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(denormalize_latents(zn, mean, var)), np.asarray(zp), rtol=1e-5, atol=1e-5)


def test_config_presets_and_errors():
    assert vae_config("flux2") == VAEConfig()
    assert vae_config("tiny", latent_channels=4).latent_channels == 4
    assert vae_config("flux2", block_out_channels=[64, 64]).block_out_channels == (64, 64)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae_config("nope")
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        vae_config("tiny", latent_chanels=4)
    with pytest.raises(ValueError, match="divisible"):
        vae_config("tiny", norm_num_groups=7)


def test_tiny_init_and_shapes_logical_axes():
    cfg = vae_config("tiny")
    model = FluxVAE(cfg)
    x = jnp.zeros((1, 16, 16, 3))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(abstract) == {"params", "latent_stats"}
    # Every parameter and statistic carries logical names.
    leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
    assert all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
    specs = nn.get_partition_spec(abstract)
    assert specs["params"]["encoder"]["conv_in"]["kernel"] == jax.P("conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["params"]["encoder"]["conv_norm_out"]["scale"] == jax.P("norm")
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x))
    np.testing.assert_array_equal(variables["latent_stats"]["mean"], np.zeros(64))
    np.testing.assert_array_equal(variables["latent_stats"]["var"], np.ones(64))
    assert cfg.downsample_factor == 8 and cfg.packed_channels == 64

    @jax.jit
    def run(variables, x):
        params_only = {"params": variables["params"]}
        mean, logvar = model.apply(variables, x, method=FluxVAE.encode_moments)
        # encode/decode work with the params alone (no latent_stats collection).
        z = model.apply(params_only, x, method=FluxVAE.encode)
        y = model.apply(params_only, z, method=FluxVAE.decode)
        tokens = encode_to_tokens(model, variables, x)
        img = decode_from_tokens(model, variables, tokens, 1, 1)
        # bf16 compute keeps working.
        y16 = FluxVAE(cfg, dtype=jnp.bfloat16).apply(variables, z, method=FluxVAE.decode_to_image)
        return mean, logvar, z, y, tokens, img, y16

    mean, logvar, z, y, tokens, img, y16 = run(variables, x)
    assert mean.shape == logvar.shape == z.shape == (1, 2, 2, 16)
    assert y.shape == img.shape == (1, 16, 16, 3)
    assert tokens.shape == (1, 1, 64)
    assert y16.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(y16))) <= 1.0


# ----------------------------------------------------------------------------------------------------
# diffusers parity


@pytest.fixture(scope="module")
def torch_vae():
    torch = pytest.importorskip("torch", reason="torch is needed for diffusers parity tests")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for parity tests")
    torch.manual_seed(0)
    n = len(SMALL["block_out_channels"])
    m = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n,
                                     up_block_types=("UpDecoderBlock2D",) * n, **SMALL).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # non-trivial norm affines and biases; noisy kernels
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.2 * p.std() * torch.randn_like(p))
        m.bn.running_mean.copy_(0.5 * torch.randn_like(m.bn.running_mean))
        m.bn.running_var.copy_(0.5 + torch.rand_like(m.bn.running_var))
        m.bn.num_batches_tracked.fill_(7)
    return m


@pytest.fixture(scope="module")
def converted(torch_vae):
    sd = {k: v.detach().numpy() for k, v in torch_vae.state_dict().items()}
    cfg = config_from_diffusers(dict(torch_vae.config))
    assert cfg == vae_config("flux2", **SMALL)
    return sd, cfg, convert_vae(sd, cfg)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(2).uniform(-1, 1, size=(B, H, W, 3)).astype(np.float32)


def test_encode_decode_parity(torch_vae, converted, images):
    import torch
    _, cfg, variables = converted
    model = FluxVAE(cfg)
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=FluxVAE.encode_moments))(variables, images)
    z = np.random.default_rng(3).normal(size=(B, H // 4, W // 4, cfg.latent_channels)).astype(np.float32)
    y = jax.jit(lambda v, z: model.apply(v, z, method=FluxVAE.decode))(variables, z)
    with torch.no_grad():
        post = torch_vae.encode(torch.from_numpy(to_nchw(images))).latent_dist
        y_ref = torch_vae.decode(torch.from_numpy(to_nchw(z))).sample
    errs = {"mean": rel_err(mean, to_nhwc(post.mean)), "logvar": rel_err(logvar, to_nhwc(post.logvar)),
            "decode": rel_err(y, to_nhwc(y_ref))}
    print("VAE parity rel errors:", errs)
    assert mean.shape == (B, H // 4, W // 4, cfg.latent_channels) and y.shape == (B, H, W, 3)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_token_paths_match_flux2_pipeline(torch_vae, converted, images):
    import torch
    Flux2Pipeline = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2").Flux2Pipeline
    _, cfg, variables = converted
    model = FluxVAE(cfg)
    bn_std = torch.sqrt(torch_vae.bn.running_var.view(1, -1, 1, 1) + torch_vae.config.batch_norm_eps)
    bn_mean = torch_vae.bn.running_mean.view(1, -1, 1, 1)

    # Encode path: Flux2Pipeline._encode_vae_image (argmax) followed by _pack_latents.
    tokens = encode_to_tokens(model, variables, jnp.asarray(images))
    with torch.no_grad():
        lat = torch_vae.encode(torch.from_numpy(to_nchw(images))).latent_dist.mode()
        lat = Flux2Pipeline._patchify_latents(lat)
        normed = (lat - bn_mean) / bn_std
        # The frozen BN in eval mode is the same normalisation.
        torch.testing.assert_close(torch_vae.bn(lat), normed, rtol=1e-5, atol=1e-5)
        ref_tokens = Flux2Pipeline._pack_latents(normed)
    h, w = H // 8, W // 8
    assert tokens.shape == (B, h * w, cfg.packed_channels)
    e_enc = rel_err(tokens, ref_tokens)

    # Decode path: the end of Flux2Pipeline.__call__ (unpack with ids, de-normalise, unpatchify, decode).
    tok = np.random.default_rng(4).normal(size=(B, h * w, cfg.packed_channels)).astype(np.float32)
    out = decode_from_tokens(model, variables, jnp.asarray(tok), h, w)
    with torch.no_grad():
        t = torch.from_numpy(tok)
        ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(B, cfg.packed_channels, h, w))
        lat = Flux2Pipeline._unpack_latents_with_ids(t, ids)
        lat = Flux2Pipeline._unpatchify_latents(lat * bn_std + bn_mean)
        ref = torch_vae.decode(lat).sample.clamp(-1, 1)
    e_dec = rel_err(out, to_nhwc(ref))
    print("VAE token-path rel errors:", {"encode_to_tokens": e_enc, "decode_from_tokens": e_dec})
    assert out.shape == (B, H, W, 3) and float(jnp.max(jnp.abs(out))) <= 1.0
    assert e_enc <= 1e-4 and e_dec <= 1e-4, (e_enc, e_dec)


def test_safetensors_roundtrip(converted, tmp_path):
    sd, cfg, variables = converted
    path = str(tmp_path / "vae.safetensors")
    save_file(sd, path)
    reader = open_checkpoint(path)
    got = convert_vae(reader, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)
    # Source dtype is kept with dtype=None (here bfloat16).
    import ml_dtypes
    bf = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in sd.items()}
    save_file(bf, path)
    got16 = convert_vae(open_checkpoint(path), cfg, dtype=None)
    assert got16["params"]["encoder"]["conv_in"]["kernel"].dtype == ml_dtypes.bfloat16


def test_key_errors_named(converted):
    sd, cfg, _ = converted
    bad = dict(sd)
    del bad["decoder.up_blocks.1.resnets.0.conv1.weight"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["quant_conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointKeyError) as e:
        convert_vae(bad, cfg)
    msg = str(e.value)
    assert "decoder.up_blocks.1.resnets.0.conv1.weight" in msg
    assert "encoder.extra.weight" in msg
    assert "quant_conv.bias: checkpoint (5,), expected (16,)" in msg
    # num_batches_tracked is optional.
    ok = {k: v for k, v in sd.items() if k != "bn.num_batches_tracked"}
    convert_vae(ok, cfg, verify=False)


def test_flux2_param_count_abstract():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = vae_config("flux2")
    abstract = abstract_variables(cfg)
    n_jax = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract["params"]))
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLFlux2()
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"FLUX.2 VAE parameters: lens_jax {n_jax:,}, diffusers {n_ref:,}")
    assert n_jax == n_ref == 84_046_115
    assert abstract["latent_stats"]["mean"].shape == (128,)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == expected_diffusers_shapes(cfg)
    assert config_from_diffusers(dict(ref.config)) == cfg
    # The converter's output layout equals the model's tree (shape-only check, nothing allocated).
    fake = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract)
    check_tree_shapes(abstract, fake, "self")
