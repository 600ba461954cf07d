"""Robust training: checkpoints (items, retention, restore into a smaller mesh, fallback from a broken
step), the resume order, the non-finite abort, metrics files, and the kill / SIGTERM tests of the real
command (`python -m lens_jax.main --config=experiments/pretrain.py:tiny` on a micro configuration)."""
import dataclasses
import glob
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_setup import dit_spec, fm_objective
from lens_jax.configs.base import ConfigError, optim_config
from lens_jax.data.latent_cache import EncodedDataset
from lens_jax.models.mmdit import MMDiT, mmdit_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.checkpoints import TrainCheckpointer
from lens_jax.train.loop import LoopOptions, NonFiniteError, StepIndexedSource, train_loop
from lens_jax.train.metrics import MetricsWriter, Progress, peak_tflops_per_device, train_flops_per_step
from lens_jax.train.optim import make_optimizer
from lens_jax.train.resume import resolve_start, weights_from
from lens_jax.train.trainer import jit_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = mmdit_config("tiny", mlp_dim=96, num_layers=1)


# ----------------------------------------------------------------------------------------------------
# In-process pieces on a one-layer tiny DiT.

class Setup:
    def __init__(self, mesh_shape=(8, 1, 1), ema=0.9, num_steps=20, load=None):
        self.mesh = sharding_lib.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
        self.model = MMDiT(CFG)
        self.optimizer, self.schedule = make_optimizer(optim_config(3e-3), num_steps)
        self.spec = dit_spec(self.model, self.optimizer, self.schedule, ema_decay=ema, load=load)
        self.abstract, self.shardings = self.spec.abstract(self.mesh)

    def create(self, seed=0):
        """A fresh state: initialised once per Setup (one compile), then copied and shifted by `seed`."""
        if not hasattr(self, "_base"):
            self._base = self.spec.create(self.mesh)
        return jax.tree.map(lambda x: x + seed if jnp.issubdtype(x.dtype, jnp.floating) else x.copy(), self._base)

    def jit_step(self, batch_shardings):
        return jit_step(self.spec, [fm_objective(self.model)], self.mesh, batch_shardings)[0]


