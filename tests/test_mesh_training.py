"""Mesh/sharding from config, sharded training equivalence, gradient accumulation and online encoding
(8 fake CPU devices, tests/conftest.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fm_setup import dit_spec, fm_objective
from lens_jax.configs.base import load_experiment
from lens_jax.models.mmdit import MMDiT, image_positions, mmdit_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.optim import make_optimizer
from lens_jax.train.state import Net, TrainSpec
from lens_jax.train.trainer import jit_step

TINY = load_experiment("pretrain", "tiny")                 # optimiser, timestep rule, dropout, EMA of the tiny run
CFG = mmdit_config("tiny", mlp_dim=96)                     # mlp divisible by the tensor axis
MU_RULE = dict(mu_lo=TINY.timestep.mu_lo, mu_hi=TINY.timestep.mu_hi, n_lo=TINY.timestep.n_lo,
               n_hi=TINY.timestep.n_hi)
RULES = sharding_lib.validate_rules(TINY.sharding.rules)
STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """JAX_STYLE rule 11: CPU tests compile with most XLA optimisations off (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def synthetic_batch(step, b=8, h=4, w=4, s=8, cfg=CFG):
    """A deterministic batch for `step` (random arrays seeded by the step)."""
    rng = np.random.default_rng([1234, step])
    return dict(img=rng.standard_normal((b, h * w, cfg.in_channels)).astype(np.float32),
                img_pos=np.broadcast_to(image_positions(h, w), (b, h * w, 3)).copy(),
                txt=rng.standard_normal((b, s, cfg.num_text_layers * cfg.text_dim)).astype(np.float32),
                txt_mask=np.arange(s)[None] < rng.integers(1, s + 1, (b, 1)))


def _mesh(shape):
    return sharding_lib.make_mesh(shape, jax.devices()[:int(np.prod(shape))])


def _setup(mesh_shape, optimizer=None):
    """(mesh, state, spec, objective) of the tiny run's optimiser, timestep rule, dropout and EMA."""
    mesh = _mesh(mesh_shape)
    model = MMDiT(CFG)
    opt, sched = make_optimizer(TINY.optim, TINY.num_steps)
    spec = dit_spec(model, optimizer or opt, sched, ema_decay=TINY.ema_decay, rules=RULES)
    objective = fm_objective(model, caption_dropout=TINY.data.caption_dropout, mu=TINY.timestep.mu, rules=RULES)
    return mesh, spec.create(mesh), spec, objective


def _train(mesh_shape, n=STEPS):
    mesh, state, spec, objective = _setup(mesh_shape)
    bsh = sharding_lib.batch_shardings(mesh, synthetic_batch(0))
    fn, _ = jit_step(spec, [objective], mesh, bsh, rules=RULES)
    with jax.set_mesh(mesh):
        losses = []
        for i in range(n):
            batch = {k: jax.device_put(v, bsh[k]) for k, v in synthetic_batch(i).items()}
            state, m = fn(state, batch)
            losses.append(float(m["loss"]))
    return state, losses, batch


@pytest.fixture(scope="module")
def one_device_losses():
    return _train((1, 1, 1))[1]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_matches_one_device(mesh_shape, one_device_losses):
    state, losses, batch = _train(mesh_shape)
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)
    # The batch is split over (fsdp, data): every device holds 8 / dp examples.
    dp = mesh_shape[0] * mesh_shape[1]
    assert batch["img"].addressable_shards[0].data.shape[0] == 8 // dp
    # Parameters, both Adam moments and the EMA really are sharded over fsdp x tensor.
    dit = state["nets"]["dit"]
    w1 = dit["params"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"]       # [layers, embed, mlp]
    adam = dit["opt_state"][1][0]
    copies = (w1, adam.mu["transformer_blocks"]["img_mlp"]["w1"]["kernel"],
              adam.nu["transformer_blocks"]["img_mlp"]["w1"]["kernel"],
              dit["ema"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"])
    _, fsdp, tensor = mesh_shape
    for x in copies:
        assert x.sharding.spec == jax.P(None, "fsdp", "tensor")
        assert x.addressable_shards[0].data.shape == (w1.shape[0], w1.shape[1] // fsdp, w1.shape[2] // tensor)
    if fsdp * tensor > 1:
        assert x.addressable_shards[0].data.size < x.size


def test_activation_constraints_reach_the_compiled_step():
    mesh, state, spec, objective = _setup((2, 2, 2))
    batch = synthetic_batch(0)
    fn, _ = jit_step(spec, [objective], mesh, sharding_lib.batch_shardings(mesh, batch), rules=RULES)
    with jax.set_mesh(mesh):
        text = fn.lower(state, batch).as_text()
    assert "sharding_constraint" in text and '"tensor"' in text


# ----------------------------------------------------------------------------- gradient accumulation

_SGD_STEPS = {}


def _sgd_delta(mesh_shape, batches, grad_accum_steps=1):
    """One SGD(lr=1) step from the same initial state: returns (params delta = -grad, metrics).

    The jitted step is built once per (mesh, accumulation); each batch structure compiles once.
    """
    key = (mesh_shape, grad_accum_steps)
    if key not in _SGD_STEPS:
        mesh, state, spec, objective = _setup(mesh_shape, optimizer=optax.sgd(1.0))
        fn, _ = jit_step(spec, [objective], mesh, None, grad_accum_steps=grad_accum_steps, rules=RULES, donate=False)
        _SGD_STEPS[key] = (mesh, state, fn)
    mesh, state, fn = _SGD_STEPS[key]
    batches = jax.device_put(batches, sharding_lib.batch_shardings(mesh, batches))
    with jax.set_mesh(mesh):
        new, m = fn(state, batches)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new["nets"]["dit"]["params"],
                         state["nets"]["dit"]["params"])
    return delta, jax.tree.map(float, m)


def _assert_same_grads(a, b, rtol=1e-5):
    """The two trees agree to rtol in relative L2 norm over all parameters.

    (Single small leaves such as a norm scale whose gradient cancels over the batch differ by up to ~7e-5
    between any two summation orders, e.g. one device vs mesh (2, 2, 2) on the same batch.)
    """
    la, lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)], [np.asarray(y, np.float64) for y in jax.tree.leaves(b)]
    err = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb))) / np.sqrt(sum(np.sum(y ** 2) for y in lb))
    assert err <= rtol, err


