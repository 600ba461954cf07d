"""The GenEval file protocol: metadata files in (with clear errors for malformed lines), GenEval's folder layout
out, ShapesEval results JSONL as GenEval's scripts read it, and the command-line scorer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lens_jax.data.synthetic import ShapesWorldConfig
from lens_jax.eval import geneval, shapes_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENEVAL_FILE = os.path.join(os.path.dirname(REPO), "shared", "data", "geneval", "evaluation_metadata.jsonl")
WORLD = ShapesWorldConfig(image_size=80)
TWO = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red circle"},
       {"tag": "position", "include": [{"class": "square", "count": 1},
                                       {"class": "triangle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a triangle left of a square"}]


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def test_a_hand_written_file_reads_and_round_trips(tmp_path):
    path = _write(tmp_path / "m.jsonl", TWO + [""])                    # a trailing blank line is fine
    prompts = geneval.read_metadata(path, WORLD)
    assert [p["prompt"] for p in prompts] == [t["prompt"] for t in TWO] and [p["index"] for p in prompts] == [0, 1]
    assert all("unseen" in p for p in prompts)
    geneval.write_metadata(str(tmp_path / "out.jsonl"), prompts)
    assert [json.loads(l) for l in open(tmp_path / "out.jsonl")] == TWO


@pytest.mark.parametrize("line,match", [
    ('{"tag": "colors", "include": [', r"line 2: not valid JSON"),
    ({"tag": "counting_v2", "include": [{"class": "circle", "count": 2}], "prompt": "x"}, r"line 2: unknown tag"),
    ({"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
     r"line 2: unknown class 'bench' in include\[0\]; the classes here are circle, square"),
    ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "teal"}], "prompt": "x"},
     r"line 2: unknown colour 'teal'"),
    ({"tag": "single_object", "include": [{"class": "circle", "count": 0}], "prompt": "x"}, r"positive integer"),
    ({"tag": "single_object", "include": [], "prompt": "x"}, r"non-empty 'include'"),
    ({"tag": "single_object", "include": [{"class": "circle", "count": 1}]}, r"non-empty 'prompt'"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
     r"earlier include clause"),
    ("[1, 2]", r"line 2: a line must be a JSON object"),
])
def test_a_malformed_line_is_an_error_naming_the_line(tmp_path, line, match):
    path = _write(tmp_path / "bad.jsonl", [TWO[0], line])
    with pytest.raises(geneval.MetadataError, match=match):
        geneval.read_metadata(path, WORLD)


def test_genevals_own_553_prompts_read_without_a_world_and_fail_with_one():
    prompts = geneval.read_metadata(GENEVAL_FILE)
    assert len(prompts) == 553
    assert {p["tag"] for p in prompts} == set(geneval.TASKS)
    with pytest.raises(geneval.MetadataError, match=r"line 1: unknown class 'bench'"):
        geneval.read_metadata(GENEVAL_FILE, WORLD)


def test_ground_truth_images_in_the_folder_layout_score_perfectly(tmp_path):
    prompts = shapes_eval.make_eval_prompts(WORLD, seed=0, per_task=2)
    rng = np.random.default_rng(0)
    images = [[shapes_eval.render_prompt_ground_truth(p, rng, WORLD) for _ in range(2)] for p in prompts]
    folder = geneval.write_folder(str(tmp_path / "geneval"), prompts, images)
    assert sorted(os.listdir(folder)) == [f"{i:05d}" for i in range(12)]
    assert sorted(os.listdir(os.path.join(folder, "00003", "samples"))) == ["00000.png", "00001.png"]
    assert json.loads(open(os.path.join(folder, "00000", "metadata.jsonl")).read()) == geneval.geneval_line(prompts[0])
    summary = geneval.score_folder(folder, WORLD)
    assert summary["overall"] == 1.0 and summary["num_images"] == 24 and summary["skipped_images"] == 0
    direct = shapes_eval.evaluate(images, prompts)                          # the in-memory evaluation agrees
    assert direct["overall"] == summary["overall"] and direct["tasks"] == summary["tasks"]
    rows = [json.loads(l) for l in open(summary["results"])]
    assert len(rows) == 24 and all(r["correct"] for r in rows)
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(rows[0])
    # GenEval's summary_scores.py: mean image accuracy per tag, then the mean over tags
    by_tag = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(r["correct"])
    assert np.mean([np.mean(v) for v in by_tag.values()]) == summary["overall"]
    assert len({r["metadata"] for r in rows}) <= 12


def test_the_folder_scorer_counts_unreadable_images_and_rewriting_replaces_old_folders(tmp_path):
    prompts = [dict(p) for p in TWO]
    rng = np.random.default_rng(1)
    imgs = [[shapes_eval.render_prompt_ground_truth(p, rng, WORLD)] for p in prompts]
    folder = str(tmp_path / "geneval")
    geneval.write_folder(folder, prompts * 2, imgs * 2)
    geneval.write_folder(folder, prompts, imgs)                              # a smaller run over the same folder
    assert sorted(os.listdir(folder)) == ["00000", "00001"]
    with open(os.path.join(folder, "00001", "samples", "00007.png"), "wb") as f:
        f.write(b"not a png")
    summary = geneval.score_folder(folder, WORLD)
    assert summary["skipped_images"] == 1 and summary["num_images"] == 2 and summary["overall"] == 1.0
    os.remove(os.path.join(folder, "00000", "metadata.jsonl"))
    with pytest.raises(geneval.ConfigError, match="has no metadata.jsonl"):
        geneval.score_folder(folder, WORLD)


def test_score_geneval_folder_tool(tmp_path):
    prompts = geneval.read_metadata(_write(tmp_path / "m.jsonl", TWO), WORLD)
    rng = np.random.default_rng(2)
    folder = geneval.write_folder(str(tmp_path / "out" / "geneval"), prompts,
                                  [[shapes_eval.render_prompt_ground_truth(p, rng, WORLD)] for p in prompts])
    p = subprocess.run([sys.executable, "tools/score_geneval_folder.py", folder], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Overall score (avg. over tasks): 1.00000" in p.stdout
    assert len(open(tmp_path / "out" / "results.jsonl").read().splitlines()) == 2
    assert json.load(open(tmp_path / "out" / "results.summary.json"))["overall"] == 1.0
    bad = subprocess.run([sys.executable, "tools/score_geneval_folder.py", str(tmp_path / "nowhere")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
