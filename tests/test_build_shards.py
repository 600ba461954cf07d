"""The shard builder (tools/build_shards.py, lens_jax/data/shard_writer.py): inputs, filters, restart, workers."""
import io
import json
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from lens_jax.data import shard_writer as sw
from lens_jax.data.records import decode_record
from tools import build_shards as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_AREA = 20 * 20


def _img(w, h, fmt="PNG", seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _read_all(out):
    ds = grain.sources.ArrayRecordDataSource(sw.list_shards(str(out)))
    return [decode_record(ds[i]) for i in range(len(ds))]


def _shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.startswith("shard-")}


@pytest.fixture
def folder(tmp_path):
    """A folder + JSONL with 6 good items and one of every skip reason; returns (dir, expected good records)."""
    d = tmp_path / "raw"
    (d / "sub").mkdir(parents=True)
    good, lines = [], []

    def add(rel, data, caption, brief=None, meta=None, expect=None):
        if data is not None:
            (d / rel).write_bytes(data)
        entry = {"file": rel, "caption": caption}
        if brief is not None:
            entry["brief"] = brief
        if meta is not None:
            entry["meta"] = meta
        lines.append(json.dumps(entry))
        if expect:
            good.append(dict(id=rel, image=data, width=expect[0], height=expect[1], caption=caption,
                             brief=brief or "", meta=json.dumps(meta, sort_keys=True) if meta else ""))

    add("a.png", _img(32, 24, seed=1), "a dense caption of image a", "brief a", expect=(32, 24))
    add("sub/b.jpg", _img(40, 30, "JPEG", seed=2), "caption b", meta={"k": 1}, expect=(40, 30))
    add("corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg", "caption corrupt")  # unreadable
    add("trunc.png", _img(30, 30, seed=3)[:200], "caption truncated")                   # unreadable
    add("tiny.png", _img(12, 12, seed=4), "caption tiny")                               # too_small (144 < 400)
    add("empty.png", _img(24, 24, seed=5), "   ")                                       # empty_caption
    add("gone.png", None, "caption of a missing file")                                  # missing_file
    lines.append("{not json")                                                           # malformed_entry
    lines.append("")                                                                    # blank: not an item
    add("c.webp", _img(20, 20, "WEBP", seed=6), "caption c", "brief c", expect=(20, 20))
    add("d.png", _img(64, 21, seed=7), "caption d", expect=(64, 21))
    add("sub/e.gif", _img(25, 25, "GIF", seed=8), "caption e", expect=(25, 25))
    add("f.bmp", _img(21, 40, "BMP", seed=9), "caption f", expect=(21, 40))
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d, good


EXPECTED_SKIPS = {"malformed_entry": 1, "empty_caption": 1, "missing_file": 1, "unreadable": 2, "too_small": 1}


def test_folder_jsonl_counts_and_round_trip(folder, tmp_path):
    d, good = folder
    out = tmp_path / "out"
    summary = sw.build_shards(sw.FolderInput(str(d)), str(out), records_per_shard=4, min_area=MIN_AREA,
                              log=lambda s: None)
    m = summary["manifest"]
    assert summary["complete"] and m == sw.read_manifest(str(out))
    assert m["num_inputs"] == 12 and m["num_shards"] == 3 and m["records"] == 6
    assert m["skipped"] == EXPECTED_SKIPS and m["num_skipped"] == 6
    assert m["skipped_examples"]["unreadable"] == ["corrupt.jpg", "trunc.png"]
    assert [s["inputs"] for s in m["shards"]] == [4, 4, 4]
    assert m["min_area"] == MIN_AREA and m["format_version"] == sw.FORMAT_VERSION
    assert m["files"] == [f"shard-0000{k}-of-00003.array_record" for k in range(3)]
    recs = _read_all(out)
    assert [{k: r[k] for k in good[0]} for r in recs] == good  # original bytes, captions, sizes, ids, order
    # Default min_area (384^2) drops every one of these small images as too_small.
    m2 = sw.build_shards(sw.FolderInput(str(d)), str(tmp_path / "out2"), records_per_shard=100,
                         log=lambda s: None)["manifest"]
    assert m2["records"] == 0 and m2["skipped"]["too_small"] == 7 and sw.list_shards(str(tmp_path / "out2")) == []


