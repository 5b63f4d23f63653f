"""Command line: `vecinfer demo`, `vecinfer eval`, `vecinfer bench` (also `python -m vecinfer ...`)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vecinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: SmolLM2-135M with a 2-bit cache; size, quality, speed")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default 1 on the CPU)")
    sub.add_parser("eval", add_help=False, help="perplexity / passkey retrieval with a compressed KV cache "
                                                "(`vecinfer eval --help`)")
    sub.add_parser("bench", add_help=False, help="GPU attention benchmark against torch SDPA "
                                                 "(`vecinfer bench --help`)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        from .evaluate import eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(device=args.device, threads=args.threads)
    return 2


if __name__ == "__main__":
    sys.exit(main())
