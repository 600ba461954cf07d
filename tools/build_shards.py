#!/usr/bin/env python
"""Build lens_jax ArrayRecord shards of image-caption records (library: lens_jax/data/shard_writer.py).

Exactly one input:
  --images=DIR [--captions=FILE.jsonl]  a folder of images + JSONL lines {"file", "caption"[, "brief", "meta"]}
                                        (default captions file: DIR/captions.jsonl)
  --tar=GLOB                            WebDataset-style tars (KEY.jpg + KEY.txt and/or KEY.json); repeatable
  --parquet=GLOB                        Parquet files (--image_column, --caption_column, ...); repeatable
  --shapes_world=N                      N synthetic shapes-world examples (--image_size, --shapes_seed,
                                        --shapes_world_options)

Examples:
  python tools/build_shards.py --images=/data/raw --out=/data/shards --num_workers=16
  python tools/build_shards.py --tar='/data/wds/*.tar' --out=/data/shards
  python tools/build_shards.py --shapes_world=2000 --image_size=64 --out=/tmp/shapes_shards

Unreadable images, images under --min_area pixels (default 384*384; 0 for the shapes world), empty captions,
missing image files and malformed caption entries are skipped and counted. Rerunning the same command
resumes an interrupted build (finished shards are kept). Exit status 2 on bad arguments or inputs.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lens_jax.data import shard_writer as sw  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--images", help="folder of images (ids are paths relative to it)")
    src.add_argument("--captions", help="JSONL captions file for --images (default: IMAGES/captions.jsonl)")
    src.add_argument("--tar", action="append", help="glob of WebDataset-style tar files (repeatable)")
    src.add_argument("--parquet", action="append", help="glob of Parquet files (repeatable)")
    src.add_argument("--shapes_world", type=int, help="number of shapes-world examples to write")
    pq = p.add_argument_group("parquet columns")
    pq.add_argument("--image_column", default="image", help="image bytes (or {bytes, path} struct) column")
    pq.add_argument("--caption_column", default="caption", help="dense caption column")
    pq.add_argument("--brief_column", default="brief", help="brief caption column (used if present)")
    pq.add_argument("--id_column", default="", help="stable id column (default: FILE:ROW)")
    pq.add_argument("--meta_column", default="", help="optional metadata column (stored as JSON text)")
    sh = p.add_argument_group("shapes world")
    sh.add_argument("--image_size", type=int, default=64, help="shapes-world image side in pixels")
    sh.add_argument("--shapes_seed", type=int, default=0, help="shapes-world seed")
    sh.add_argument("--shapes_world_options", default="",
                    help="JSON object of shapes-world options (keys: lens_jax.data.synthetic.WORLD_FIELDS), e.g. "
                         "'{\"layout\": \"canonical\", \"relation_prob\": 0.5}'; the tiny experiment's whole "
                         "world (with --image_size=80) is in the docstring of experiments/pretrain.py")
    p.add_argument("--out", required=True, help="output directory (shards, stats, build.json, manifest.json)")
    p.add_argument("--min_area", type=int, default=None,
                   help=f"drop images with width*height below this (default {sw.DEFAULT_MIN_AREA} = 384^2; "
                        "0 for --shapes_world)")
    p.add_argument("--records_per_shard", type=int, default=sw.DEFAULT_RECORDS_PER_SHARD,
                   help="input items per shard (fixed split, so shard k always gets the same inputs)")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--max_shards", type=int, default=None,
                   help="build at most this many missing shards, then stop (rerun to continue)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing build in --out first")
    p.add_argument("--writer_options", default=sw.DEFAULT_WRITER_OPTIONS, help="ArrayRecordWriter options")
    return p.parse_args(argv)


def make_source(args) -> sw.InputSource:
    given = [n for n in ("images", "tar", "parquet", "shapes_world") if getattr(args, n) is not None]
    if len(given) != 1:
        raise sw.ShardBuildError("give exactly one input: --images, --tar, --parquet or --shapes_world"
                                 + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    if args.captions is not None and args.images is None:
        raise sw.ShardBuildError("--captions goes with --images")
    if args.images is not None:
        return sw.FolderInput(args.images, args.captions)
    if args.tar is not None:
        return sw.TarInput(args.tar)
    if args.parquet is not None:
        return sw.ParquetInput(args.parquet, image_column=args.image_column, caption_column=args.caption_column,
                               brief_column=args.brief_column, id_column=args.id_column,
                               meta_column=args.meta_column)
    try:
        world = json.loads(args.shapes_world_options) if args.shapes_world_options else None
    except json.JSONDecodeError as e:
        raise sw.ShardBuildError(f"--shapes_world_options is not valid JSON: {e}") from e
    return sw.ShapesWorldInput(args.shapes_world, image_size=args.image_size, seed=args.shapes_seed, world=world)


def main(argv=None):
    args = parse_args(argv)
    try:
        source = make_source(args)
        min_area = args.min_area
        if min_area is None:
            min_area = 0 if isinstance(source, sw.ShapesWorldInput) else sw.DEFAULT_MIN_AREA
        summary = sw.build_shards(source, args.out, records_per_shard=args.records_per_shard, min_area=min_area,
                                  num_workers=args.num_workers, max_shards=args.max_shards,
                                  overwrite=args.overwrite, writer_options=args.writer_options)
    except sw.ShardBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["complete"] or args.max_shards is not None else 1


if __name__ == "__main__":
    sys.exit(main())