def _tar(path, samples, mode="w"):
    with tarfile.open(path, mode) as tf:
        for name, data in samples:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_webdataset_tar_input(tmp_path):
    long_key = "deep/" + "x" * 120  # > 100 chars: a PAX header before the member
    a, b, c, e = _img(30, 20, seed=1), _img(22, 33, "JPEG", seed=2), _img(21, 21, seed=3), _img(26, 26, seed=4)
    _tar(tmp_path / "part-0.tar", [
        ("s0.png", a), ("s0.txt", b"caption zero"),
        ("s1.jpg", b), ("s1.json", json.dumps({"caption": "caption one", "brief": "one"}).encode()),
        ("s2.txt", b"no image here"),                                   # missing_file
        ("s3.png", c), ("s3.txt", b"  "),                               # empty_caption
        (long_key + ".png", e), (long_key + ".txt", b"caption long"),
        ("s5.png", b"garbage"), ("s5.txt", b"caption garbage"),         # unreadable
    ])
    _tar(tmp_path / "part-1.tar.gz", [("t0.png", c), ("t0.txt", b"caption t0"),
                                      ("t1.png", a), ("t1.txt", b"caption t1")], mode="w:gz")
    for rps in (2, 3, 7):
        out = tmp_path / f"out{rps}"
        m = sw.build_shards(sw.TarInput([str(tmp_path / "part-*.tar*")]), str(out), records_per_shard=rps,
                            min_area=MIN_AREA, log=lambda s: None)["manifest"]
        assert m["num_inputs"] == 8 and m["records"] == 5
        assert {k: v for k, v in m["skipped"].items() if v} == {"missing_file": 1, "empty_caption": 1,
                                                                 "unreadable": 1}
        got = [(r["id"], r["image"], r["caption"], r["brief"], r["width"], r["height"]) for r in _read_all(out)]
        assert got == [("part-0.tar/s0", a, "caption zero", "", 30, 20),
                       ("part-0.tar/s1", b, "caption one", "one", 22, 33),
                       (f"part-0.tar/{long_key}", e, "caption long", "", 26, 26),
                       ("part-1.tar.gz/t0", c, "caption t0", "", 21, 21),
                       ("part-1.tar.gz/t1", a, "caption t1", "", 30, 20)]


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install -e '.[test]')")
    import pyarrow.parquet as pq
    imgs = [_img(20 + i, 30, seed=i) for i in range(5)]
    pq.write_table(pa.table({"img": imgs[:3] + [None, imgs[3]], "text": ["c0", "c1", "", "c3", "c4"],
                             "short": ["b0", None, "b2", "b3", "b4"]}), tmp_path / "p0.parquet", row_group_size=2)
    struct = [{"bytes": imgs[4], "path": "x.png"}, {"bytes": b"junk", "path": "y.png"}]
    pq.write_table(pa.table({"img": struct, "text": ["c5", "c6"], "short": ["b5", "b6"]}),
                   tmp_path / "p1.parquet", row_group_size=1)
    for rps in (1, 3, 7):
        out = tmp_path / f"out{rps}"
        src = sw.ParquetInput([str(tmp_path / "*.parquet")], image_column="img", caption_column="text",
                              brief_column="short", batch_size=2)
        m = sw.build_shards(src, str(out), records_per_shard=rps, min_area=MIN_AREA, log=lambda s: None)["manifest"]
        assert m["num_inputs"] == 7 and m["records"] == 4
        assert {k: v for k, v in m["skipped"].items() if v} == {"empty_caption": 1, "missing_file": 1,
                                                                 "unreadable": 1}
        got = [(r["id"], r["image"], r["caption"], r["brief"], r["width"]) for r in _read_all(out)]
        assert got == [("p0.parquet:0", imgs[0], "c0", "b0", 20), ("p0.parquet:1", imgs[1], "c1", "", 21),
                       ("p0.parquet:4", imgs[3], "c4", "b4", 23), ("p1.parquet:0", imgs[4], "c5", "b5", 24)]
    with pytest.raises(sw.ShardBuildError, match="no column"):
        sw.build_shards(sw.ParquetInput([str(tmp_path / "p0.parquet")]), str(tmp_path / "bad"), log=lambda s: None)


def test_restart_keeps_finished_shards_and_matches_one_shot(folder, tmp_path):
    d, _ = folder
    kw = dict(records_per_shard=2, min_area=MIN_AREA, log=lambda s: None)
    one = tmp_path / "one"
    full = sw.build_shards(sw.FolderInput(str(d)), str(one), **kw)["manifest"]
    out = tmp_path / "resumed"
    s = sw.build_shards(sw.FolderInput(str(d)), str(out), max_shards=2, **kw)
    assert not s["complete"] and s["built"] == 2 and s["num_shards"] == 6
    with pytest.raises(sw.ShardManifestError, match="incomplete"):
        sw.list_shards(str(out))
    # A crash mid-run: a stray temp file, and shard 2 renamed but its stats never written.
    (out / "shard-00003-of-00006.array_record.tmp-999").write_bytes(b"partial")
    (out / "shard-00002-of-00006.array_record").write_bytes(b"half-written")
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.startswith("shard-0000") and
              f[6:11] in ("00000", "00001")}
    assert len(mtimes) == 4  # two shards + their stats
    s = sw.build_shards(sw.FolderInput(str(d)), str(out), **kw)
    assert s["complete"] and s["reused"] == 2 and s["built"] == 4
    assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes
    assert s["manifest"] == full and sw.read_manifest(str(out)) == full
    assert _shard_bytes(out) == _shard_bytes(one)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    # A finished build reruns as a no-op; different settings are refused.
    assert sw.build_shards(sw.FolderInput(str(d)), str(out), **kw)["built"] == 0
    with pytest.raises(sw.ShardBuildError, match="different settings"):
        sw.build_shards(sw.FolderInput(str(d)), str(out), records_per_shard=2, min_area=1, log=lambda s: None)