@pytest.fixture(scope="module")
def setup8():
    return Setup()


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _kernel(state):
    return state["nets"]["dit"]["params"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"]


def _tiny_state(v):   # 128 KiB of random float32 (incompressible), so the array lands in its own data file
    w = np.random.default_rng(v).standard_normal(32768).astype(np.float32)
    w[0] = v
    return {"nets": {"w": {"params": {"w": jnp.asarray(w)}}}, "step": jnp.asarray(v, jnp.int32),
            "rng": jnp.zeros((2,), jnp.uint32)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_checkpoint_items_restore_into_4_and_1_devices(setup8, tmp_path):
    state = setup8.create()
    assert len(_kernel(state).sharding.device_set) == 8
    ckpt = TrainCheckpointer(str(tmp_path / "ck"), nets=("dit",))
    ckpt.save(5, state, json.dumps({"name": "t"}), data_state={"step": 5, "epoch": 0})
    ckpt.close()
    assert {"config", "data_iter", "dit", "train"} <= set(os.listdir(tmp_path / "ck" / "5"))
    want = _leaves(state)
    for shape in [(2, 1, 2), (1, 1, 1)]:
        target = Setup(shape)
        ck = TrainCheckpointer(str(tmp_path / "ck"))          # a reader finds the nets on disk
        assert ck.nets == ("dit",)
        step, restored, data_state = ck.restore_latest(target.abstract)
        assert step == 5 and data_state == {"step": 5, "epoch": 0}
        assert ck.read_config(5) == {"name": "t"}
        ck.close()
        for a, b in zip(want, _leaves(restored)):
            np.testing.assert_array_equal(a, b)
        k = _kernel(restored)
        assert k.sharding.mesh.devices.shape == shape
        assert k.sharding == _kernel(target.shardings)
        assert len(k.sharding.device_set) == int(np.prod(shape))


def test_retention_keeps_the_last_n_and_every_kth(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), nets=("w",), max_to_keep=2, keep_every=4)
    for s in range(1, 10):
        ckpt.save(s, _tiny_state(s), "{}", data_state={"step": s})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]
    assert ckpt.save(9, _tiny_state(9), "{}") is False            # a step is written once
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax's abandoned read
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt = TrainCheckpointer(str(d), nets=("w",))
    for s in (2, 4):
        ckpt.save(s, _tiny_state(s), "{}", data_state={"step": s})
    ckpt.close()
    data_files = sorted(glob.glob(str(d / "4" / "w" / "**" / "d" / "*"), recursive=True), key=os.path.getsize)
    with open(data_files[-1], "r+b") as f:                      # a truncated write
        f.truncate(os.path.getsize(data_files[-1]) // 2)
    abstract = _abstract(_tiny_state(0))
    ckpt = TrainCheckpointer(str(d), nets=("w",))
    with pytest.warns(UserWarning, match="failed to restore"):
        step, state, data_state = ckpt.restore_latest(abstract, log=lambda *_: None)
    assert step == 2 and data_state == {"step": 2} and float(state["nets"]["w"]["params"]["w"][0]) == 2.0
    assert ckpt.all_steps() == [2] and len(os.listdir(str(d) + ".corrupt")) == 1
    ckpt.save(4, _tiny_state(40), "{}")                         # the step number is free again
    ckpt.close()
    ckpt = TrainCheckpointer(str(d), nets=("w",))
    assert ckpt.restore_latest(abstract)[0] == 4
    ckpt.close()


def test_a_checkpoint_of_another_model_config_is_an_error_and_stays_in_place(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt = TrainCheckpointer(str(d), nets=("dit",))
    blocks = {f"blocks_{i}": {"kernel": jnp.ones((3, 2))} for i in range(2)}        # an unrolled model

    def state(params):
        return {"nets": {"dit": {"params": params}}, "step": jnp.asarray(3), "rng": jnp.zeros((2,), jnp.uint32)}
    ckpt.save(3, state(blocks), "{}", data_state={"step": 3})
    ckpt.close()
    scanned = {"blocks": {"kernel": jnp.ones((2, 3, 2))}}                               # the same, nn.scan-stacked
    wider = {f"blocks_{i}": {"kernel": jnp.ones((3, 4))} for i in range(2)}
    ckpt = TrainCheckpointer(str(d))
    with pytest.raises(ConfigError, match=r"lacks blocks; it holds blocks_0, blocks_1, which this config"):
        ckpt.restore_latest(_abstract(state(scanned)), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"shapes differ \(checkpoint vs config\): blocks_0/kernel \(3, 2\) "
                                          r"vs \(3, 4\)"):
        ckpt.restore(3, _abstract(state(wider)))
    other = {"nets": {"student": {"params": blocks}}, "step": jnp.asarray(0), "rng": jnp.zeros((2,), jnp.uint32)}
    with pytest.raises(ConfigError, match=r"holds no net 'student' \(it holds \['dit'\]\)"):
        ckpt.restore(3, _abstract(other))
    assert ckpt.all_steps() == [3] and not os.path.exists(str(d) + ".corrupt")       # nothing moved aside
    step, restored, _ = ckpt.restore_latest(_abstract(state(blocks)))                 # the right config restores
    assert step == 3 and float(restored["nets"]["dit"]["params"]["blocks_1"]["kernel"][0, 0]) == 1.0
    ckpt.close()


def test_a_checkpoint_of_the_single_state_layout_is_named_as_such(tmp_path):
    d = tmp_path / "checkpoints" / "7" / "state"
    os.makedirs(d)
    ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), read_only=True)
    with pytest.raises(ConfigError, match="older lens_jax"):
        ckpt.check_params(7, "dit", {"params": {}})
    ckpt.close()


