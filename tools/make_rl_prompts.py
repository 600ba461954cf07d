#!/usr/bin/env python
"""Writes the RL prompt set (prompt + rubrics per taxonomy item, JSONL) with an LLM or the shapes-world writer.

    python tools/make_rl_prompts.py --taxonomy data/rl/real_world_taxonomy.json --out runs/rl/prompts.jsonl \
        --backend api --base_url https://api.openai.com/v1 --model gpt-4.1 --cache_dir runs/rl/cache
    python tools/make_rl_prompts.py --taxonomy TAXONOMY --out OUT --backend shapes --seed 0

api: lens_jax/posttrain/prompt_writer.py over an OpenAI-compatible endpoint (key from $OPENAI_API_KEY, or
--api_key_env; unset = "EMPTY" for local servers); the endpoint is checked first. shapes: the offline writer
lens_jax.posttrain.shapes_prompts.write_shapes_prompts. Both resume: ids already in --out are kept. Prints a
one-line summary; errors (unreachable endpoint, bad taxonomy) are one line on stderr and exit code 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--taxonomy", required=True, help="taxonomy JSON (lens_jax/posttrain/taxonomy.py format)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    p.add_argument("--backend", choices=("api", "shapes"), default="api")
    p.add_argument("--base_url", default="https://api.openai.com/v1", help="OpenAI-compatible base URL (api)")
    p.add_argument("--model", default="gpt-4.1", help="model name (api)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--num_rubrics", type=int, default=10, help="rubrics per prompt (api)")
    p.add_argument("--min_words", type=int, default=30, help="shortest accepted prompt, in words (api)")
    p.add_argument("--max_words", type=int, default=60, help="longest accepted prompt, in words (api)")
    p.add_argument("--seed", type=int, default=0, help="dimension choice seed (item i uses seed + i)")
    p.add_argument("--limit", type=int, default=0, help="only the first N taxonomy items (0 = all)")
    p.add_argument("--cache_dir", default="", help="reply cache folder ('' = none) (api)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (api)")
    p.add_argument("--timeout_s", type=float, default=60.0, help="per-request timeout in seconds (api)")
    p.add_argument("--max_retries", type=int, default=5, help="retries of 429 / 5xx / timeouts (api)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (api; default: server's)")
    p.add_argument("--price_per_1m_input", type=float, default=0.0, help="USD per 1M prompt tokens (api)")
    p.add_argument("--price_per_1m_output", type=float, default=0.0, help="USD per 1M completion tokens (api)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--summary_json", default="", help="also write the full summary dict here")
    args = p.parse_args(argv)

    if args.backend == "shapes":
        try:
            from lens_jax.posttrain.shapes_prompts import write_shapes_prompts
            summary = write_shapes_prompts(args.taxonomy, args.out, seed=args.seed, limit=args.limit)
        except (ValueError, OSError, ImportError) as e:  # TaxonomyError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 2
        line = (f"shapes: written {summary.get('written', 0)}, skipped {summary.get('skipped', 0)}, "
                f"reused {summary.get('reused', 0)}; tokens 0; cost $0.0000 -> {args.out}")
    else:
        from lens_jax.posttrain.chat import ChatConfig, ChatService, JudgeUnavailableError
        from lens_jax.posttrain.prompt_writer import format_summary, write_prompts
        from lens_jax.posttrain.taxonomy import TaxonomyError, load_taxonomy

        try:
            taxonomy = load_taxonomy(args.taxonomy)
            config = ChatConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                                timeout_s=args.timeout_s, max_retries=args.max_retries,
                                concurrency=args.concurrency, temperature=args.temperature,
                                cache_dir=args.cache_dir, price_per_1m_input=args.price_per_1m_input,
                                price_per_1m_output=args.price_per_1m_output, progress=not args.no_progress)
            with ChatService(config) as chat:
                chat.check_reachable()
                summary = write_prompts(taxonomy, args.out, chat, num_rubrics=args.num_rubrics, seed=args.seed,
                                        limit=args.limit, word_range=(args.min_words, args.max_words))
        except (TaxonomyError, JudgeUnavailableError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        line = format_summary(summary)
    print(line, flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
