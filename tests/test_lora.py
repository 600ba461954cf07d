"""LoRA adapters on the DiT: identity at init, merged = unmerged, switch-off, sharding names, frozen base."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import lora
from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config


def _models(scan):
    cfg = mmdit_config("tiny")
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    return cfg, spec, MMDiT(cfg, scan_layers=scan), MMDiT(cfg, scan_layers=scan, lora=spec)


def _randomise_adapters(params, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.2 * jax.random.normal(next(keys), x.shape) if "lora" in jax.tree_util.keystr(p) else x, params)


@pytest.mark.parametrize("scan", [True, False])
def test_adapters_at_init_leave_the_output_unchanged_and_merge_exactly(scan):
    cfg, spec, plain, adapted = _models(scan)
    d = dummy_inputs(cfg, batch=2, h=3, w=3, text_len=5)
    d = dict(d, img=jax.random.normal(jax.random.key(3), d["img"].shape),
             txt=jax.random.normal(jax.random.key(4), d["txt"].shape), sigma=jnp.array([0.3, 0.8]))
    params = nn.meta.unbox(adapted.init(jax.random.key(0), **d)["params"])
    base, adapters = lora.split(params)
    n_layers = cfg.num_layers if not scan else 1
    assert len(adapters) == 10 * n_layers                # 4 attention + 6 MLP projections per block
    y_base = plain.apply({"params": base}, **d)
    np.testing.assert_array_equal(np.asarray(adapted.apply({"params": params}, **d)), np.asarray(y_base))
    trained = _randomise_adapters(params)
    y_lora = adapted.apply({"params": trained}, **d)
    y_merged = plain.apply({"params": lora.merge(trained, spec)}, **d)
    assert float(jnp.max(jnp.abs(y_lora - y_base))) > 1e-2
    np.testing.assert_allclose(np.asarray(y_merged), np.asarray(y_lora), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(adapted.apply({"params": lora.disable(trained)}, **d)),
                                  np.asarray(y_base))
    assert lora.count(trained) > 0 and not lora.has_lora(lora.merge(trained, spec))
    regrafted = lora.graft(*lora.split(trained))
    assert jax.tree.structure(regrafted) == jax.tree.structure(trained)


def test_adapters_carry_their_kernels_logical_axes():
    cfg, spec, _, adapted = _models(True)
    boxed = adapted.init(jax.random.key(0), **dummy_inputs(cfg))["params"]["transformer_blocks"]
    qkv, out = boxed["attn"]["img_qkv"], boxed["attn"]["to_out"]
    assert qkv["kernel"].names == ("layers", "embed", "qkv", "heads", "head_dim")
    assert qkv["lora_a"].names == ("layers", "embed", None)
    assert qkv["lora_b"].names == ("layers", None, "qkv", "heads", "head_dim")
    assert out["lora_a"].names == ("layers", "heads", "head_dim", None)
    assert "lora_a" not in boxed["img_mod"]             # modulation layers are not targets by default


def test_the_lora_policy_trains_only_adapters():
    import optax

    from lens_jax.train.sharding import DEFAULT_RULES, make_mesh
    from lens_jax.train.state import Net, TrainSpec, partition
    cfg, spec, _, adapted = _models(True)
    d = dummy_inputs(cfg)
    net = Net("dit", init=lambda k: adapted.init(k, **d)["params"], optimizer=optax.adam(1e-3), rules=DEFAULT_RULES,
              policy=lora.lora_policy(), ema_decay=0.5)
    state = TrainSpec([net]).create(make_mesh((1, 1, 1), jax.devices()[:1]))
    trained, frozen = partition(net, state["nets"]["dit"]["params"])
    n_trained = sum(x.size for x in jax.tree.leaves(trained))
    assert n_trained == lora.count(state["nets"]["dit"]["params"])
    assert sum(x.size for x in jax.tree.leaves(state["nets"]["dit"]["ema"])) == n_trained


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        lora.LoraSpec(rank=0)
    with pytest.raises(ValueError, match="regex"):
        lora.LoraSpec(targets="(")
