"""tools/bench_dit.py and tools/bench_train_step.py run end to end on CPU; the FLOP model matches the spec."""
import json

import numpy as np
import pytest

from lens_jax.models.mmdit import mmdit_config
from tools import bench_dit


def test_flop_model_matches_spec():
    cfg = mmdit_config("lens_3p8b")
    # Spec §2.11: linear FLOPs per token per forward ~ 2 x 1.359e9.
    per_token = (bench_dit.forward_flops(cfg, 1, 1001, 0) - bench_dit.forward_flops(cfg, 1, 1000, 0))
    attention_delta = 4 * (1001 ** 2 - 1000 ** 2) * 1536 * 48
    assert abs((per_token - attention_delta) / 2.718e9 - 1) < 0.01
    # A 1024^2 CFG step with ~256 text tokens is ~34.8 TFLOP (the floor quoted in the developers' guide).
    assert abs(bench_dit.forward_flops(cfg, 2, 4096, 256) / 1e12 - 34.8) < 0.3


def test_bench_runs_on_cpu(capsys):
    assert bench_dit.main(["--preset=tiny", "--resolution=64", "--text_len=8", "--iters=1", "--warmup=0",
                           "--attention=xla,einsum,cudnn", "--json"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    by = {r["attention"]: r for r in lines}
    assert by["xla"]["ms"] > 0 and by["einsum"]["image_tokens"] == 16
    assert "error" in by["cudnn"]          # no cuDNN on CPU: reported, not crashed


def test_train_step_bench_runs_both_layer_layouts(capsys):
    from tools import bench_train_step
    assert bench_train_step.main(["--batch=2", "--text_len=8", "--iters=1", "--warmup=0", "--json",
                                  "--variants=scan_layers=True,scan_layers=False"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert [r["scan_layers"] for r in rows] == [True, False]
    assert all(r["ms"] > 0 and r["image_tokens"] == 25 and r["gflop"] > 0 and np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ValueError, match="config.model has no field 'scan'"):
        bench_train_step.main(["--batch=2", "--text_len=8", "--iters=1", "--warmup=0", "--variants=scan=False"])
