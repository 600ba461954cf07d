"""compile_only: lower and compile the train step for a fake-device mesh and report per-device memory."""
import os
import subprocess
import sys

import pytest

from lens_jax.configs.base import load_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fast_compile():
    """Most XLA optimisations off (JAX_STYLE rule 11): these tests check the plumbing, not the figures."""
    import jax
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _plan_config(variant=None, **over):
    c = load_experiment("pretrain", variant)
    c.model.preset = "tiny"
    c.model.remat_policy = "full"
    c.compile_only = True
    c.compile_only_devices = 8
    c.compile_only_text_len = 32
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def test_stage2_micro_batches_compile_and_report_memory(tmp_path, fast_compile):
    from lens_jax.train import compile_only
    # A tiny DiT and small areas so the test is quick: the stage-2 path (three micro-batches with image masks).
    c = _plan_config("stage2", **{"mesh.shape": (4, 2, 1), "data.buckets": "ar9:64,96,128",
                                  "data.per_device_batch": (4, 2, 1)})
    lines = []
    r = compile_only.run(c, str(tmp_path), log=lines.append)
    assert r["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert [m["per_device"] for m in r["micro_batches"]] == [4, 2, 1]
    assert [m["global_batch"] for m in r["micro_batches"]] == [32, 16, 8]
    ma = r["memory_analysis"]
    assert ma["argument_size_in_bytes"] > 0 and ma["temp_size_in_bytes"] > 0
    assert ma["alias_size_in_bytes"] > 0                       # the donated state is aliased to the output
    # Sharded over fsdp = 2: each device holds ~1/2 of the fp32 parameters; Adam's two moments twice that.
    from lens_jax.models.mmdit import MMDiT, abstract_params, count_params, mmdit_config
    full = count_params(abstract_params(MMDiT(mmdit_config("tiny")))) * 4 / 1024 ** 3
    assert 0.45 < r["params_gib"] / full < 0.6
    assert abs(r["opt_state_gib"] / r["params_gib"] - 2) < 0.01
    assert r["tflop_per_device_step"] > 0 and r["fits_80gb"]
    assert "memory_analysis per device" in lines[0] and os.path.exists(tmp_path / "compile_only.json")


def test_main_compile_only_sets_up_fake_devices(tmp_path):
    """The entry point: a fresh process gets compile_only_devices fake CPU devices and prints the plan."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    r = subprocess.run([sys.executable, "-m", "lens_jax.main", "--config=experiments/pretrain.py",
                        "--config.compile_only=True", "--config.compile_only_devices=4",
                        "--config.model.preset=tiny", "--config.compile_only_text_len=16",
                        "--config.data.resolution=128", "--config.data.per_device_batch=(2,)",
                        "--config.mesh.shape=(-1,2,1)", f"--workdir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 4 fake cpu devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in r.stdout
    assert "per device" in r.stdout and "GiB" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["stage1", "stage2"])
def test_full_scale_plan(tmp_path, variant):
    """The real lens_3p8b plan (minutes of CPU compile; run by hand: pytest -m slow tests/test_compile_only.py)."""
    if os.environ.get("LENS_FULL_COMPILE_ONLY") != "1":
        pytest.skip("set LENS_FULL_COMPILE_ONLY=1 to compile lens_3p8b (several minutes, ~10 GB RAM)")
    from lens_jax.train import compile_only
    c = load_experiment("pretrain", variant)
    c.compile_only = True
    r = compile_only.run(c, str(tmp_path))
    assert r["params_gib"] > 0 and r["total_gib"] > 0


def test_frozen_dit_policy_carries_no_optimiser_state(tmp_path, fast_compile):
    """A DiT frozen by config.optim.policy but for its output layers: the frozen leaves have no Adam moments
    or EMA, so the optimiser bytes are twice the trainable leaves' bytes, not twice the DiT's."""
    import jax
    from lens_jax.models.mmdit import MMDiT, abstract_params, mmdit_config
    from lens_jax.train.optim import path_str
    from lens_jax.train import compile_only
    policy = (("(proj_out|norm_out).*", 1.0), (".*", None))
    c = _plan_config(**{"mesh.shape": (8, 1, 1), "data.resolution": 128, "data.per_device_batch": (1,),
                        "ema_decay": 0.999})
    full = compile_only.run(c, str(tmp_path / "full"), log=lambda s: None)
    c.optim.policy = policy
    frozen = compile_only.run(c, str(tmp_path / "frozen"), log=lambda s: None)
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(MMDiT(mmdit_config("tiny"))))[0]
    trained = sum(x.size * 4 for p, x in leaves if path_str(p).startswith(("proj_out", "norm_out")))
    total = sum(x.size * 4 for _, x in leaves)
    assert 0 < trained < total / 10
    gib = 1024 ** 3
    assert frozen["params_gib"] == pytest.approx(full["params_gib"])          # the base is still there
    assert full["opt_state_gib"] == pytest.approx(2 * total / gib, rel=1e-3)
    assert frozen["opt_state_gib"] == pytest.approx(2 * trained / gib, rel=1e-3)
    assert full["ema_gib"] == pytest.approx(total / gib, rel=1e-3)
    assert frozen["ema_gib"] == pytest.approx(trained / gib, rel=1e-3)
    assert frozen["nets"]["dit"]["opt_state"] == pytest.approx(frozen["opt_state_gib"])
    assert frozen["policy"] == [list(p) for p in policy]


def test_a_frozen_net_beside_a_trainable_one_has_no_optimiser_bytes():
    """Two nets: a frozen DiT (no optimiser, no EMA) and a small trainable head; per-net bytes say so."""
    import jax
    import jax.numpy as jnp
    import optax
    import flax.linen as nn
    from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config
    from lens_jax.train import sharding as sharding_lib
    from lens_jax.train.state import Net, TrainSpec, bytes_per_device

    dit = MMDiT(mmdit_config("tiny"))
    head = nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")))
    rules = sharding_lib.DEFAULT_RULES
    spec = TrainSpec([
        Net("dit", lambda r: dit.init(r, **dummy_inputs(dit.config))["params"], rules),
        Net("head", lambda r: head.init(r, jnp.zeros((1, 16)))["params"], rules,
            optimizer=optax.adam(1e-3), ema_decay=0.99),
    ])
    mesh = sharding_lib.make_mesh((8, 1, 1))
    abstract, _ = spec.abstract(mesh)
    per = bytes_per_device(abstract)
    assert per["dit"]["params"] > 0 and per["dit"]["opt_state"] == 0 and per["dit"]["ema"] == 0
    assert per["head"]["params"] == 16 * 8 * 4 + 8 * 4
    assert per["head"]["ema"] == per["head"]["params"]
    assert 2 * per["head"]["params"] <= per["head"]["opt_state"] <= 2 * per["head"]["params"] + 64


@pytest.mark.parametrize("algorithm", ["nft", "grpo"])
def test_rl_plan_compiles_the_update_and_the_rollout(tmp_path, fast_compile, algorithm):
    """The rl phase's plan (the lens variant with a tiny DiT and 64² buckets): LoRA adapters on the frozen base
    (optimiser bytes of the adapters only), the NFT / GRPO update over accumulated micro-batches of padded
    mixed-aspect rollouts, and one sampler call of rl.rollout_batch rollouts."""
    from lens_jax.models.mmdit import MMDiT, abstract_params, count_params, mmdit_config
    from lens_jax.train import compile_only
    c = load_experiment("rl", "lens")
    c.model.preset = "tiny"
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.rl.algorithm = algorithm
    c.rl.prompts_per_step, c.rl.images_per_prompt, c.rl.rollout_steps = 4, 4, 3
    c.rl.rollout_batch = 8
    c.data.buckets, c.data.resolution = "ar9:64", 64
    c.grad_accum_steps = 2
    c.compile_only, c.compile_only_devices, c.compile_only_text_len = True, 8, 16
    c.mesh.shape = (-1, 2, 1)
    lines = []
    r = compile_only.run(c, str(tmp_path), log=lines.append)
    assert r["micro_batches"] == [dict(area=64, per_device=2, global_batch=16, image_tokens=18, text_tokens=16)]
    base = count_params(abstract_params(MMDiT(mmdit_config("tiny")))) * 4 / 1024 ** 3
    assert r["params_gib"] > 0.45 * base                         # the frozen base (fsdp 2) plus the adapters
    assert 0 < r["opt_state_gib"] < 0.5 * r["params_gib"]        # Adam over the adapters only (full FT: 2x)
    q = r["rl"]
    assert q["rollouts"] == 16 and q["per_call"] == 8 and q["tokens"] == 18 and len(q["buckets"]) == 5
    assert q["memory_analysis"]["temp_size_in_bytes"] > 0 and q["peak_gib"] > q["state_resident_gib"] > 0
    assert r["forward_factor"] == (6.0 if algorithm == "nft" else 2 * 5.0)     # GRPO: 2 recorded steps
    assert "rollout (" in "\n".join(lines)
