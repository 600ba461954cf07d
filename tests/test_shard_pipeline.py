"""The bucketed, mixed-resolution shard pipeline (lens_jax/data/shard_pipeline.py) at CPU scale.

Shards hold small JPEGs (40-220 px) so the 'ar9:64,96,128' table (three base areas x up to 9 aspect
ratios, like lens27 at 1/8 scale) runs in seconds."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.data import buckets as B
from lens_jax.data import shard_pipeline as sp
from lens_jax.data.records import encode_record
from tools.make_test_images import jpeg_bytes, make_image, make_records, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = B.bucket_table("ar9:64,96,128")


def opts(paths, **kw):
    base = dict(paths=paths if isinstance(paths, str) else tuple(paths), table=TABLE, per_device_batch=(6, 3, 2), data_parallel=2, min_area=32 * 32,
                num_threads=2, prefetch=16, seed=3)
    base.update(kw)
    return sp.PipelineOptions(**base)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return write_shards(str(d), list(make_records(48, seed=1, min_side=40, max_side=220)), 3)


def _ids(steps):
    return [[mb["id"] for mb in step] for step in steps]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_steps_equal(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert len(sa) == len(sb)
        for x, y in zip(sa, sb):
            assert x.keys() == y.keys()
            for k in x:
                if k == "pixels":
                    for p, q in zip(x[k], y[k]):
                        np.testing.assert_array_equal(p, q)
                else:
                    np.testing.assert_equal(x[k], y[k])


# ----------------------------------------------------------------------------- batches

def test_micro_batches_mix_aspect_ratios_and_every_step_mixes_areas(shards):
    pipe = sp.ShardPipeline(opts(os.path.dirname(shards[0])))                     # a directory of shards
    assert pipe.source.files == sorted(shards)
    it = iter(pipe)
    steps = _take(it, 3)
    seen_aspects = set()
    for s, step in enumerate(steps):
        assert [mb["area"] for mb in step] == [64, 96, 128]           # equal mixture: one micro-batch per area
        for mb in step:
            a = mb["area_index"]
            n = TABLE.max_tokens(a)
            b = (6, 3, 2)[a] * 2                                      # per_device x data_parallel, one process
            assert mb["step"] == s and len(mb["pixels"]) == len(mb["caption"]) == len(mb["id"]) == b
            assert mb["img_pos"].shape == (b, n, 3) and mb["img_pos"].dtype == np.int32
            assert mb["img_mask"].shape == (b, n) and mb["img_mask"].dtype == bool
            for key, shape in (("bucket", (b,)), ("size", (b, 2)), ("grid", (b, 2)), ("num_tokens", (b,)),
                               ("aspect", (b,)), ("orig_size", (b, 2))):
                assert mb[key].shape == shape, key
            for i in range(b):
                w, h = TABLE.buckets[a][mb["bucket"][i]]
                px = mb["pixels"][i]
                assert px.shape == (h, w, 3) and px.dtype == np.float32
                assert -1.0 <= px.min() and px.max() <= 1.0
                assert tuple(mb["size"][i]) == (h, w) and tuple(mb["grid"][i]) == (h // 16, w // 16)
                pos, mask = B.bucket_positions(w, h, n)
                np.testing.assert_array_equal(mb["img_pos"][i], pos)
                np.testing.assert_array_equal(mb["img_mask"][i], mask)
                assert mb["num_tokens"][i] == mask.sum()
                # the bucket is the nearest aspect ratio of the decoded image
                oh, ow = mb["orig_size"][i]
                assert mb["bucket"][i] == B.assign_bucket(ow, oh, TABLE.buckets[a])
                assert mb["caption"][i]
            st = mb["stats"]
            assert st["padding_fraction"] == pytest.approx(1 - mb["img_mask"].sum() / mb["img_mask"].size)
            assert sum(st["buckets"].values()) == b
            seen_aspects |= set(float(x) for x in mb["aspect"])
    assert max(len(set(mb["bucket"].tolist())) for step in steps for mb in step) >= 4   # one batch, many ratios
    assert len(seen_aspects) >= 7
    m = it.metrics()
    assert m["data/examples/64"] == 36 and m["data/skipped/total"] == 0
    assert sum(v for k, v in m.items() if k.startswith("data/bucket/")) == 3 * (12 + 6 + 4)
    assert 0 < m["data/padding_fraction"] < 0.2
    sm = sp.step_metrics(steps[0])
    assert sm["data/step_examples/128"] == 4 and 0 <= sm["data/step_padding_fraction"] < 0.2
    it.close()


def test_step_plan_is_a_pure_function_of_seed_and_step():
    plan = sp.StepPlan(0, (1, 1, 1), (48, 20, 12))
    assert all(plan(s) == [(0, 48), (1, 20), (2, 12)] for s in range(50))
    p1 = sp.StepPlan(7, (2, 1, 1), (48, 20, 12), micro_batches_per_step=3)
    p2 = sp.StepPlan(7, (2, 1, 1), (48, 20, 12), micro_batches_per_step=3)
    seq = [p1(s) for s in range(400)]
    assert seq == [p2(s) for s in reversed(range(400))][::-1]              # order of queries is irrelevant
    assert all(len(x) == 3 for x in seq) and len(set(map(tuple, seq))) > 1
    counts = np.array([p1.counts(s) for s in range(400)]).mean(0)
    np.testing.assert_allclose(counts, [1.5, 0.75, 0.75], atol=0.1)        # K w / sum(w)
    assert seq != [sp.StepPlan(8, (2, 1, 1), (48, 20, 12), 3)(s) for s in range(400)]
    assert sp.StepPlan(0, (2, 1, 1), (48, 20, 12), 4)(5) == [(0, 48), (0, 48), (1, 20), (2, 12)]
    assert sp.StepPlan(0, (1, 0, 0), (48, 20, 12))(3) == [(0, 48)]                 # K = areas with weight > 0
    # records are assigned to areas in proportion to the images each consumes per step
    np.testing.assert_allclose(sp.area_probabilities(plan), [48 / 80, 20 / 80, 12 / 80])


def test_area_assignment_is_deterministic_and_falls_back_for_small_images():
    probs, sides = (0.6, 0.25, 0.15), (512, 768, 1024)
    got = [sp.assign_area(0, f"img{i}", 2000, 2000, probs, sides) for i in range(4000)]
    assert got == [sp.assign_area(0, f"img{i}", 2000, 2000, probs, sides) for i in range(4000)]
    np.testing.assert_allclose(np.bincount(got) / 4000, probs, atol=0.03)
    big = [i for i in range(4000) if got[i] == 2]
    assert {sp.assign_area(0, f"img{i}", 800, 800, probs, sides) for i in big} == {1}   # 768 fits, 1024 not
    assert {sp.assign_area(0, f"img{i}", 500, 400, probs, sides) for i in big} == {0}
    assert {sp.assign_area(0, f"img{i}", 800, 800, probs, sides, max_upscale=1.5) for i in big} == {2}


# ----------------------------------------------------------------------------- the model

def test_mixed_aspect_batch_through_tiny_mmdit_matches_each_example_alone(shards):
    from lens_jax.checkpoints import lens_convert
    from lens_jax.models.mmdit import MMDiT, mmdit_config
    cfg = mmdit_config("tiny")
    pipe = sp.ShardPipeline(opts(shards, per_device_batch=(3, 1, 1), data_parallel=1,
                                 area_mixture=(1, 0, 0), micro_batches_per_step=1))
    it = iter(pipe)
    mb = next(x for step in _take(it, 6) for x in step if len(set(x["bucket"].tolist())) >= 2)
    it.close()
    # A stand-in encoder: 16x16 pixel patches (row-major, as the VAE + 2x2 patchify gives) -> C channels.
    proj = np.random.default_rng(0).standard_normal((16 * 16 * 3, cfg.in_channels)).astype(np.float32) / 16

    def encode(px):                                  # [n, H, W, 3] -> [n, (H/16)(W/16), C]
        n, hh, ww, _ = px.shape
        p = px.reshape(n, hh // 16, 16, ww // 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)
        return p.reshape(n, (hh // 16) * (ww // 16), -1) @ proj

    img = sp.encode_micro_batch(mb, encode)
    np.testing.assert_array_equal(img, sp.encode_micro_batch(mb, encode, per_example=True))
    assert not img[~mb["img_mask"]].any()
    b, n = mb["img_mask"].shape
    rng = np.random.default_rng(1)
    txt = rng.standard_normal((b, 5, cfg.num_text_layers * cfg.text_dim)).astype(np.float32)
    tmask = np.ones((b, 5), bool)
    sigma = rng.uniform(0.1, 0.9, b).astype(np.float32)
    img_garbage = np.where(mb["img_mask"][..., None], img, 100.0).astype(np.float32)   # padding must not matter
    model = MMDiT(cfg)
    # Random weights through the official-layout converter (cheaper than compiling model.init).
    sd = {k: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
          for k, shape in lens_convert.official_shapes(cfg).items()}
    params = jax.tree.map(jnp.asarray, lens_convert.convert_lens_dit(sd, cfg))
    apply = jax.jit(lambda *a, img_mask=None: model.apply({"params": params}, *a, img_mask=img_mask))
    out = apply(img_garbage, mb["img_pos"], txt, tmask, sigma, img_mask=mb["img_mask"])
    for i in range(b):
        k = int(mb["num_tokens"][i])
        alone = apply(img[i:i + 1, :k], mb["img_pos"][i:i + 1, :k], txt[i:i + 1], tmask[i:i + 1], sigma[i:i + 1])
        np.testing.assert_allclose(np.asarray(out[i, :k]), np.asarray(alone[0]), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- resume

def test_resume_sees_exactly_the_uninterrupted_batches(shards, tmp_path):
    o = opts(shards, caption="mixed")
    ref = _take(iter(sp.ShardPipeline(o)), 7)
    it = iter(sp.ShardPipeline(o))
    _take(it, 3)
    it.save_state(str(tmp_path / "data_state.json"))
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    fresh = iter(sp.ShardPipeline(o))
    fresh.restore_state(str(tmp_path / "data_state.json"))
    assert fresh.get_state() == state and fresh.step == 3
    _assert_steps_equal(_take(fresh, 4), ref[3:])
    assert fresh.metrics() == iter_metrics_after(o, 7)
    # Grain's own check: restore at every state of a short run and compare all later outputs.
    import grain
    grain.experimental.assert_equal_output_after_checkpoint(sp.ShardPipeline(o, num_steps=3))
    # A state from another process layout is refused.
    other = iter(sp.ShardPipeline(opts(shards, caption="mixed", process_index=1, process_count=2)))
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def iter_metrics_after(o, n):
    it = iter(sp.ShardPipeline(o))
    _take(it, n)
    return it.metrics()


def test_iterator_state_round_trips_through_orbax_with_grain_checkpoint(shards, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    o = opts(shards)
    it = iter(sp.ShardPipeline(o))
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as mgr:
        mgr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = _take(it, 2)
    restored = iter(sp.ShardPipeline(o))
    with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data_iter",)) as mgr:
        mgr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
    assert restored.step == 2
    _assert_steps_equal(_take(restored, 2), expected)


# ----------------------------------------------------------------------------- faults

def _img_record(rng, i, w, h, caption="a caption", image=None):
    data = image if image is not None else jpeg_bytes(make_image(rng, w, h))
    return encode_record(id=f"fault/{i}", image=data, width=w, height=h, caption=caption)


def test_faults_are_skipped_and_counted_with_unchanged_batch_shape(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    rng = np.random.default_rng(5)
    good = [_img_record(rng, i, int(rng.integers(60, 160)), int(rng.integers(60, 160))) for i in range(20)]
    jpg = jpeg_bytes(make_image(rng, 100, 80))
    faults = {
        "corrupt": [_img_record(rng, 100, 100, 80, image=b"\xff\xd8 not a jpeg" * 40),
                    _img_record(rng, 101, 100, 80, image=jpg[: len(jpg) // 2])],          # truncated JPEG
        "empty_caption": [_img_record(rng, 102, 100, 80, caption="   ")],
        "too_small": [_img_record(rng, 103, 20, 24)],                                      # below min_area
        "bad_record": [b"\x93not a record"],
    }
    recs = good[:10] + [r for v in faults.values() for r in v] + good[10:]
    paths = write_shards(str(tmp_path), recs, 2)
    # An unreadable record: a shard whose chunk for one record is corrupted on disk (opens fine).
    bad_read = str(tmp_path / "shard-corrupt-chunk.array_record")
    w = ArrayRecordWriter(bad_read, "group_size:1,uncompressed")
    victim = _img_record(rng, 200, 90, 90)
    for r in (good[0], victim, good[1]):
        w.write(r)
    w.close()
    raw = bytearray(open(bad_read, "rb").read())
    k = raw.find(victim[-200:])
    assert k > 0
    raw[k:k + 100] = b"\x55" * 100
    open(bad_read, "wb").write(bytes(raw))
    # A truncated shard: cannot be opened, left out and counted.
    truncated = str(tmp_path / "shard-truncated.array_record")
    whole = open(paths[0], "rb").read()
    open(truncated, "wb").write(whole[: len(whole) // 2])

    o = sp.PipelineOptions(paths=tuple(paths) + (bad_read, truncated), table=B.bucket_table("ar9", 64),
                           per_device_batch=(4,), data_parallel=1, min_area=32 * 32, num_threads=2, prefetch=8)
    pipe = sp.ShardPipeline(o)
    assert len(pipe.source.bad_shards) == 1 and pipe.source.bad_shards[0][0] == truncated
    n = len(pipe.source)                                      # 25 records + 3 in the chunk-corrupted shard
    assert n == 28
    it = iter(pipe)
    per_batch = {r: 0 for r in sp.SKIP_REASONS}
    while it.totals["records"][0] < 2 * n:                    # two full passes over the records
        (mb,) = next(it)
        assert len(mb["pixels"]) == 4 and mb["img_pos"].shape == (4, TABLE.max_tokens(0), 3)
        for r, c in mb["stats"]["skipped"].items():
            per_batch[r] += c
    m = it.metrics()
    assert m["data/bad_shards"] == 1
    expect = {r: len(v) for r, v in faults.items()}
    expect["unreadable"] = 1
    for r in sp.SKIP_REASONS:
        assert expect[r] * 2 <= m[f"data/skipped/{r}"] <= expect[r] * 3, (r, m[f"data/skipped/{r}"])
        assert per_batch[r] == m[f"data/skipped/{r}"]
    assert m["data/skipped/total"] == sum(m[f"data/skipped/{r}"] for r in sp.SKIP_REASONS)
    it.close()


def test_a_stream_with_no_usable_records_fails_clearly(tmp_path):
    rng = np.random.default_rng(0)
    paths = write_shards(str(tmp_path), [_img_record(rng, i, 20, 20) for i in range(5)], 1)
    it = iter(sp.ShardPipeline(sp.PipelineOptions(paths=tuple(paths), table=B.bucket_table("", 64),
                                                  per_device_batch=(2,), min_area=32 * 32, num_threads=1)))
    with pytest.raises(RuntimeError, match="no usable example"):
        next(it)
    it.close()


# ----------------------------------------------------------------------------- multi-host

def test_processes_read_disjoint_complete_shares(shards):
    n = 48
    assert sorted(i for p in range(2) for i in sp.process_indices(n, p, 2)) == list(range(n))
    seen = []
    for p in range(2):
        o = opts(shards, table=B.bucket_table("", 64), per_device_batch=(1,), data_parallel=8, process_index=p,
                 process_count=2)
        it = iter(sp.ShardPipeline(o))
        ids = [i for step in _take(it, 6) for mb in step for i in mb["id"]]   # 6 steps x 4 local = 24 = n / 2
        it.close()
        assert len(ids) == len(set(ids)) == n // 2
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    all_ids = {f"synthetic/1/{i:07d}" for i in range(n)}
    assert seen[0] | seen[1] == all_ids


def test_local_batches_become_global_arrays_over_the_data_axes(shards):
    from lens_jax.train import sharding as sharding_lib
    mesh = sharding_lib.make_mesh((4, 2, 1))
    o = opts(shards, per_device_batch=(1, 1, 1), data_parallel=8)
    it = iter(sp.ShardPipeline(o))
    mb = next(it)[1]
    it.close()
    g = sp.to_global_arrays(mb, mesh)
    assert set(g) == {"bucket", "size", "grid", "num_tokens", "img_pos", "img_mask", "aspect", "orig_size"}
    assert g["img_pos"].shape == mb["img_pos"].shape
    assert g["img_pos"].sharding.spec == jax.P(sharding_lib.BATCH_AXES, None, None)
    assert set(sharding_lib.BATCH_AXES) == {"data", "fsdp"}
    np.testing.assert_array_equal(np.asarray(g["img_mask"]), mb["img_mask"])
    assert len(g["img_pos"].addressable_shards) == 8


# ----------------------------------------------------------------------------- the inspector

def test_inspector_prints_batches_and_throughput(shards):
    d = os.path.dirname(shards[0])
    r = subprocess.run([sys.executable, "tools/inspect_data.py", "--config=experiments/pretrain.py:stage2",
                        f"--config.data.path={d}", "--config.data.buckets=ar9:64,96,128",
                        "--config.data.min_area=1024", "--config.data.per_device_batch=(6,3,2)", "--num_batches=6",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert "pipeline" in lines[0] and "throughput" in lines[-1]
    batches = lines[1:-1]
    assert len(batches) == 6 and {b["area"] for b in batches} == {64, 96, 128}
    for b in batches:
        assert len(b["buckets"]) == len(b["aspect"]) == len(b["tokens"]) == b["batch_size"]
        assert set(b["skipped"]) == set(sp.SKIP_REASONS) and 0 <= b["padding_fraction"] < 0.5
    assert lines[-1]["throughput"]["images_per_s_per_core"] > 0
