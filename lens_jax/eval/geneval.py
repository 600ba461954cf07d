"""The GenEval file protocol every lens_jax evaluation speaks (prompts in, GenEval folders out, results JSONL).

Prompts: GenEval's `evaluation_metadata.jsonl` format, one JSON object per line,
    {"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index]}], "exclude"?: [...],
     "prompt"}
(`read_metadata`; `--config.eval.metadata_file=FILE`), or the built-in ShapesEval prompt sets (the default).
In the shapes world the classes are the world's shape names and the colours its palette.

Images: GenEval's layout, as its `generation/diffusers_generate.py` writes it (`write_folder`):
    OUT/<index:05d>/metadata.jsonl     the prompt's metadata line
    OUT/<index:05d>/samples/<k:05d>.png
so the same folder can go to GenEval's own scorer (`evaluation/evaluate_images.py`) for real-world models.

Scores: `score_folder` runs ShapesEval on every image of a folder and writes GenEval's per-image results JSONL
(`filename`, `tag`, `prompt`, `correct`, `reason`, `metadata` (the line as a JSON string), `details`, plus
ShapesEval's `rules_correct`, `clean`, `partial`, `unseen`), which GenEval's `summary_scores.py` reads; its
summary (`overall` = mean over tasks of the image accuracy, as summary_scores.py computes it) is the
ShapesEval summary of lens_jax/eval/shapes_eval.py. tools/score_geneval_folder.py is the command line.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.configs.base import ConfigError
from lens_jax.eval import shapes_eval

TASKS = shapes_eval.TASKS
GENEVAL_KEYS = ("tag", "include", "exclude", "prompt")
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "synthetic_geneval.json"
FOLDER = "geneval"
REWRITE_FILE = "rewritten_prompt.txt"
REWRITES_FILE = "rewrites.jsonl"
COMPARISON_FILE = "reasoner_comparison.json"


class MetadataError(ConfigError):
    """A GenEval metadata file is malformed; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------
# Prompts

def _check_clause(c: Any, where: str, kind: str, i: int, classes, colors) -> None:
    if not isinstance(c, dict):
        raise MetadataError(f"{where}: {kind}[{i}] must be an object, got {c!r}")
    if not isinstance(c.get("class"), str) or not c["class"]:
        raise MetadataError(f"{where}: {kind}[{i}] needs a 'class' string")
    if classes is not None and c["class"] not in classes:
        raise MetadataError(f"{where}: unknown class {c['class']!r} in {kind}[{i}]; the classes here are "
                            f"{', '.join(classes)}")
    count = c.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise MetadataError(f"{where}: {kind}[{i}] needs a positive integer 'count', got {count!r}")
    if "color" in c and (not isinstance(c["color"], str) or (colors is not None and c["color"] not in colors)):
        raise MetadataError(f"{where}: unknown colour {c['color']!r} in {kind}[{i}]"
                            + (f"; the colours here are {', '.join(colors)}" if colors is not None else ""))
    if "position" in c:
        pos = c["position"]
        if kind != "include" or not (isinstance(pos, (list, tuple)) and len(pos) == 2
                                     and pos[0] in shapes_eval.RELATIONS and isinstance(pos[1], int)
                                     and 0 <= pos[1] < i):
            raise MetadataError(f"{where}: {kind}[{i}] 'position' must be [relation, index of an earlier include "
                                f"clause] with relation one of {shapes_eval.RELATIONS}; got {pos!r}")


