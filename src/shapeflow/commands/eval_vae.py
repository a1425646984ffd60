"""``shapeflow eval-vae``: reconstruction metrics of a VAE over a preprocessed folder, as a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-vae",
        help="table of volume IoU, Chamfer, F-score@1%% and normal consistency of a VAE over a dataset",
        description="Encodes and decodes every object of the split (see shapeflow.evaluate for the metric "
                    "definitions) and prints a markdown table; --out also writes it with a JSON of the rows.",
        epilog="example:\n  shapeflow eval-vae --ckpt runs/vae/final data/prep --split val --resolution 128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="a `shapeflow preprocess` output folder")
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="VAE checkpoint (VecSet or grid)")
    p.add_argument("--split", choices=["train", "val", "all"], default="val")
    p.add_argument("--val-fraction", type=float, default=0.1, help="must match training (default 0.1)")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="first K objects only")
    p.add_argument("--resolution", type=int, default=128, metavar="R", help="decoding grid (VecSet)")
    p.add_argument("--decoder", choices=["dense", "hierarchical"], default="hierarchical")
    p.add_argument("--points", type=int, default=100_000, metavar="N", help="surface samples per mesh")
    p.add_argument("--num-tokens", type=int, default=None, metavar="M",
                   help="VecSet tokens per shape (default: the VAE's num_tokens; may differ from training)")
    p.add_argument("--surface-points", type=int, default=None, metavar="N",
                   help="VecSet encoder input: uniform surface points (default: the VAE's surface_points)")
    p.add_argument("--sharp-points", type=int, default=None, metavar="N",
                   help="VecSet encoder input: sharp-edge points (default: the VAE's sharp_points)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/eval.md and DIR/eval.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shapeflow import fileio
    from shapeflow.evaluate import eval_vae, format_table

    rows, summary = eval_vae(args.ckpt, args.data_dir, split=args.split, val_fraction=args.val_fraction,
                             limit=args.limit, resolution=args.resolution, strategy=args.decoder,
                             n_points=args.points, device=args.device, num_tokens=args.num_tokens,
                             surface_points=args.surface_points, sharp_points=args.sharp_points)
    table = format_table(rows, summary)
    print(table, end="")
    if summary["empty"]:
        print(f"{summary['empty']} of {summary['objects']} objects decoded no surface (scored as the worst)",
              file=sys.stderr)
    if args.out:
        out = Path(args.out)
        fileio.write_text(out / "eval.md", table)
        fileio.write_text(out / "eval.json", json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0
