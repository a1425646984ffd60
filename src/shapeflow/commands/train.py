"""``shapeflow train CONFIG.yaml [key=value ...] [--resume] [--out DIR]``: the shared training engine.

Single process (CPU or one GPU) as is; several GPUs with
``torchrun --nproc_per_node=8 -m shapeflow train CONFIG.yaml ...`` (see :mod:`shapeflow.train.loop`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

log = logging.getLogger(__name__)

EXIT_NON_FINITE = 3  # training stopped on a NaN/inf loss; the last good checkpoint is kept


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from an experiment config",
        description="Train the task named in CONFIG.yaml. Overrides are dotted key=value pairs "
                    "(e.g. train.lr=3e-4 model.preset=tiny). train.batch_size is the global batch. "
                    "Put --out/--resume before CONFIG or after the overrides.",
        epilog="examples:\n"
               "  shapeflow train configs/toy.yaml train.steps=100 --out runs/toy\n"
               "  shapeflow train configs/toy.yaml --out runs/toy --resume\n"
               "  torchrun --nproc_per_node=8 -m shapeflow train configs/token_dit_base.yaml --out runs/dit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="experiment YAML file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/latest (starts from step 0 if there is none)")
    p.add_argument("--out", default=None, help="output directory (overrides out_dir in the config)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from shapeflow.train.experiment import load_config
    from shapeflow.train.loop import NonFiniteLossError, run

    cfg = load_config(args.config, args.overrides)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out_dir=args.out)
    try:
        run(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return EXIT_NON_FINITE
    return 0