def test_resume_order_workdir_then_resume_from_then_weights_then_scratch(setup8, tmp_path):
    from lens_jax.checkpoints import orbax_io
    s = setup8
    trained = s.create(seed=1)
    other = TrainCheckpointer(str(tmp_path / "other" / "checkpoints"), nets=("dit",))
    other.save(7, trained, "{}", data_state={"step": 7})
    other.close()
    params_host = jax.tree.map(np.asarray, trained["nets"]["dit"]["params"])
    orbax_io.save_weights(str(tmp_path / "converted"), {"params": params_host},
                          dict(kind="lens_dit", preset="tiny", config=dataclasses.asdict(CFG)))
    quiet = dict(log=lambda *_: None)

    def start(workdir, setup=s, **kw):
        ck = TrainCheckpointer(str(tmp_path / workdir / "checkpoints"), nets=("dit",))
        try:
            return resolve_start(ck, setup.spec, setup.mesh, **kw, **quiet)
        finally:
            ck.close()

    st = start("a")
    assert (st.origin, st.step, st.data_state) == ("scratch", 0, None)
    loading = Setup(load=weights_from(str(tmp_path / "converted"), "dit", option="config.init_from", kind="lens_dit",
                                      model_config=CFG, **quiet))
    st = start("b", setup=loading, resume_from=str(tmp_path / "other"))
    assert (st.origin, st.step, st.data_state) == ("resume_from", 7, {"step": 7})
    for a, b in zip(_leaves(trained), _leaves(st.state)):
        np.testing.assert_array_equal(a, b)
    for source in (str(tmp_path / "converted"), str(tmp_path / "other")):
        setup = Setup(load=weights_from(source, "dit", option="config.init_from", kind="lens_dit", model_config=CFG,
                                        **quiet))
        st = start("c", setup=setup)
        assert (st.origin, st.step) == ("init_from", 0)
        assert int(st.state["step"]) == 0
        dit = st.state["nets"]["dit"]
        for a, b, e in zip(_leaves(trained["nets"]["dit"]["params"]), _leaves(dit["params"]), _leaves(dit["ema"])):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, e)
        assert _kernel(st.state).sharding == _kernel(s.shardings)
        assert all(float(jnp.sum(jnp.abs(x))) == 0 for x in jax.tree.leaves(dit["opt_state"][1][0].mu))  # fresh Adam
    # This workdir's own checkpoint wins over everything else.
    own = TrainCheckpointer(str(tmp_path / "d" / "checkpoints"), nets=("dit",))
    own.save(3, s.create(seed=2), "{}", data_state={"step": 3})
    own.close()
    st = start("d", setup=loading, resume_from=str(tmp_path / "other"))
    assert (st.origin, st.step) == ("workdir", 3)
    bad = dict(kind="lens_dit", preset="tiny", config=dataclasses.asdict(mmdit_config("tiny")))
    orbax_io.save_weights(str(tmp_path / "mismatch"), {"params": params_host}, bad)
    with pytest.raises(ConfigError, match="mlp_dim"):
        start("e", setup=Setup(load=weights_from(str(tmp_path / "mismatch"), "dit", option="config.init_from",
                                                 kind="lens_dit", model_config=CFG, **quiet)))


def _dataset(n=16):
    rng = np.random.default_rng(0)
    return EncodedDataset(img=rng.standard_normal((n, 16, 128)).astype(np.float32),
                          txt=rng.standard_normal((n, 8, 96)).astype(np.float32),
                          mask=np.arange(8)[None] < rng.integers(1, 9, (n, 1)), grid=(4, 4))


def test_non_finite_steps_are_skipped_counted_and_abort_after_max_in_a_row(setup8, tmp_path):
    s = setup8
    data = _dataset()
    shardings = {k: sharding_lib.batch_sharding(s.mesh, v.ndim) for k, v in data.example_batch(1).items()}
    step_fn = s.jit_step(shardings)

    def source(bad_steps):          # 1-based global steps whose batch holds a NaN
        def fn(i):
            b = data.batch(i, 8, 0)
            if i + 1 in bad_steps:
                b["img"] = b["img"].copy()
                b["img"][0, 0, 0] = np.nan
            return b
        return StepIndexedSource(fn)

    # One bad step: skipped, counted, training goes on.
    writer = MetricsWriter(str(tmp_path))
    res = train_loop(s.create(), step_fn, source({3}), mesh=s.mesh, batch_shardings=shardings,
                     options=LoopOptions(num_steps=5, log_every=1, max_nonfinite_steps=2), writer=writer,
                     log=lambda *_: None)
    writer.close()
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0] and rows[-1]["skipped_total"] == 1
    assert res.step == 5 and res.skipped_total == 1 and not res.preempted

    # Three in a row with max_nonfinite_steps=3: stop with the step range; checkpoints stay finite.
    ckpt = TrainCheckpointer(str(tmp_path / "ck"), nets=("dit",), save_interval_steps=2)
    with pytest.raises(NonFiniteError, match=r"steps 4-6"):
        try:
            train_loop(s.create(), step_fn, source(set(range(4, 100))), mesh=s.mesh, batch_shardings=shardings,
                       options=LoopOptions(num_steps=20, log_every=1, max_nonfinite_steps=3), checkpointer=ckpt,
                       log=lambda *_: None)
        finally:
            ckpt.close()
    ckpt = TrainCheckpointer(str(tmp_path / "ck"))
    steps = ckpt.all_steps()
    assert steps and max(steps) <= 8
    _, state, _ = ckpt.restore_latest(s.abstract)
    ckpt.close()
    assert all(np.all(np.isfinite(x)) for x in _leaves(state["nets"]))


