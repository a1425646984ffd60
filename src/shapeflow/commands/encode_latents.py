"""``shapeflow encode-latents``: encode a preprocessed dataset once with a trained VAE (posterior means)."""

from __future__ import annotations

import argparse

from shapeflow.data.latents import encode_dataset
from shapeflow.data.preprocess import parse_shard


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode-latents",
        help="encode a preprocessed dataset with a trained VAE (for generator training)",
        description="Write OUT_DIR/<id>.npy (posterior mean; <id>.npz with latent coords + feats for a sparse "
                    "VAE), OUT_DIR/manifest.jsonl and OUT_DIR/latents.json. "
                    "Resumable (existing latents are skipped) and sharded like preprocess.",
        epilog="examples:\n  shapeflow encode-latents --vae runs/vae/final data/prep data/latents\n"
               "  shapeflow encode-latents --vae runs/vae data/prep data/latents64 --num-tokens 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="a `shapeflow preprocess` output folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="latent folder (created if missing)")
    p.add_argument("--vae", required=True, metavar="CKPT", help="VAE checkpoint (run dir, final/ or step dir)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="encode objects I, I+N, ... (default 0/1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-tokens", type=int, default=None, metavar="M",
                   help="VecSet tokens per shape (default: the VAE's num_tokens)")
    p.add_argument("--surface-points", type=int, default=None, metavar="N",
                   help="VecSet encoder input: uniform surface points (default: the VAE's surface_points)")
    p.add_argument("--sharp-points", type=int, default=None, metavar="N",
                   help="VecSet encoder input: sharp-edge points (default: the VAE's sharp_points)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    s = encode_dataset(args.vae, args.data_dir, args.out_dir, shard=parse_shard(args.shard),
                       batch_size=args.batch_size, num_tokens=args.num_tokens, surface_points=args.surface_points,
                       sharp_points=args.sharp_points, device=args.device, progress=not args.no_progress)
    print(f"encoded {s['encoded']}, skipped {s['skipped']}, failed {s['failed']} "
          f"(latent shape {tuple(s['latent_shape'])}) in {s['seconds']:.1f} s -> {args.out_dir}"
          + (f" (reasons in {args.out_dir}/manifest.jsonl)" if s["failed"] else ""))
    return 1 if s["failed"] else 0
