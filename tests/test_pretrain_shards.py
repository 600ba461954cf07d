"""The pretrain phase on ArrayRecord shards (config.data.source='shards'), end to end through the real
command on one CPU device: tiny on shapes-world shards (losses, data statistics, the 'data_iter'
checkpoint item, a SIGKILL + rerun that continues bit-identically), stage2-like mixed areas on JPEG shards,
plus the encoded source's pieces and the config errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lens_jax.configs.base import ConfigError, load_experiment
from lens_jax.data.encoded_source import EncodedSource, fit_text, pow2_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shards below are 64 px (the tiny default reads 80-px shards of its token-aligned world; any size works).
TINY = ["--config=experiments/pretrain.py:tiny", "--config.data.source=shards", "--config.data.per_device_batch=(4,)",
        "--config.data.resolution=64", "--config.data.image_size=64", "--config.sample.height=64",
        "--config.sample.width=64", "--config.data.max_text_tokens=64",
        "--config.num_steps=6", "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval.enabled=False",
        "--config.sample_every=0", "--config.sample.prompts=", "--config.tensorboard=False",
        "--config.data.num_threads=1", "--config.data.prefetch=8"]

STAGE2 = ["--config=experiments/pretrain.py:stage2", "--config.data.buckets=ar9:32,48,64",
          "--config.data.per_device_batch=(2,2,2)", "--config.data.min_area=0", "--config.data.caption=brief",
          "--config.data.max_text_tokens=16",
          "--config.data.num_threads=1", "--config.data.prefetch=4",
          "--config.model.preset=shapes_tiny", "--config.model.attention=xla", "--config.model.remat_policy=none",
          "--config.model.dtype=float32", "--config.vae.checkpoint=data/tiny/vae", "--config.vae.preset=tiny",
          "--config.vae.dtype=float32", "--config.text_encoder.checkpoint=data/tiny/text_encoder",
          "--config.text_encoder.preset=tiny", "--config.text_encoder.dtype=float32",
          "--config.num_steps=2", "--config.log_every=1", "--config.checkpoint_every=0", "--config.sample_every=0",
          "--config.sample.prompts=", "--config.tensorboard=False"]


def _start(args, workdir, cache_dir, fault=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("LENS_JAX_FAULT", None)
    if fault:
        env["LENS_JAX_FAULT"] = fault
    log = open(f"{workdir.rstrip('/')}.log", "w+")        # a file, not a pipe: a background run never blocks
    proc = subprocess.Popen([sys.executable, "-m", "lens_jax.main", *args, f"--workdir={workdir}"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _wait(proc, timeout=600):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    out = "\n".join(l for l in out.splitlines() if not l[:1] in "IWE" or not l[1:5].isdigit())
    return proc.returncode, out


def _run(args, workdir, cache_dir, fault=None, timeout=600):
    return _wait(_start(args, workdir, cache_dir, fault), timeout)


def _rows(workdir):
    return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain_shards")


@pytest.fixture(scope="module")
def shapes_shards(root):
    from tools import build_shards
    out = str(root / "shapes_shards")
    assert build_shards.main(["--shapes_world=64", "--image_size=64", f"--out={out}", "--num_workers=1",
                              "--records_per_shard=32"]) == 0
    return out


@pytest.fixture(scope="module")
def stage2_run(root):
    """The stage2-like run on JPEG shards, started in the background so that it overlaps the tiny runs (both
    are mostly single-threaded XLA compilation); `test_stage2_like_mixed_areas_on_jpeg_shards` waits for it."""
    from tools.make_test_images import make_records, write_shards
    shards = str(root / "jpeg_shards")
    # Assorted sizes, mostly near-square (few bucket shapes, so few VAE compiles) plus two 2:1 shapes.
    sizes = [(64, 64), (96, 96), (160, 150), (80, 72), (72, 80), (128, 120), (150, 75), (75, 150)]
    write_shards(shards, list(make_records(24, seed=3, sizes=sizes)), 2)
    workdir = str(root / "stage2")
    proc = _start(STAGE2 + [f"--config.data.path={shards}"], workdir, str(root / "jax_cache_stage2"))
    yield proc, workdir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference_run(root, shapes_shards, stage2_run):
    workdir = str(root / "uninterrupted")
    rc, out = _run(TINY + [f"--config.data.path={shapes_shards}"], workdir, str(root / "jax_cache"))
    assert rc == 0, out[-4000:]
    return workdir, _rows(workdir), out


def test_tiny_on_shapes_world_shards_trains_and_checkpoints_the_data_iterator(reference_run):
    workdir, rows, out = reference_run
    assert "shards: 64 records in 2 shard(s)" in out
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    last = rows[-1]
    # Data statistics of the step and cumulative pipeline counters.
    assert last["data/step_examples/64"] == 4 and last["data/examples/64"] == 24
    assert last["data/bucket/64:64x64"] == 24 and last["data/padding_fraction"] == 0.0
    assert last["data/skipped/total"] == 0 and last["data/bad_shards"] == 0
    assert 0 < last["data/step_text_tokens"] <= 4 * 64 and last["data/micro_batches"] == 1
    for step in (2, 4, 6):
        with open(os.path.join(workdir, "checkpoints", str(step), "data_iter", "process_0-of-1.json")) as f:
            state = json.load(f)["state"]
        assert state["step"] == step and state["totals"]["examples"] == [4 * step]


def test_kill_after_a_checkpoint_then_rerun_continues_the_data_bit_identically(root, shapes_shards, reference_run):
    # SIGKILL right after step 4's async save started: Orbax commits a save in the background, and the save of
    # step 4 first waits for step 2's to be committed, so step 2 (or 4, if it got written in time) is on disk.
    # (A kill right after the first save, e.g. "2:KILL", usually leaves only a temporary directory behind and
    # the rerun would restart from scratch, which tests nothing about resuming the data.)
    _, ref, _ = reference_run
    workdir = str(root / "killed")
    args = TINY + [f"--config.data.path={shapes_shards}"]
    rc, out = _run(args, workdir, str(root / "jax_cache"), fault="4:KILL")
    assert rc == -9, out[-4000:]
    rc, out = _run(args, workdir, str(root / "jax_cache"))
    assert rc == 0, out[-4000:]
    resumed = [int(l.split()[-1]) for l in out.splitlines() if l.startswith("resumed from")]
    assert resumed and resumed[0] in (2, 4), out[-4000:]
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]                 # rows after the checkpoint rewritten
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]            # bit-identical JSON floats
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref]
    for key in ("data/step_text_tokens", "data/examples/64", "data/bucket/64:64x64"):
        assert [r[key] for r in rows] == [r[key] for r in ref]


def test_stage2_like_mixed_areas_on_jpeg_shards(stage2_run):
    proc, workdir = stage2_run
    rc, out = _wait(proc)
    assert rc == 0, out[-4000:]
    assert "3 micro-batch(es) per step" in out
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["skipped"] == 0
        assert all(np.isfinite(r[f"loss_mb{i}"]) for i in range(3))          # three micro-batches per step
        assert [r[f"data/step_examples/{a}"] for a in (32, 48, 64)] == [2, 2, 2]
        assert r["data/micro_batches"] == 3
    last = rows[-1]
    assert [last[f"data/examples/{a}"] for a in (32, 48, 64)] == [4, 4, 4]
    assert sum(v for k, v in last.items() if k.startswith("data/bucket/")) == 12
    assert sum(r["data/step_text_truncated"] for r in rows) > 0             # captions cut to 16 tokens


# ---------------------------------------------------------------------------------------------- pieces


def test_fit_text_cuts_and_pads_to_a_fixed_length():
    f = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3) + 1
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    f = f * m[..., None]
    x, xm, cut = fit_text(f, m, 4)
    assert x.shape == (2, 4, 3) and xm.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and cut.tolist() == [False, True]
    x, xm, cut = fit_text(f, m, 7)
    assert x.shape == (2, 7, 3) and not xm[:, 5:].any() and not x[:, 5:].any() and not cut.any()


def test_pow2_batches_pads_the_group_and_encoded_source_forwards_the_state():
    seen = []

    def enc(px):
        seen.append(px.shape[0])
        return px.reshape(px.shape[0], -1, 3)[:, :1].repeat(2, axis=1)

    fn = pow2_batches(enc, max_batch=6)
    for n in (1, 3, 5, 6):
        assert fn(np.ones((n, 16, 16, 3), np.float32)).shape == (n, 2, 3)
    assert seen == [1, 4, 6, 6]

    class It:
        step = 0

        def __next__(self):
            self.step += 1
            return []

        def get_state(self):
            return {"step": self.step}

        def set_state(self, s):
            self.step = s["step"]

    src = EncodedSource(It(), None, None, 8)
    src.set_state({"step": 5})
    assert src.get_state() == {"step": 5}


def test_shards_config_errors_name_the_option(tmp_path):
    from lens_jax.phases.pretrain import validate
    c = load_experiment("pretrain", "stage2")
    with pytest.raises(ConfigError, match="--config.data.path"):
        validate(c)
    c.data.path = str(tmp_path)
    with pytest.raises(ConfigError, match="holds no shards"):
        validate(c)
    c.data.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no shards"):
        validate(c)
    open(tmp_path / "a.array_record", "wb").close()
    c.data.path = str(tmp_path)
    c.data.per_device_batch = (24, 10)
    with pytest.raises(ConfigError, match="per_device_batch"):
        validate(c)