@pytest.mark.parametrize("mesh_shape,k", [((2, 2, 2), 2)])
def test_grad_accum_steps_equals_the_full_batch(mesh_shape, k):
    batch = synthetic_batch(3)
    ref, m_ref = _sgd_delta(mesh_shape, batch)
    got, m_got = _sgd_delta(mesh_shape, batch, grad_accum_steps=k)
    _assert_same_grads(got, ref)
    assert set(m_got) == set(m_ref)
    for key in ("loss", "grad_norm", "sigma_mean", "loss_hi_noise"):
        np.testing.assert_allclose(m_got[key], m_ref[key], rtol=1e-5)


def test_micro_batches_equal_the_whole_batch_and_weight_by_tokens():
    batch = synthetic_batch(5)
    halves = tuple({k: v[i::2] for k, v in batch.items()} for i in range(2))     # any split of the examples
    order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    whole = ({k: v[order] for k, v in batch.items()},)
    ref, m_ref = _sgd_delta((2, 2, 1), whole)
    got, m_got = _sgd_delta((2, 2, 1), halves)
    _assert_same_grads(got, ref)
    np.testing.assert_allclose(m_got["loss"], m_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose((m_got["loss_mb0"] + m_got["loss_mb1"]) / 2, m_got["loss"], rtol=1e-5)

    # Different shapes (a 4x4 grid and a padded 6x6 one): token-weighted mean, distinct draws per micro-batch.
    small = synthetic_batch(6, b=4)
    big = synthetic_batch(6, b=4, h=6, w=6)
    big["img_mask"] = np.arange(36)[None] < np.array([36, 30, 24, 20])[:, None]
    _, m = _sgd_delta((2, 2, 1), (small, big))
    n_small, n_big = 4 * 16, 36 + 30 + 24 + 20
    expect = (m["loss_mb0"] * n_small + m["loss_mb1"] * n_big) / (n_small + n_big)
    np.testing.assert_allclose(m["loss"], expect, rtol=1e-5)
    _, twice = _sgd_delta((2, 2, 1), (small, small))
    assert abs(twice["loss_mb0"] - twice["loss_mb1"]) > 1e-4          # not the same noise twice
    _, again = _sgd_delta((2, 2, 1), (small, big))
    assert again == m                                                   # deterministic


# ----------------------------------------------------------------------------- rules and mesh

def test_rule_validation_errors():
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        sharding_lib.validate_rules(RULES + (("embd", "fsdp"),))
    with pytest.raises(ValueError, match="two sharding rules"):
        sharding_lib.validate_rules(RULES + (("mlp", "fsdp"),))
    from lens_jax.models.mmdit import abstract_params
    boxed = abstract_params(MMDiT(CFG))
    conflict = tuple((n, "fsdp" if n == "mlp" else t) for n, t in RULES)     # embed and mlp both on fsdp
    with pytest.raises(ValueError, match=r"img_mlp.*w1.*'embed' and 'mlp' both map to mesh axis 'fsdp'"):
        sharding_lib.logical_shardings(boxed, _mesh((2, 2, 2)), conflict)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding_lib.logical_shardings(boxed, _mesh((2, 2, 2)), tuple(r for r in RULES if r[0] != "mod"))
    # The three rule sets of the experiment validate, and every name a model uses is known.
    c = load_experiment("pretrain")
    for rules in (c.sharding.rules, c.sharding.vae_rules, c.sharding.text_encoder_rules):
        sharding_lib.validate_rules(rules)


def test_mesh_from_config_with_dcn():
    c = load_experiment("pretrain")
    c.mesh.shape = (-1, 2, 1)
    c.mesh.dcn_shape = (2, 1, 1)
    mesh = sharding_lib.mesh_from_config(c, simulate_granules=True)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}   # slice = 1st half
    assert sharding_lib.global_mesh_shape(c, 64) == (32, 2, 1)
    with pytest.raises(ValueError, match="needs 2 processes"):
        sharding_lib.mesh_from_config(c)                                # one real process here


