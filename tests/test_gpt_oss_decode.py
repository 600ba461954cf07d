"""GPT-OSS generation with a KV cache: parity with transformers' generate, with the no-cache LM, padding, sampling,
stop ids, `load_lm` and the full-LM conversion."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.checkpoints import orbax_io
from lens_jax.checkpoints.convert import load_converted
from lens_jax.checkpoints.gpt_oss_convert import abstract_variables, convert_gpt_oss
from lens_jax.checkpoints.keys import CheckpointKeyError
from lens_jax.checkpoints.safetensors_io import save_file
from lens_jax.models import gpt_oss_decode as gd
from lens_jax.models.gpt_oss import gpt_oss_config
from lens_jax.models.gpt_oss_lm import GptOssLM
from tests.test_gpt_oss import _random_hf_model, _state_dict_np

# The 'tiny' preset: 4 layers (0 and 2 slide, window 8), 8 experts top-2, vocab 256, all layers up to 3 built.
CFG = gpt_oss_config("tiny")
NEW = 20            # generated tokens per test (one decode compilation per batch size)
BUCKET = 16         # every prompt here is <= 16 tokens: one prefill length
TINY_LM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiny", "text_encoder")


@pytest.fixture(scope="module")
def setup():
    model = _random_hf_model(CFG, seed=0)
    sd = _state_dict_np(model)
    params = convert_gpt_oss(sd, CFG, dtype=np.float32, full=True)["params"]
    return model, sd, params


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def _greedy(params, prompts, **kw):
    kw.setdefault("stop_ids", [])
    return gd.generate(params, CFG, prompts, max_new_tokens=NEW, length_bucket=BUCKET, **kw)


def test_greedy_matches_transformers(setup):
    torch = pytest.importorskip("torch")
    model, _, params = setup
    prompts = _prompts([10, 10], seed=1)
    assert CFG.sliding_window < 10 + NEW
    experts = set()
    hooks = [layer.mlp.router.register_forward_hook(lambda mod, args, out: experts.update(out[2].flatten().tolist()))
             for layer in model.model.layers]
    model.generation_config.eos_token_id = None      # run all NEW tokens
    model.generation_config.pad_token_id = 0
    try:
        with torch.no_grad():
            ids = torch.tensor(prompts, dtype=torch.long)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    finally:
        for h in hooks:
            h.remove()
    assert len(experts) >= 6, f"routing is trivial: experts used {sorted(experts)}"
    ref = ref[:, 10:].tolist()
    res = _greedy(params, prompts)
    assert res.tokens == ref
    assert res.stopped == [False, False]


def test_forward_matches_lm_logits(setup):
    _, _, params = setup
    prompts = _prompts([10, 6], seed=2)
    plen = 12
    tokens = np.zeros((2, plen + 1), np.int32)
    first = np.array([plen - len(p) for p in prompts], np.int32)
    for b, p in enumerate(prompts):
        tokens[b, first[b]:plen] = p
    tokens[:, plen] = [7, 11]                                            # one decode step after the prefill
    lm = jax.jit(lambda p, i, m: GptOssLM(CFG).apply({"params": p}, i, m))
    fwd = jax.jit(lambda p, c, t, s: gd.forward(p, CFG, c, t, s))
    cache = gd.init_cache(CFG, 2, plen + 4, first)
    logits, cache = fwd(params, cache, jnp.asarray(tokens[:, :plen]), 0)
    step, cache = fwd(params, cache, jnp.asarray(tokens[:, plen:]), plen)
    assert logits.shape == (2, plen, CFG.vocab_size) and logits.dtype == jnp.float32
    assert step.shape == (2, 1, CFG.vocab_size)
    for b in range(2):
        seq = tokens[b, first[b]:]                                       # prompt + the decoded token
        ref = np.asarray(lm(params, jnp.asarray(seq[None]), jnp.ones((1, len(seq)), bool)))[0]
        got = np.concatenate([np.asarray(logits[b, first[b]:]), np.asarray(step[b])], axis=0)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)


def _greedy_no_cache(params, prompt, n):
    """Greedy decoding re-running GptOssLM on the whole sequence (fixed-length buffer, causal) every step."""
    total = len(prompt) + n
    step = jax.jit(lambda p, i, m, t: jnp.argmax(GptOssLM(CFG).apply({"params": p}, i, m)[0, t - 1]))
    ids = np.zeros((1, total), np.int32)
    ids[0, :len(prompt)] = prompt
    for t in range(len(prompt), total):
        mask = np.arange(total)[None] < t
        ids[0, t] = int(step(params, jnp.asarray(ids), jnp.asarray(mask), t))
    return ids[0, len(prompt):].tolist()


def test_cache_matches_no_cache_greedy(setup):
    _, _, params = setup
    prompt = _prompts([13], seed=3)[0]                                   # left padding 3 in the bucket of 16
    res = _greedy(params, [prompt])
    assert res.tokens[0] == _greedy_no_cache(params, prompt, NEW)


def test_left_padded_batch_matches_single(setup):
    _, _, params = setup
    prompts = _prompts([3, 14, 7], seed=4)
    batch = _greedy(params, prompts)
    for b, p in enumerate(prompts):
        assert batch.tokens[b] == _greedy(params, [p]).tokens[0], b
        assert len(batch.tokens[b]) == NEW


def test_sampling(setup):
    _, _, params = setup
    prompts = _prompts([10, 5], seed=5)
    kw = dict(stop_ids=[], max_new_tokens=NEW, length_bucket=BUCKET)
    a = gd.generate(params, CFG, prompts, temperature=1.0, seed=3, **kw)
    b = gd.generate(params, CFG, prompts, temperature=1.0, seed=3, **kw)
    c = gd.generate(params, CFG, prompts, temperature=1.0, seed=4, **kw)
    assert a == b
    assert a.tokens != c.tokens
    assert all(0 <= t < CFG.vocab_size for row in a.tokens for t in row)
    greedy = _greedy(params, prompts)
    assert a.tokens != greedy.tokens
    nucleus = gd.generate(params, CFG, prompts, temperature=1.0, top_p=1e-6, seed=3, **kw)
    assert nucleus.tokens == greedy.tokens


def test_sample_logits_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    counts = np.bincount(np.asarray(gd.sample_logits(logits, keys, 1.0, 0.7)), minlength=4)
    assert counts[2] == counts[3] == 0                                   # nucleus {0.5, 0.3} reaches 0.7
    assert abs(counts[0] / 4000 - 0.625) < 0.03                          # renormalised 0.5 / 0.8
    counts = np.bincount(np.asarray(gd.sample_logits(logits, keys, 1.0, 1.0)), minlength=4)
    assert counts[3] > 100                                               # full distribution


def test_stop_ids(setup):
    _, _, params = setup
    prompts = _prompts([10, 10], seed=1)
    full = _greedy(params, prompts).tokens
    stop = full[0][5]
    res = _greedy(params, prompts, stop_ids=[stop])
    k0 = full[0].index(stop)
    assert res.tokens[0] == full[0][:k0] and res.stopped[0]
    if stop in full[1]:
        assert res.tokens[1] == full[1][:full[1].index(stop)] and res.stopped[1]
    else:
        assert res.tokens[1] == full[1] and not res.stopped[1]
    # Both rows stop: the loop ends early, each row cut at its first stop id.
    stops = [full[0][3], full[1][8]]
    res = _greedy(params, prompts, stop_ids=stops)
    for b in range(2):
        cut = min(full[b].index(s) for s in stops if s in full[b])
        assert res.tokens[b] == full[b][:cut] and res.stopped[b]
    # A stop id as the very first generated token.
    res = _greedy(params, prompts, stop_ids=[full[0][0]])
    assert res.tokens[0] == [] and res.stopped[0]


def test_invalid_arguments(setup):
    _, _, params = setup
    with pytest.raises(ValueError, match="empty"):
        _greedy(params, [[1, 2], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        _greedy(params, [])
    with pytest.raises(ValueError, match="outside"):
        _greedy(params, [[CFG.vocab_size]])
    with pytest.raises(ValueError, match="top_p"):
        _greedy(params, [[1]], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gd.generate(params, CFG, [[1]], max_new_tokens=0, stop_ids=[])


def test_load_lm_tiny_checkpoint():
    from lens_jax.recipes.text_encoder import LM_HEAD_DIR, LM_HEAD_KIND
    assert (gd.LM_HEAD_DIR, gd.LM_HEAD_KIND) == (LM_HEAD_DIR, LM_HEAD_KIND)
    cfg, params = gd.load_lm(TINY_LM)
    shapes = jax.tree.map(lambda x: x.shape, abstract_variables(cfg, full=True)["params"])
    assert jax.tree.map(lambda x: tuple(x.shape), params) == shapes

    _, _, enc = load_converted(TINY_LM)
    cfg2, shared = gd.load_lm(TINY_LM, encoder_params=enc["params"])
    assert cfg2 == cfg
    ids = ["embedding"] + [f"layers_{i}" for i in range(cfg.num_layers)]
    for k in ids:
        for a, b in zip(jax.tree.leaves(shared[k]), jax.tree.leaves(enc["params"][k])):
            assert a is b
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(shared)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # dtype: leaves already in it are kept (still shared), others are cast.
    _, same = gd.load_lm(TINY_LM, encoder_params=enc["params"], dtype=jnp.float32)
    assert same["embedding"] is enc["params"]["embedding"]
    _, half = gd.load_lm(TINY_LM, encoder_params=enc["params"], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    prompt = [[3, 17, 200, 42, 9]]
    r1 = gd.generate(params, cfg, prompt, max_new_tokens=6, stop_ids=[], length_bucket=8)
    r2 = gd.generate(shared, cfg, prompt, max_new_tokens=6, stop_ids=[], length_bucket=8)
    assert r1 == r2 and len(r1.tokens[0]) == 6


def test_load_lm_errors(tmp_path):
    meta = orbax_io.load_meta(TINY_LM)
    no_head = tmp_path / "no_head"
    no_head.mkdir()
    (no_head / orbax_io.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError) as e:
        gd.load_lm(str(no_head))
    assert os.path.join(str(no_head), "lm_head") in str(e.value) and "--gpt_oss_full" in str(e.value)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / orbax_io.META_FILE).write_text(json.dumps({**meta, "config": {**meta["config"],
                                                                             "selected_layers": [0, 1]}}))
    shutil.copytree(os.path.join(TINY_LM, "lm_head"), partial / "lm_head")
    with pytest.raises(ValueError, match="every layer"):
        gd.load_lm(str(partial))


def test_convert_full_round_trip(setup, tmp_path):
    from tools.convert_checkpoint import main
    _, sd, params = setup
    # full=True: the GptOssLM tree; the head is lm_head.weight transposed.
    assert sorted(params) == sorted(["embedding", "final_norm", "lm_head"] + [f"layers_{i}" for i in range(4)])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(params["final_norm"]["scale"], sd["model.norm.weight"])
    # The default is unchanged: the encoder tree only (model.norm / lm_head ignored).
    enc = convert_gpt_oss(sd, CFG, dtype=np.float32)["params"]
    assert sorted(enc) == ["embedding"] + [f"layers_{i}" for i in range(4)]
    # full=True needs the head.
    with pytest.raises(CheckpointKeyError, match="lm_head.weight"):
        convert_gpt_oss({k: v for k, v in sd.items() if k != "lm_head.weight"}, CFG, full=True)

    src, dst = tmp_path / "hf", tmp_path / "jax"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    assert main([f"--src={src}", f"--dst={dst}", "--kind=gpt_oss", "--preset=tiny", "--dtype=float32",
                 "--gpt_oss_full"]) == 0
    assert main([f"--src={src}", f"--dst={dst}", "--kind=gpt_oss", "--preset=tiny", "--gpt_oss_full"]) == 2
    cfg, loaded = gd.load_lm(str(dst))
    assert cfg == CFG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(SystemExit):
        main([f"--src={src}", f"--dst={dst}", "--kind=lens_dit", "--gpt_oss_full"])
