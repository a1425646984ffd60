"""The ``shapeflow`` command line.

Examples (CPU, tiny models; the same commands run on GPUs)::

    shapeflow synth data/synth --per-class 8 --seed 0
    shapeflow preprocess data/synth data/prep --workers 2
    shapeflow preprocess meshes.txt data/prep --shard 3/16          # one task of a 16-way job array
    shapeflow app                                                   # the web app at http://127.0.0.1:7860

Each subcommand lives in :mod:`shapeflow.commands` and is a thin wrapper over library functions.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shapeflow.commands import app, demo, encode_latents, eval_vae, generate, preprocess, reconstruct, synth, train

COMMANDS = [demo, synth, preprocess, train, reconstruct, eval_vae, encode_latents, generate, app]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapeflow",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Flush float32 denormals to zero, before torch starts its CPU thread pool (the workers inherit the
    # setting from this thread). Softmax over far-apart logits (the position-biased VecSet decoder)
    # otherwise produces denormals, which cost the CPU many times a normal multiply.
    import torch

    torch.set_flush_denormal(True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # user errors: one line, no traceback
        print(f"shapeflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