# ----------------------------------------------------------------------------- online encoding

def test_online_encoding_matches_cached_features():
    from lens_jax.diffusion.flow_matching import make_online_encoder
    from lens_jax.models.gpt_oss import GptOssEncoder, gpt_oss_config
    from lens_jax.models.vae import FluxVAE, vae_config

    vae = FluxVAE(vae_config("tiny"))
    te_cfg = gpt_oss_config("tiny")
    te = GptOssEncoder(te_cfg)
    cfg = mmdit_config("tiny", in_channels=vae.config.packed_channels, out_channels=vae.config.packed_channels,
                       text_dim=te_cfg.hidden_size, num_text_layers=len(te_cfg.selected_layers), mlp_dim=96)
    mesh = _mesh((2, 2, 2))
    b, px, length, offset = 8, 64, 12, 3
    rng = np.random.default_rng(0)
    raw = dict(pixels=rng.uniform(-1, 1, (b, px, px, 3)).astype(np.float32),
               input_ids=rng.integers(0, te_cfg.vocab_size, (b, length)).astype(np.int32),
               attention_mask=np.arange(length)[None] < rng.integers(offset + 1, length + 1, (b, 1)))
    k = vae.config.packed_channels

    def vae_init(_):
        v = vae.init(jax.random.key(1), raw["pixels"][:1])
        return dict(v, latent_stats=dict(mean=jnp.linspace(-0.5, 0.5, k), var=jnp.linspace(0.5, 2.0, k)))

    def te_init(_):
        return {"params": te.init(jax.random.key(2), raw["input_ids"][:1], raw["attention_mask"][:1])["params"]}

    c = load_experiment("pretrain")
    vae_rules = sharding_lib.validate_rules(c.sharding.vae_rules)
    te_rules = sharding_lib.validate_rules(c.sharding.text_encoder_rules)
    encoders = [Net("vae", init=vae_init, rules=vae_rules), Net("text_encoder", init=te_init, rules=te_rules)]
    encode_fn = make_online_encoder(vae, te, txt_offset=offset, vae_rules=vae_rules, text_rules=te_rules)

    model = MMDiT(cfg)
    opt, sched = make_optimizer(TINY.optim, 100)
    dit = dit_spec(model, opt, sched, rules=RULES).nets["dit"]
    spec = TrainSpec([dit] + encoders)
    results = []
    for online, k_accum in ((True, 1), (False, 1), (True, 2)):   # the last encodes each of 2 micro-batches in the scan
        state = spec.create(mesh)
        q = state["nets"]["text_encoder"]["params"]["params"]["layers_0"]["attn"]["q"]["kernel"]   # [embed, heads, hd]
        assert q.sharding.spec == jax.P("fsdp", "tensor", None) and q.addressable_shards[0].data.shape == (32, 2, 16)
        assert "opt_state" not in state["nets"]["vae"] and "opt_state" not in state["nets"]["text_encoder"]
        objective = fm_objective(model, caption_dropout=0.25, rules=RULES,
                                 **(dict(encoder=encode_fn, token_channels=k) if online else {}))
        if online:
            args = raw
        else:
            enc = {n: state["nets"][n]["params"] for n in ("vae", "text_encoder")}
            with jax.set_mesh(mesh):
                args = jax.jit(encode_fn)(enc, raw)                      # the cache: encode, then train
            assert args["txt"].shape == (b, length - offset, 2 * te_cfg.hidden_size)
        fn, _ = jit_step(spec, [objective], mesh, sharding_lib.batch_shardings(mesh, args), grad_accum_steps=k_accum,
                         rules=RULES)
        args = jax.device_put(args, sharding_lib.batch_shardings(mesh, args))
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(3):
                state, m = fn(state, args)
                losses.append(float(m["loss"]))
        results.append((losses, jax.tree.map(np.asarray, state["nets"]["dit"]["params"])))
    for other in results[1:]:
        np.testing.assert_allclose(other[0], results[0][0], rtol=1e-5)
        _assert_same_grads(other[1], results[0][1])
