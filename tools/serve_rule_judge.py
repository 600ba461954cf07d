#!/usr/bin/env python
"""Serves the shapes-world rule judge as an OpenAI-compatible chat.completions endpoint (loopback only).

    python tools/serve_rule_judge.py --port 0        # first line: http://127.0.0.1:PORT/v1

Point a VLMJudge (lens_jax/posttrain/vlm_judge.py) at the printed URL with model "rule-judge". Each request
carries one image, prompt and rubric; the reply is "1" or "0" from lens_jax.posttrain.shapes_rubrics.judge_rubric
(an unparseable rubric is HTTP 400). Serves until SIGINT or SIGTERM. Non-loopback hosts need --allow_remote.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --allow_remote)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 = any free port (printed)")
    p.add_argument("--allow_remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = p.parse_args(argv)

    from lens_jax.posttrain.judge_server import make_server

    try:
        server = make_server(args.host, args.port, allow_remote=args.allow_remote, quiet=not args.verbose)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(server.url, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"served {server.counts}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
