"""Online encoding in the pretrain phase (config.data.features='online', shapes world), its config errors,
and the process -> batch rows mapping of strided (fsdp-major) batch shardings."""
import json
import os

import jax
import numpy as np
import pytest

from lens_jax import main as lens_main
from lens_jax.configs.base import ConfigError, load_experiment
from lens_jax.phases import pretrain
from lens_jax.train import distributed
from lens_jax.train import sharding as sharding_lib


def micro_config(features):
    c = load_experiment("pretrain", "tiny")
    c.data.features = features
    c.data.num_examples = 16
    c.data.max_text_tokens = 48
    c.batch_size = 8
    c.num_steps = 10
    c.log_every = 1
    c.checkpoint_every = 0
    c.sample_every = 0
    c.sample.prompts = ""
    c.eval.enabled = False
    c.tensorboard = False
    c.optim.warmup_steps = 2
    return c


def _losses(workdir):
    return [json.loads(l)["loss"] for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_online_features_train_and_match_the_cached_first_step(tmp_path):
    # Same examples, same batch order (latent_cache.batch_indices), same init and same whole-batch draws
    # (they depend only on the key and the latent shape): the first step's loss is the cached run's.
    online_dir, cached_dir = str(tmp_path / "online"), str(tmp_path / "cached")
    os.makedirs(online_dir), os.makedirs(cached_dir)
    lens_main.run(micro_config("online"), online_dir)
    c = micro_config("cached")
    c.num_steps = 1
    lens_main.run(c, cached_dir)
    online, cached = _losses(online_dir), _losses(cached_dir)
    assert len(online) == 10 and all(np.isfinite(online))
    assert np.mean(online[-3:]) < np.mean(online[:3]), online
    assert online[0] == pytest.approx(cached[0], rel=1e-4)


def test_raw_source_matches_the_cache_examples():
    from lens_jax.data.latent_cache import build_shapes_cache
    from lens_jax.data.raw_source import build_shapes_raw
    c = micro_config("online")
    from lens_jax.build import load_encoders
    enc = load_encoders(c)
    vae, encode_text, prompt_cfg, tokenizer = enc.vae, enc.encode_text, enc.prompt, enc.tokenizer
    raw = build_shapes_raw(c, tokenizer, prompt_cfg)
    cache = build_shapes_cache(c, vae, encode_text)
    assert raw.text_len == cache.txt.shape[1] and raw.grid == cache.grid and len(raw) == len(cache)
    for step in (0, 3):
        np.testing.assert_array_equal(raw.indices(step, 8, 0), cache.indices(step, 8, 0))
    # the raw captions' valid tokens after the offset are the cache's text mask
    np.testing.assert_array_equal(raw.attention_mask[:, raw.txt_offset:], cache.mask)
    np.testing.assert_allclose(np.asarray(vae.encode_tokens(raw.pixels[:4].astype(np.float32) / 127.5 - 1.0)),
                               cache.img[:4], rtol=1e-4, atol=2e-4)   # batch-size-dependent conv sums


def test_pretrain_validate_rejects_online_shards_and_accumulated_shards():
    c = micro_config("online")
    c.data.source = "shards"
    with pytest.raises(ConfigError, match="mix aspect-ratio buckets"):
        pretrain.validate(c)
    c.data.features = "cached"
    c.grad_accum_steps = 2
    with pytest.raises(ConfigError, match="grad_accum_steps=2"):
        pretrain.validate(c)
    c = micro_config("cached")
    c.data.features = "bogus"
    with pytest.raises(ConfigError, match="features"):
        pretrain.validate(c)
    c = micro_config("cached")
    c.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="divisible"):
        pretrain.validate(c)


def _local_slices(sharding, global_batch, devices):
    """make_array_from_process_local_data's mapping: device -> slice of the process-local rows
    (shard k of the process's sorted distinct shard starts takes local rows [k*shard, (k+1)*shard))."""
    index_map = sharding.devices_indices_map((global_batch,))
    starts = sorted({index_map[d][0].start or 0 for d in devices})
    shard = global_batch // len({index_map[d][0].start or 0 for d in sharding.mesh.devices.flat})
    return {d: slice(starts.index(index_map[d][0].start or 0) * shard,
                     (starts.index(index_map[d][0].start or 0) + 1) * shard) for d in devices}


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 1), (4, 2, 1), (8, 1, 1)])
def test_process_rows_of_simulated_processes(shape):
    """8 fake devices on a (data, fsdp, tensor) mesh, the first 4 (in mesh order, data-major) assigned to
    simulated process 0 and the rest to process 1: with the fsdp-major batch axes each process may hold
    strided rows; rows are disjoint, complete and feed every device its own rows."""
    devices = np.asarray(jax.devices()[:8]).reshape(shape)
    mesh = jax.sharding.Mesh(devices, sharding_lib.MESH_AXES)
    sharding = sharding_lib.batch_sharding(mesh, 3)
    b = 16
    procs = [list(devices.flat)[:4], list(devices.flat)[4:]]
    rows = [distributed.rows_of_devices(sharding, b, p) for p in procs]
    assert sorted(np.concatenate(rows).tolist()) == list(range(b))          # disjoint and complete
    assert all(len(r) == b // 2 and np.all(np.diff(r) > 0) for r in rows)
    global_batch = np.arange(b) * 10
    index_map = sharding.devices_indices_map((b,))
    for p, r in zip(procs, rows):
        local = distributed.take_rows({"x": global_batch}, r, b)["x"]
        for d, sl in _local_slices(sharding, b, p).items():
            np.testing.assert_array_equal(local[sl], global_batch[index_map[d][0]])
    if shape == (2, 2, 2):                                                   # fsdp-major: strided rows
        assert rows[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
