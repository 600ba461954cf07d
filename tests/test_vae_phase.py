"""The `vae` phase: the shipped research-scale VAE (data/tiny/vae) and the recipe that produces it."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.checkpoints.convert import load_converted
from lens_jax.data import synthetic
from lens_jax.models.vae import FluxVAE, encode_to_tokens, vae_config
from lens_jax.recipes import vae as vae_phase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "data", "tiny", "vae")
EXPERIMENT = os.path.join(REPO, "experiments", "vae.py")

# A random-init VAE reconstructs shapes-world images at ~6-9 dB; the shipped one at ~27 dB (held-out).
PSNR_THRESHOLD_DB = 24.0


def _experiment():
    import importlib.util
    spec = importlib.util.spec_from_file_location("experiments_vae", EXPERIMENT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fresh_images(image_size, n=16):
    """Shapes-world images never used for training or statistics (a different world seed): [n,S,S,3]."""
    cfg = synthetic.ShapesWorldConfig(image_size=image_size, seed=12345)
    return vae_phase.render_images(cfg, range(n))


def _psnr(model, variables, x):
    recon = jnp.clip(model.apply({"params": variables["params"]}, jnp.asarray(x)), -1.0, 1.0)   # mode recon
    return float(jnp.mean(vae_phase.psnr(recon, jnp.asarray(x))))


def test_config_variants():
    exp = _experiment()
    config = exp.get_config("tiny")
    assert config.phase == "vae"
    vcfg = vae_phase.validate(config)
    assert vcfg.packed_channels == 4 * vcfg.latent_channels
    with pytest.raises(ValueError, match="tiny"):
        exp.get_config("huge")


@pytest.mark.skipif(not os.path.isdir(SHIPPED), reason="data/tiny/vae not shipped")
def test_shipped_tiny_vae_reconstructs_and_normalises():
    kind, cfg, variables = load_converted(SHIPPED)
    assert kind == "flux2_vae"
    exp_cfg = vae_phase.build_vae_config(_experiment().get_config("tiny"))
    assert cfg == exp_cfg
    assert cfg.block_out_channels == vae_config("tiny").block_out_channels
    assert variables["latent_stats"]["mean"].shape == (cfg.packed_channels,)
    assert variables["latent_stats"]["var"].shape == (cfg.packed_channels,)
    image_size = json.load(open(os.path.join(SHIPPED, "lens_jax.json")))["training"]["image_size"]

    model = FluxVAE(cfg)
    x = _fresh_images(image_size)
    trained = _psnr(model, variables, x)
    random_vars = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    untrained = _psnr(model, random_vars, x)
    assert untrained < PSNR_THRESHOLD_DB - 5, untrained   # the threshold is meaningful
    assert trained > PSNR_THRESHOLD_DB, (trained, untrained)

    tokens = np.asarray(encode_to_tokens(model, variables, jnp.asarray(x)))   # [B, (S/16)^2, K]
    assert tokens.shape == (len(x), (image_size // 16) ** 2, cfg.packed_channels)
    assert abs(tokens.mean()) < 0.5, tokens.mean()
    assert 0.5 <= tokens.std() <= 2.0, tokens.std()


def test_recipe_runs_at_micro_scale(tmp_path):
    from lens_jax import main
    config = _experiment().get_config("tiny")
    config.num_steps = 3
    config.batch_size = 2
    config.log_every = 1
    config.stats_examples = 4
    config.eval_batch_size = 4
    config.num_png_images = 2
    config.data.num_examples = 8
    config.data.eval_examples = 2
    config.ceiling_prompts_per_task = 1
    summary = main.run(config, str(tmp_path))

    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        for key in ("loss", "recon", "kl", "psnr", "step_time_s"):
            assert math.isfinite(m[key]), (key, m)
    assert (tmp_path / "vae_reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "vae_summary.json"))["num_steps"] == 3

    kind, cfg, variables = load_converted(str(tmp_path / "vae"))
    assert kind == "flux2_vae" and cfg.latent_channels == config.vae.latent_channels
    var = np.asarray(variables["latent_stats"]["var"])
    assert var.shape == (cfg.packed_channels,) and np.all(np.isfinite(var)) and np.all(var >= 0)
    assert summary["latent_stats"]["num_images"] == 4
    ceiling = summary["shapes_eval_ceiling"]   # 3 untrained steps: a real score, but a poor one
    assert ceiling["num_images"] == 6 and set(ceiling["tasks"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert 0.0 <= ceiling["overall"] < 0.5
