"""Experiment files, the entry point's config handling, and config validation errors."""
import os
import subprocess
import sys

import pytest

from lens_jax.configs.base import ConfigError, load_experiment
from lens_jax.train import sharding as sharding_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pretrain_variants_hold_the_paper_recipe():
    s1 = load_experiment("pretrain")
    assert (s1.data.resolution, s1.batch_size, s1.optim.lr, s1.optim.clip_norm) == (512, 3072, 2e-4, 1.0)
    assert (s1.optim.b1, s1.optim.b2, s1.optim.schedule, s1.timestep.mu) == (0.9, 0.999, "constant", 1.06)
    assert s1.model.preset == "lens_3p8b"
    s2 = load_experiment("pretrain", "stage2")
    assert s2.data.buckets == "lens27" and tuple(s2.data.per_device_batch) == (24, 10, 6)
    assert s2.optim.lr == 1e-4 and s2.timestep.mu < 0        # token-count rule: 1.0 at 256 -> 1.3 at 4096
    assert (s2.timestep.mu_lo, s2.timestep.mu_hi, s2.timestep.n_lo, s2.timestep.n_hi) == (1.0, 1.3, 256, 4096)
    with pytest.raises(ValueError, match="unknown variant"):
        load_experiment("pretrain", "stage3")


def _main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lens_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_unknown_config_key_fails():
    r = _main("--config=experiments/pretrain.py:tiny", "--config.optim.lrate=3", "--workdir=/tmp/unused")
    assert r.returncode != 0 and "lrate" in r.stderr


def test_full_scale_without_dataset_names_the_option(tmp_path):
    r = _main("--config=experiments/pretrain.py", f"--workdir={tmp_path}")
    assert r.returncode == 2
    assert "--config.data.path" in r.stderr


def test_bad_model_choices_fail_clearly():
    from lens_jax.phases.pretrain import validate
    c = load_experiment("pretrain", "tiny")
    c.model.attention = "flash9"
    with pytest.raises(ConfigError, match="unknown attention"):
        validate(c)
    c = load_experiment("pretrain", "tiny")
    c.data.caption = "long"
    with pytest.raises(ConfigError, match="caption"):
        validate(c)


def test_mesh_shapes_and_rule_validation():
    assert sharding_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        sharding_lib.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding_lib.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="two sharding rules"):
        sharding_lib.validate_rules((("embed", "fsdp"), ("embed", "tensor")))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding_lib.validate_rules((("embed", "model"),))
    mesh = sharding_lib.make_mesh((2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_parameters_are_sharded_by_logical_rules():
    import jax
    from lens_jax.models.mmdit import MMDiT, abstract_params, mmdit_config
    mesh = sharding_lib.make_mesh((2, 2, 2))
    boxed = abstract_params(MMDiT(mmdit_config("tiny")))
    sh = sharding_lib.logical_shardings(boxed, mesh, sharding_lib.DEFAULT_RULES)
    assert sh["transformer_blocks"]["img_mlp"]["w1"]["kernel"].spec == jax.P(None, "fsdp", "tensor")
    assert sh["transformer_blocks"]["attn"]["img_qkv"]["kernel"].spec == jax.P(None, "fsdp", None, "tensor", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding_lib.logical_shardings(boxed, mesh, (("layers", None),))