def test_two_workers_match_one_worker(tmp_path):
    src = sw.ShapesWorldInput(24, image_size=32)
    a = sw.build_shards(src, str(tmp_path / "w1"), records_per_shard=5, min_area=0, num_workers=1,
                        log=lambda s: None)["manifest"]
    b = sw.build_shards(src, str(tmp_path / "w2"), records_per_shard=5, min_area=0, num_workers=2,
                        log=lambda s: None)["manifest"]
    assert a == b and a["records"] == 24 and a["num_shards"] == 5
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w2")


def test_shapes_world_cli_round_trip(tmp_path, capsys):
    from lens_jax.data.synthetic import ShapesWorldConfig, example
    out = tmp_path / "shapes"
    assert cli.main(["--shapes_world=7", "--image_size=32", f"--out={out}", "--records_per_shard=3",
                     "--num_workers=1"]) == 0
    printed = capsys.readouterr().out
    assert "shards 3/3" in printed and "records/s" in printed and "done: 7 records" in printed
    m = sw.read_manifest(str(out))
    assert m["min_area"] == 0 and m["source"]["kind"] == "shapes_world" and m["records"] == 7
    cfg = ShapesWorldConfig(image_size=32)
    for i, r in enumerate(_read_all(out)):
        ex = example(i, cfg)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")), ex["image"])
        assert (r["width"], r["height"]) == (32, 32) and r["id"] == f"shapes/seed0/{i:08d}"
        assert r["caption"] == ex["dense"] and r["brief"] == ex["brief"]
        assert json.loads(r["meta"]) == json.loads(ex["metadata"])


def test_shapes_world_cli_takes_the_world_options(tmp_path, capsys):
    from lens_jax.data.synthetic import example, world_config
    opts = {"layout": "canonical", "grid_span": 1.2, "jitter": 0, "side_fractions": [0.1375, 0.1625, 0.1875],
            "backgrounds": ["white"], "sizes": ["medium"]}
    out = tmp_path / "shapes"
    assert cli.main(["--shapes_world=5", "--image_size=80", f"--shapes_world_options={json.dumps(opts)}",
                     f"--out={out}", "--num_workers=1"]) == 0
    cfg = world_config(opts, image_size=80, seed=0)
    manifest_world = sw.read_manifest(str(out))["source"]["config"]
    assert manifest_world["layout"] == "canonical" and list(manifest_world["backgrounds"]) == ["white"]
    for i, r in enumerate(_read_all(out)):
        ex = example(i, cfg)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")), ex["image"])
        assert r["brief"] == ex["brief"] and json.loads(r["meta"]) == json.loads(ex["metadata"])


def test_cli_errors(tmp_path, capsys):
    out = f"--out={tmp_path / 'out'}"
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "captions.jsonl").write_text("\n\n")
    cases = {(f"--images={tmp_path / 'nope'}",): "does not exist",
             (f"--images={tmp_path / 'empty'}",): "no captions file",
             (f"--images={tmp_path / 'blank'}",): "no input items",
             (f"--tar={tmp_path / 'none-*.tar'}",): "nothing matches",
             (): "exactly one input",
             ("--shapes_world=3", f"--images={tmp_path}"): "exactly one input",
             ("--shapes_world=3", "--shapes_world_options={layout: 1}"): "not valid JSON",
             ("--shapes_world=3", '--shapes_world_options={"layout": "spiral"}'): "unknown layout",
             ("--shapes_world=3", '--shapes_world_options={"grid": 2}'): "unknown shapes-world option"}
    for args, msg in cases.items():
        assert cli.main([*args, out, "--num_workers=1"]) == 2, args
        assert msg in capsys.readouterr().err, args
    # The script itself (spawn-safe entry point) exits 2 with the message.
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_shards.py"),
                        f"--images={tmp_path / 'nope'}", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "does not exist" in r.stderr


def test_list_shards_errors(tmp_path):
    with pytest.raises(sw.ShardManifestError, match="not a shard directory"):
        sw.list_shards(str(tmp_path))
    out = tmp_path / "s"
    sw.build_shards(sw.ShapesWorldInput(4, image_size=32), str(out), records_per_shard=2, min_area=0,
                    log=lambda s: None)
    assert len(sw.list_shards(str(out))) == 2
    os.remove(out / "shard-00001-of-00002.array_record")
    with pytest.raises(sw.ShardManifestError, match="missing"):
        sw.list_shards(str(out))
