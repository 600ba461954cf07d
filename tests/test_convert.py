"""End-to-end conversion: safetensors on disk -> tools/convert_checkpoint.py -> Orbax -> restored params."""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lens_jax.checkpoints import convert as convert_lib
from lens_jax.checkpoints.safetensors_io import SafetensorsError, open_checkpoint, save_file
from tools import convert_checkpoint


def _random_tensors(shapes, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(p))


def test_lens_dit_bf16_safetensors_to_orbax_and_back(tmp_path):
    from lens_jax.checkpoints.lens_convert import convert_lens_dit, official_shapes
    from lens_jax.models.mmdit import MMDiT, apply_official, mmdit_config
    cfg = mmdit_config("tiny")
    sd = _random_tensors(official_shapes(cfg), dtype=ml_dtypes.bfloat16)
    src = tmp_path / "transformer"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    dst = tmp_path / "out"
    assert convert_checkpoint.main(["--kind=lens_dit", f"--src={src}", f"--dst={dst}", "--preset=tiny",
                                    "--dtype=source"]) == 0
    kind, cfg2, variables = convert_lib.load_converted(str(dst))
    assert kind == "lens_dit" and cfg2 == cfg
    _assert_trees_equal(variables["params"], convert_lens_dit(sd, cfg))
    assert variables["params"]["img_in"]["kernel"].dtype == ml_dtypes.bfloat16
    x = np.ones((1, 128, 2, 2), np.float32)
    out = apply_official(MMDiT(cfg), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables["params"]),
                         x, np.array([0.5], np.float32), np.ones((1, 3, 96), np.float32), np.ones((1, 3), bool))
    assert np.all(np.isfinite(np.asarray(out)))
    # A second conversion into the same place refuses to overwrite.
    assert convert_checkpoint.main(["--kind=lens_dit", f"--src={src}", f"--dst={dst}", "--preset=tiny"]) == 2


def test_gpt_oss_and_vae_convert_through_the_tool(tmp_path):
    from lens_jax.checkpoints.gpt_oss_convert import expected_hf_shapes
    from lens_jax.checkpoints.vae_convert import expected_diffusers_shapes
    from lens_jax.models.gpt_oss import gpt_oss_config
    from lens_jax.models.vae import vae_config
    for kind, shapes in (("gpt_oss", expected_hf_shapes(gpt_oss_config("tiny"), quantized=False, full=True)),
                         ("flux2_vae", expected_diffusers_shapes(vae_config("tiny")))):
        sd = _random_tensors(shapes)
        sd = {k: v for k, v in sd.items() if v.ndim > 0}     # drop scalar counters (optional key)
        path = tmp_path / f"{kind}.safetensors"
        save_file(sd, str(path))
        dst = tmp_path / f"{kind}_out"
        assert convert_checkpoint.main([f"--kind={kind}", f"--src={path}", f"--dst={dst}", "--preset=tiny",
                                        "--dtype=float32"]) == 0
        got_kind, _, variables = convert_lib.load_converted(str(dst))
        assert got_kind == kind and "params" in variables


def test_tool_reports_bad_keys_and_corrupt_files(tmp_path, capsys):
    from lens_jax.checkpoints.lens_convert import official_shapes
    from lens_jax.models.mmdit import mmdit_config
    sd = _random_tensors(official_shapes(mmdit_config("tiny")))
    del sd["proj_out.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    assert convert_checkpoint.main(["--kind=lens_dit", f"--src={path}", f"--dst={tmp_path / 'o'}", "--preset=tiny"]) == 2
    err = capsys.readouterr().err
    assert "missing keys (1)" in err and "proj_out.weight" in err
    # Truncated file: clear error, nothing written.
    data = open(path, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="truncated"):
        open_checkpoint(str(trunc))
    assert convert_checkpoint.main(["--kind=lens_dit", f"--src={trunc}", f"--dst={tmp_path / 'o2'}", "--preset=tiny"]) == 2
    assert not os.path.exists(tmp_path / "o2")


def test_sharded_index_checkpoint(tmp_path):
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    b = {"y": np.ones(4, ml_dtypes.bfloat16)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    import json
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    r = open_checkpoint(str(tmp_path))
    assert sorted(r) == ["x", "y"] and r.shape("x") == (2, 3) and r.dtype("y") == ml_dtypes.bfloat16
    np.testing.assert_array_equal(r["x"], a["x"])


def test_the_streaming_reader_agrees_with_safetensors(tmp_path):
    """Files written by safetensors itself (numpy and torch, bf16 included: the official weights' dtype) read back
    exactly through open_checkpoint."""
    import torch
    from safetensors import safe_open
    from safetensors.numpy import save_file as st_save
    from safetensors.torch import save_file as st_save_torch
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64)}
    st_save(arrays, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    reader = open_checkpoint(str(tmp_path / "x.safetensors"))
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(reader)
        for k in f.keys():
            np.testing.assert_array_equal(reader[k], f.get_tensor(k))
    st_save_torch({"w": torch.linspace(-1, 1, 6, dtype=torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    w = open_checkpoint(str(tmp_path / "bf16.safetensors"))["w"]
    assert w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(w.astype(np.float32), torch.linspace(-1, 1, 6, dtype=torch.bfloat16).float().numpy())