def parse_metadata_line(line: str, where: str, classes: Optional[Sequence[str]] = None,
                        colors: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """One metadata line -> its dict (GenEval keys and any extra ones kept); MetadataError naming `where`."""
    try:
        meta = json.loads(line)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: a line must be a JSON object, got {type(meta).__name__}")
    if meta.get("tag") not in TASKS:
        raise MetadataError(f"{where}: unknown tag {meta.get('tag')!r}; GenEval's tags are {', '.join(TASKS)}")
    if not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
        raise MetadataError(f"{where}: needs a non-empty 'prompt' string")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise MetadataError(f"{where}: needs a non-empty 'include' list")
    for i, c in enumerate(include):
        _check_clause(c, where, "include", i, classes, colors)
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        raise MetadataError(f"{where}: 'exclude' must be a list")
    for i, c in enumerate(exclude):
        _check_clause(c, where, "exclude", i, classes, colors)
    return meta


def read_metadata(path: str, world=None) -> List[Dict[str, Any]]:
    """Prompts of a GenEval metadata file (blank lines skipped). With `world` (a ShapesWorldConfig) classes and
    colours must be the world's, and each prompt gets `unseen` (a held-out colour-shape combination)."""
    if not os.path.isfile(path):
        raise ConfigError(f"GenEval metadata file {path!r} does not exist")
    classes = tuple(world.shapes) if world is not None else None
    colors = tuple(world.colors) if world is not None else None
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            meta = parse_metadata_line(line, f"{path} line {n}", classes, colors)
            if world is not None:
                meta["unseen"] = shapes_eval.is_unseen(meta, world)
            meta["index"] = len(prompts)
            prompts.append(meta)
    if not prompts:
        raise MetadataError(f"{path} holds no prompts")
    return prompts


def geneval_line(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The GenEval metadata of a prompt dict (its keys in GenEval's order, lens_jax's bookkeeping dropped)."""
    return {k: meta[k] for k in GENEVAL_KEYS if k in meta}


def write_metadata(path: str, prompts: Sequence[Dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(geneval_line(p)) + "\n")


# ----------------------------------------------------------------------------------------------------
# Folders

def write_folder(outdir: str, prompts: Sequence[Dict[str, Any]], images_per_prompt: Sequence[Sequence[np.ndarray]],
                 seeds: Optional[Sequence[Sequence[int]]] = None, rewrites: Optional[Sequence[str]] = None) -> str:
    """Writes GenEval's layout (module docstring) into `outdir`, replacing an earlier folder there (a stale
    prompt folder of a larger earlier run would otherwise be scored with this one). PNGs carry the prompt
    (and seed index) in their text chunks. `rewrites`: the reasoner's prompt per prompt, which the images were
    rendered from, saved as OUT/<index>/rewritten_prompt.txt and in the PNGs (the metadata keeps the user's
    prompt, which the images are scored against)."""
    from PIL import Image, PngImagePlugin
    if len(prompts) != len(images_per_prompt):
        raise ValueError(f"{len(images_per_prompt)} image lists for {len(prompts)} prompts")
    if os.path.isdir(outdir):
        shutil.rmtree(outdir)
    for i, (p, imgs) in enumerate(zip(prompts, images_per_prompt)):
        d = os.path.join(outdir, f"{i:05d}")
        os.makedirs(os.path.join(d, "samples"))
        with open(os.path.join(d, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(geneval_line(p)) + "\n")
        if rewrites is not None:
            with open(os.path.join(d, REWRITE_FILE), "w", encoding="utf-8") as f:
                f.write(rewrites[i] + "\n")
        for k, img in enumerate(imgs):
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", p["prompt"])
            if rewrites is not None:
                info.add_text("rewritten_prompt", rewrites[i])
            if seeds is not None:
                info.add_text("seed", str(seeds[i][k]))
            Image.fromarray(shapes_eval.to_uint8(img)).save(os.path.join(d, "samples", f"{k:05d}.png"), pnginfo=info)
    return outdir


def read_folder(folder: str, world=None) -> List[Tuple[str, Dict[str, Any], List[str]]]:
    """[(prompt folder, metadata, sample paths)] of a GenEval folder, in index order (GenEval's rules: numeric
    sub-folders, `samples/<digits>.png`). Raises ConfigError for a missing or malformed metadata.jsonl."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a directory")
    out = []
    for name in sorted((n for n in os.listdir(folder) if n.isdigit()), key=int):
        d = os.path.join(folder, name)
        if not os.path.isdir(d):
            continue
        meta_path = os.path.join(d, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{d} has no metadata.jsonl (not a GenEval prompt folder)")
        with open(meta_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        if len(lines) != 1:
            raise MetadataError(f"{meta_path}: expected one metadata line, found {len(lines)}")
        meta = parse_metadata_line(lines[0], f"{meta_path} line 1",
                                   tuple(world.shapes) if world is not None else None,
                                   tuple(world.colors) if world is not None else None)
        if world is not None:
            meta["unseen"] = shapes_eval.is_unseen(meta, world)
        sdir = os.path.join(d, "samples")
        samples = sorted((os.path.join(sdir, n) for n in (os.listdir(sdir) if os.path.isdir(sdir) else [])
                          if re.fullmatch(r"\d+\.png", n)), key=lambda p: int(os.path.basename(p)[:-4]))
        out.append((d, meta, samples))
    if not out:
        raise ConfigError(f"{folder} holds no GenEval prompt folders (<index:05d>/metadata.jsonl)")
    return out


def _load_png(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def score_folder(folder: str, world, results_path: Optional[str] = None, integrity: bool = True,
                 progress=None) -> Dict[str, Any]:
    """ShapesEval of every image of a GenEval folder; writes the per-image results JSONL (module docstring) to
    `results_path` (default FOLDER/../results.jsonl) and returns the summary (shapes_eval.summarize, plus
    `skipped_images` for unreadable PNGs, which are counted and left out, and `results` = the JSONL path)."""
    entries = read_folder(folder, world)
    results_path = results_path or os.path.join(os.path.dirname(os.path.abspath(folder)), RESULTS_FILE)
    prompts, records, skipped = [], [], []
    total = sum(len(s) for _, _, s in entries)
    done = 0
    with open(results_path + ".tmp", "w", encoding="utf-8") as f:
        for d, meta, samples in entries:
            recs = []
            for path in samples:
                done += 1
                try:
                    img = _load_png(path)
                except (OSError, ValueError) as e:
                    skipped.append(f"{path}: {e}")
                    continue
                r = shapes_eval.score_image_record(img, meta)
                recs.append(r)
                row = dict(filename=path, tag=meta["tag"], prompt=meta["prompt"],
                           correct=shapes_eval.image_correct(r, integrity),
                           reason="\n".join(r["reasons"] + ([] if r["clean"] or not integrity else
                                                            [f"integrity: {r['spurious']} spurious component(s), "
                                                             f"clutter {r['clutter_frac']:.3f}"])),
                           metadata=json.dumps(geneval_line(meta)),
                           details=json.dumps(_details(r["detections"])),
                           rules_correct=r["rules_correct"], clean=r["clean"], partial=r["partial"],
                           unseen=bool(meta.get("unseen", False)))
                f.write(json.dumps(row) + "\n")
                if progress is not None:
                    progress(done, total)
            prompts.append(meta)
            records.append(recs)
    os.replace(results_path + ".tmp", results_path)
    summary = shapes_eval.summarize(records, prompts, integrity)
    summary["skipped_images"] = len(skipped)
    summary["skipped"] = skipped[:20]
    summary["results"] = results_path
    return summary


def _details(dets: Sequence[dict]) -> Dict[str, List[List[float]]]:
    """Detections as GenEval's `details`: {class: [[x0, y0, x1, y1, score], ...]} (recognised shapes)."""
    out: Dict[str, List[List[float]]] = {}
    for d in dets:
        if d["shape"] in (None, "unknown"):
            continue
        out.setdefault(d["shape"], []).append([float(v) for v in d["bbox"]] + [float(d.get("score", 1.0))])
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation of a pipeline (the eval phase and the end of training)

def evaluation_prompts(config, world, exclude: Sequence[str] = ()) -> Tuple[List[Dict[str, Any]], str]:
    """(prompts, where they came from): config.eval.metadata_file, or the built-in ShapesEval sets; prompts whose
    text is in `exclude` (a prompt search's development set) are removed."""
    e = config.eval
    if e.get("metadata_file", ""):
        scorer = e.get("scorer", "shapes")
        prompts, origin = read_metadata(e.metadata_file, world if scorer == "shapes" else None), e.metadata_file
    else:
        prompts = shapes_eval.make_eval_prompts(world, seed=e.seed, per_task=e.prompts_per_task or None)
        origin = f"built-in ShapesEval prompts (seed {e.seed}, {e.prompts_per_task or 'GenEval sizes'} per task)"
    if exclude:
        held = set(exclude)
        kept = [p for p in prompts if p["prompt"] not in held]
        origin += f", {len(prompts) - len(kept)} prompts of the search's development set removed"
        if not kept:
            raise ConfigError(f"every evaluation prompt is in the prompt search's development set ({origin})")
        prompts = kept
    return prompts, origin


def evaluate_pipeline(pipeline, config, outdir: str, source: str = "", log=print, rewriter=None,
                      exclude_prompts: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
    """Renders config.eval.samples_per_prompt images per evaluation prompt into OUTDIR/geneval (GenEval's
    layout), scores them with ShapesEval (config.eval.scorer='shapes'; 'none' only writes the folder, e.g. for
    GenEval's own scorer) and writes OUTDIR/synthetic_geneval.json, OUTDIR/results.jsonl, OUTDIR/samples.png and
    OUTDIR/prompts.txt (the grid's row prompts). Returns the summary (None without scoring).

    rewriter: a lens_jax.reasoner Rewriter; the images are rendered from its rewrites of the prompts (scored
    against the original metadata), which are saved in OUTDIR/rewrites.jsonl and next to the images.
    exclude_prompts: prompt texts left out of the evaluation set (a prompt search's development set)."""
    from lens_jax.data.synthetic import world_config
    e = config.eval
    scorer = e.get("scorer", "shapes")
    if scorer not in ("shapes", "none"):
        raise ConfigError(f"config.eval.scorer={scorer!r}; choose 'shapes' (ShapesEval) or 'none' (folder only)")
    os.makedirs(outdir, exist_ok=True)
    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    prompts, origin = evaluation_prompts(config, world, exclude_prompts)
    k = int(e.samples_per_prompt)
    rewrites = None
    if rewriter is not None:
        records = rewriter.rewrite_records([p["prompt"] for p in prompts])
        rewrites = [r.rewrite for r in records]
        with open(os.path.join(outdir, REWRITES_FILE), "w", encoding="utf-8") as f:
            for i, r in enumerate(records):
                f.write(json.dumps(dict(index=i, **r.to_dict()), ensure_ascii=False) + "\n")
        log(rewriter.summary())
    texts = [t for t in (rewrites or [p["prompt"] for p in prompts]) for _ in range(k)]
    t0 = time.time()
    bar = _bar(len(texts), "eval: rendering")

    def progress(done, total):
        bar(done)

    size = int(config.data.image_size)
    images = pipeline.generate(texts, size, size, e.num_steps, e.guidance, seed=e.seed, batch_size=e.batch_size,
                               mu=None if e.mu < 0 else e.mu, progress=progress)
    bar(None)
    per_prompt = [list(images[i * k:(i + 1) * k]) for i in range(len(prompts))]
    folder = write_folder(os.path.join(outdir, FOLDER), prompts, per_prompt,
                          seeds=[[i * k + j for j in range(k)] for i in range(len(prompts))], rewrites=rewrites)
    rows = list(range(0, len(prompts), max(1, len(prompts) // 24)))[:24]
    shapes_eval.save_grid([im for r in rows for im in per_prompt[r]], os.path.join(outdir, "samples.png"), ncol=k,
                          scale=max(1, 128 // size))
    with open(os.path.join(outdir, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts[r]["prompt"] for r in rows) + "\n")
    if scorer == "none":
        log(f"wrote {len(texts)} images for {len(prompts)} prompts ({origin}) to {folder} in {time.time() - t0:.0f}s; "
            "score them with GenEval's evaluation/evaluate_images.py (or tools/score_geneval_folder.py)")
        return None
    bar = _bar(len(texts), "eval: scoring")
    summary = score_folder(folder, world, os.path.join(outdir, RESULTS_FILE), integrity=bool(e.integrity),
                           progress=lambda done, total: bar(done))
    bar(None)
    summary["settings"] = dict(num_steps=e.num_steps, guidance=e.guidance, mu=e.mu, samples_per_prompt=k, seed=e.seed,
                               image_size=size, caption=config.data.caption, model=config.model.preset,
                               integrity_gate=bool(e.integrity), prompts=origin, weights=source, folder=folder,
                               reasoner=None if rewriter is None else dict(rewriter.describe(),
                                                                           stats=rewriter.stats.as_dict()))
    summary["per_prompt"] = [dict(prompt=p["prompt"], tag=p["tag"], unseen=bool(p.get("unseen", False)), accuracy=a)
                             for p, a in zip(prompts, summary["per_prompt"])]
    with open(os.path.join(outdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    first, second = format_summary(summary).split("\n")
    log(f"{first} in {time.time() - t0:.0f}s -> {outdir}\n{second}")
    return summary


def evaluate_with_reasoner(pipeline, config, workdir: str, rewriter, source: str = "", log=print,
                           exclude_prompts: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
    """The evaluation of a run: WORKDIR/eval without a reasoner, and with `rewriter` (not None) WORKDIR/eval_reasoner
    too (config.eval.with_and_without_reasoner; else only the rewritten one), on the same prompts, seeds and
    weights, with WORKDIR/eval_reasoner/reasoner_comparison.json and a side-by-side table in the log. Returns the
    reasoner's summary when there is one (with 'without_reasoner' attached), else the plain summary."""
    if rewriter is None:
        return evaluate_pipeline(pipeline, config, os.path.join(workdir, "eval"), source=source, log=log,
                                 exclude_prompts=exclude_prompts)
    plain = None
    if config.eval.get("with_and_without_reasoner", True):
        plain = evaluate_pipeline(pipeline, config, os.path.join(workdir, "eval"), source=source,
                                  log=lambda m: log("without reasoner: " + m), exclude_prompts=exclude_prompts)
    with_r = evaluate_pipeline(pipeline, config, os.path.join(workdir, "eval_reasoner"), source=source,
                               log=lambda m: log("with reasoner: " + m), rewriter=rewriter,
                               exclude_prompts=exclude_prompts)
    if with_r is None or plain is None:
        return with_r or plain
    table = comparison_table(plain, with_r)
    with open(os.path.join(workdir, "eval_reasoner", COMPARISON_FILE), "w") as f:
        json.dump(dict(without=_headline(plain), with_reasoner=_headline(with_r),
                       reasoner=with_r["settings"]["reasoner"], table=table), f, indent=2)
    log(table)
    with_r["without_reasoner"] = _headline(plain)
    return with_r


def _headline(s: Dict[str, Any]) -> Dict[str, Any]:
    return dict(overall=s["overall"], tasks=s["tasks"], integrity=s["integrity"], unseen=s["unseen"],
                overall_rules_only=s["overall_rules_only"])


def comparison_table(plain: Dict[str, Any], with_r: Dict[str, Any]) -> str:
    """A Markdown table: overall, per task and integrity without and with the reasoner."""
    rows = [("overall", plain["overall"], with_r["overall"])]
    rows += [(t, plain["tasks"].get(t, math.nan), with_r["tasks"].get(t, math.nan)) for t in with_r["tasks"]]
    rows += [("integrity", plain["integrity"], with_r["integrity"])]
    lines = ["| synthetic GenEval | without reasoner | with reasoner | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" for name, a, b in rows]
    return "\n".join(lines)


def format_summary(s: Dict[str, Any]) -> str:
    tasks = " ".join(f"{t}={v:.3f}" for t, v in s["tasks"].items())
    d = s["diagnostics"]
    unseen = s.get("unseen", math.nan)
    unseen = "n/a" if math.isnan(unseen) else f"{unseen:.3f}"          # n/a: no held-out combination asked for
    return (f"synthetic GenEval overall={s['overall']:.3f} ({tasks}) unseen={unseen} "
            f"integrity={s['integrity']:.3f} rules-only={s['overall_rules_only']:.3f}\n"
            "  what the images honour: " + " ".join(f"{k}={v:.3f}" for k, v in d.items())
            + "  (blank = no object; *_present = the prompt's shapes / colours appear at all)")


def _bar(total: int, label: str):
    """A tqdm bar on interactive terminals (nothing otherwise): call with the count done, None to close."""
    import sys

    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=label, disable=not sys.stdout.isatty(), leave=False, dynamic_ncols=True)

    def update(done):
        if done is None:
            bar.close()
        else:
            bar.update(done - bar.n)
    return update
