"""Inspect and benchmark the bucketed shard pipeline (lens_jax/data/shard_pipeline.py).

  python tools/inspect_data.py --config=experiments/pretrain.py:stage2 --config.data.path=DIR \
      --num_batches=12 --json [--data_parallel=1] [--warmup_steps=1]

Prints one line per global (micro-)batch -- step, base area, each example's bucket, aspect ratio and
token count, the padding fraction, records read and skipped-record counters -- then a throughput line:
images/s and image tokens/s per host CPU core (wall clock / cores, and per CPU-second used by this
process), measured after `--warmup_steps` steps (warm: threads started, buffers primed), and the
cumulative pipeline metrics. With --json every line is a JSON object.

The global micro-batch of base area a is `per_device_batch[a] * --data_parallel` images; this process
(`--process_index` of `--process_count`) reads its disjoint share and prints its local part.
"""
from __future__ import annotations

import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(_REPO, "experiments", "pretrain.py") + ":stage2",
                                "Experiment file[:variant].", lock_config=True)
flags.DEFINE_integer("num_batches", 8, "Global batches (micro-batches) to print.")
flags.DEFINE_bool("json", False, "Print JSON objects, one per line.")
flags.DEFINE_integer("data_parallel", 1, "Simulated data-parallel size (devices over data x fsdp).")
flags.DEFINE_integer("process_index", 0, "This process's index (simulated multi-host).")
flags.DEFINE_integer("process_count", 1, "Number of processes (simulated multi-host).")
flags.DEFINE_integer("warmup_steps", 1, "Steps left out of the throughput.")
FLAGS = flags.FLAGS


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe(mb, table) -> dict:
    s = mb["stats"]
    a = mb["area_index"]
    return {
        "step": mb["step"], "micro_batch": mb["micro_batch"], "area": mb["area"],
        "batch_size": len(mb["id"]), "token_slots": int(mb["img_mask"].shape[1]),
        "buckets": [table.label(a, int(b)).split(":")[1] for b in mb["bucket"]],
        "aspect": [round(float(x), 3) for x in mb["aspect"]],
        "tokens": [int(x) for x in mb["num_tokens"]],
        "distinct_aspects": len(set(int(b) for b in mb["bucket"])),
        "padding_fraction": round(s["padding_fraction"], 4),
        "records": s["records"], "skipped": s["skipped"],
        "caption_words": round(sum(len(c.split()) for c in mb["caption"]) / len(mb["caption"]), 1),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lens_jax.data.shard_pipeline import build_pipeline
    config = FLAGS.config
    if config.data.source != "shards":
        print(f"error: config.data.source={config.data.source!r}; the inspector reads shards", file=sys.stderr)
        sys.exit(2)
    if not config.data.path:
        print("error: set --config.data.path=/path/to/shards", file=sys.stderr)
        sys.exit(2)
    try:
        pipe = build_pipeline(config.data, data_parallel=FLAGS.data_parallel, seed=config.seed,
                              process_index=FLAGS.process_index, process_count=FLAGS.process_count)
    except (FileNotFoundError, ValueError) as e:    # bad path, no shards, bad bucket or batch settings
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = pipe.opts.table
    it = iter(pipe)
    header = {"shards": len(pipe.source.files), "bad_shards": [f for f, _ in pipe.source.bad_shards],
              "records": len(pipe.source), "areas": list(table.sides),
              "local_micro_batch": list(pipe.opts.local_sizes()),
              "area_probabilities": [round(p, 4) for p in pipe.probs], "threads_per_stream":
              pipe.opts.num_threads or min(16, os.cpu_count() or 1), "num_workers": pipe.opts.num_workers}
    print(json.dumps({"pipeline": header}) if FLAGS.json else f"pipeline: {header}", flush=True)

    printed = 0
    images = tokens = 0
    t0 = c0 = None
    t_start = time.perf_counter()
    while printed < FLAGS.num_batches:
        step = next(it)
        if it.step == FLAGS.warmup_steps:     # steps [0, warmup) excluded from the throughput
            t0, c0 = time.perf_counter(), time.process_time()
        elif t0 is not None:
            images += sum(len(mb["id"]) for mb in step)
            tokens += sum(mb["stats"]["tokens"] for mb in step)
        for mb in step:
            if printed >= FLAGS.num_batches:
                break
            d = describe(mb, table)
            if FLAGS.json:
                print(json.dumps(d), flush=True)
            else:
                print(f"step {d['step']} mb {d['micro_batch']} area {d['area']}² B={d['batch_size']} "
                      f"pad {d['padding_fraction']:.3f} aspects {d['distinct_aspects']} buckets {d['buckets']} "
                      f"skipped {d['skipped']}", flush=True)
            printed += 1
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    cpu = time.process_time() - c0 if c0 is not None else 0.0
    cores = cpu_cores()
    thr = {"cores": cores, "steps_timed": max(0, it.step - FLAGS.warmup_steps), "images": images,
           "image_tokens": tokens, "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3),
           "total_seconds": round(time.perf_counter() - t_start, 3), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if elapsed > 0 and images:
        # Wall-clock rate divided by the cores, and the rate per CPU-second this process actually used (the
        # per-core rate when other work shares the machine).
        thr.update(images_per_s=round(images / elapsed, 2),
                   images_per_s_per_core=round(images / elapsed / cores, 2),
                   image_tokens_per_s_per_core=round(tokens / elapsed / cores, 1),
                   images_per_cpu_s=round(images / cpu, 2) if cpu > 0 else None,
                   image_tokens_per_cpu_s=round(tokens / cpu, 1) if cpu > 0 else None)
    else:
        thr["note"] = "not enough steps after warm-up to time; raise --num_batches"
    out = {"throughput": thr, "metrics": it.metrics()}
    print(json.dumps(out) if FLAGS.json else f"throughput: {thr}\nmetrics: {out['metrics']}", flush=True)
    it.close()


if __name__ == "__main__":
    app.run(main)