def _read_events(path):
    from tensorboardX.proto import event_pb2
    out = []
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        n = struct.unpack("<Q", data[i:i + 8])[0]
        ev = event_pb2.Event()
        ev.ParseFromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        out += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
    return out


def test_metrics_writer_drops_rows_after_the_resume_step_and_writes_tensorboard(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s, "lr": 0.1})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                               # a row cut by a kill
    w = MetricsWriter(str(tmp_path), resume_at=3, log=lambda *_: None)
    w.write(4, {"loss": 0.2})
    w.close()
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    events = _read_events(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))[0])
    assert [(s, v) for s, tag, v in events if tag == "train/loss"] == [(s, np.float32(1.0 / s)) for s in range(1, 6)]


def test_mfu_inputs_and_progress_line():
    assert peak_tflops_per_device("NVIDIA H100 80GB HBM3", "gpu") == 989.0
    assert peak_tflops_per_device("NVIDIA H100 PCIe", "gpu") == 756.0
    assert peak_tflops_per_device("TPU v5 lite", "tpu") == 197.0
    assert peak_tflops_per_device("cpu", "cpu") is None
    assert peak_tflops_per_device("cpu", "cpu", override=2.5) == 2.5
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "tools", "bench_dit.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert train_flops_per_step(CFG, 8, 16, 8) == 3 * bench.forward_flops(CFG, 8, 16, 8)
    line = Progress(100, start=0, interactive=False).line(25, loss=0.5)
    assert "25/100" in line and "25.0%" in line and "ETA" in line and "loss=0.5" in line


# ----------------------------------------------------------------------------------------------------
# The real command, killed and restarted.

CMD = [sys.executable, "-m", "lens_jax.main", "--config=experiments/pretrain.py:tiny", "--config.num_steps=12",
       "--config.checkpoint_every=4", "--config.data.num_examples=32", "--config.data.max_text_tokens=48",
       "--config.batch_size=8", "--config.eval.enabled=False", "--config.sample_every=0", "--config.log_every=1",
       "--config.sample.prompts="]


def _run(workdir, cache_dir, fault=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("LENS_JAX_FAULT", None)
    if fault:
        env["LENS_JAX_FAULT"] = fault
    p = subprocess.run(CMD + [f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    out = "\n".join(l for l in (p.stdout + p.stderr).splitlines() if not l[:1] in "IWE" or not l[1:5].isdigit())
    return p.returncode, out


def _rows(workdir):
    return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = str(root / "jax_cache")
    workdir = str(root / "uninterrupted")
    rc, out = _run(workdir, cache)
    assert rc == 0, out[-4000:]
    return root, cache, _rows(workdir), workdir


def test_sigkill_then_the_same_command_continues_bit_identically(reference_run):
    root, cache, ref, _ = reference_run
    workdir = str(root / "killed")
    rc, out = _run(workdir, cache, fault="8:KILL")            # SIGKILL right after step 8's async save began
    assert rc == -9, out[-4000:]
    steps_on_disk = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert 4 in steps_on_disk
    rc, out = _run(workdir, cache)
    assert rc == 0, out[-4000:]
    resumed = [l for l in out.splitlines() if l.startswith("resumed from")]
    assert resumed, out[-4000:]
    restored = int(resumed[0].split()[-1])
    assert restored in (4, 8)
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 13))      # rows after the checkpoint were rewritten
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]   # bit-identical (JSON floats), data order included
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref]


def test_sigterm_saves_a_checkpoint_and_exits_zero(reference_run):
    root, cache, ref, ref_dir = reference_run
    workdir = str(root / "terminated")
    rc, out = _run(workdir, cache, fault="7:TERM")
    assert rc == 0, out[-4000:]
    assert "SIGTERM: saved checkpoint step 7" in out
    with open(os.path.join(workdir, "checkpoints", "7", "data_iter", "process_0-of-1.json")) as f:
        assert json.load(f)["state"] == {"step": 7}
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref[:7]]
    # The uninterrupted run's TensorBoard file has the loss of every step.
    events = _read_events(glob.glob(os.path.join(ref_dir, "tensorboard", "events.out.tfevents.*"))[0])
    assert [s for s, tag, _ in events if tag == "train/loss"] == list(range(1, 13))
