"""Command line: `vecinfer demo` (and `python -m vecinfer demo`)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vecinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress real K/V of SmolLM2-135M and report size and error")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when usable)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(device=args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
