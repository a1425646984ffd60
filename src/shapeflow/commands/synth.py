"""``shapeflow synth OUT_DIR --per-class N --seed S``: write the embedded procedural dataset.

Thin wrapper over :func:`shapeflow.geometry.synth.generate_dataset`.
"""

from __future__ import annotations

import argparse

from shapeflow.geometry import synth


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the procedural shape dataset (analytic SDFs, class labels)",
        description=(
            "Write OUT_DIR/<category>/<category>_<k:04d>.obj (closed mesh, canonical frame) and .json "
            "(parameters), plus OUT_DIR/synth.json. Same arguments give byte-identical files; objects "
            f"already present are skipped. Categories: {', '.join(synth.CATEGORIES)}."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--per-class", type=int, required=True, metavar="N", help="shapes per category")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--resolution", type=int, default=synth.DEFAULT_RESOLUTION, metavar="R",
                   help=f"marching-cubes cells per axis (default {synth.DEFAULT_RESOLUTION})")
    p.add_argument("--decimate", type=float, default=synth.DEFAULT_DECIMATE, metavar="F",
                   help=f"fraction of marching-cubes faces removed by decimation, 0 keeps all "
                        f"(default {synth.DEFAULT_DECIMATE})")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="subset of categories (default: all)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    synth.generate_dataset(
        args.out_dir,
        args.per_class,
        args.seed,
        resolution=args.resolution,
        decimate=args.decimate,
        classes=args.classes,
        workers=args.workers,
        progress=not args.no_progress,
    )
    return 0
