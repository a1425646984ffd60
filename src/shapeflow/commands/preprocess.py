"""``shapeflow preprocess INPUT OUT_DIR``: meshes -> watertight surfaces + training samples.

Thin wrapper over :func:`shapeflow.data.preprocess.preprocess_dataset`; prints one summary line.
"""

from __future__ import annotations

import argparse

from shapeflow.data import preprocess as pp

_DEFAULT = pp.PreprocessConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="meshes -> watertight surfaces, surface/SDF samples and 64^3 shell grids (resumable, sharded)",
        description=(
            "Read every mesh under INPUT (a folder, searched recursively, or a text file with one path per "
            "line), make it watertight and write OUT_DIR/<id>/{samples.safetensors,watertight.ply,meta.json} "
            "plus one record per input in OUT_DIR/manifest.jsonl. <id> is a content hash: re-running skips "
            "finished objects; a killed run leaves no partial files. Bad files get a 'failed' record."
        ),
        epilog=(
            "examples:\n"
            "  shapeflow preprocess data/synth data/prep --workers 2\n"
            "  shapeflow preprocess meshes.txt data/prep --shard $SLURM_ARRAY_TASK_ID/64 --resolution 512\n"
            "  shapeflow preprocess data/synth data/prep_sparse --sparse-res 256   # sparse SDF VAE data"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="folder of meshes or text file of paths")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1; 0 = in-process, no crash isolation)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="process inputs I, I+N, I+2N, ... of the sorted list (0-based; default 0/1)")
    p.add_argument("--resolution", type=int, default=_DEFAULT.resolution, metavar="R",
                   help=f"watertight grid cells per axis (default {_DEFAULT.resolution}; 512+ on servers)")
    p.add_argument("--eps-voxels", type=float, default=_DEFAULT.eps_voxels, metavar="E",
                   help=f"watertight offset in voxels (default {_DEFAULT.eps_voxels:g})")
    p.add_argument("--keep-closed", action="store_true",
                   help="use inputs that already are closed surfaces as they are (no offset remeshing; "
                        "clean closed data only, such as `shapeflow synth` output)")
    p.add_argument("--target-faces", type=int, default=None, metavar="F",
                   help="decimate watertight meshes to about F faces (default: keep)")
    p.add_argument("--surface-points", type=int, default=_DEFAULT.surface_points, metavar="N",
                   help=f"uniform surface samples (default {_DEFAULT.surface_points})")
    p.add_argument("--sharp-points", type=int, default=_DEFAULT.sharp_points, metavar="N",
                   help=f"sharp-edge samples (default {_DEFAULT.sharp_points})")
    p.add_argument("--sharp-angle", type=float, default=_DEFAULT.sharp_angle, metavar="DEG",
                   help=f"dihedral angle of sharp edges (default {_DEFAULT.sharp_angle:g})")
    p.add_argument("--sdf-points", type=int, default=_DEFAULT.sdf_points, metavar="N",
                   help=f"SDF query points (default {_DEFAULT.sdf_points})")
    p.add_argument("--sdf-fractions", type=float, nargs=3, default=list(_DEFAULT.sdf_fractions),
                   metavar=("U", "F", "C"), help="shares of uniform / near-fine / near-coarse queries "
                   f"(default {' '.join(f'{x:g}' for x in _DEFAULT.sdf_fractions)})")
    p.add_argument("--tsdf-res", type=int, default=None, metavar="R",
                   help="also store a dense truncated SDF on an (R+1)^3 node grid (default: off)")
    p.add_argument("--tsdf-trunc", type=float, default=None, metavar="T",
                   help="TSDF truncation in canonical units (default: 2 TSDF voxels)")
    p.add_argument("--sparse-res", type=int, default=None, metavar="R",
                   help="also store the sparse SDF band (the nodes with |sdf| <= sqrt(3) voxels and their exact "
                        "SDF) on the node grid with R cells: 256 by default for the sparse SDF VAE family; "
                        "512 / 1024 on servers (default: off)")
    p.add_argument("--render-views", type=int, default=0, metavar="N",
                   help="also render N random RGBA views per object (image-conditioning data; default 0)")
    p.add_argument("--render-size", type=int, default=_DEFAULT.render_size, metavar="PX",
                   help=f"render size in pixels (default {_DEFAULT.render_size})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, combined with each object's id")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="seconds per object before it is recorded as failed (default 900; 0 = none)")
    p.add_argument("--retry-failed", action="store_true", help="redo inputs that have a failed record")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="process at most K new objects")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = pp.PreprocessConfig(
        resolution=args.resolution,
        eps_voxels=args.eps_voxels,
        keep_closed=args.keep_closed,
        target_faces=args.target_faces,
        surface_points=args.surface_points,
        sharp_points=args.sharp_points,
        sharp_angle=args.sharp_angle,
        sdf_points=args.sdf_points,
        sdf_fractions=tuple(args.sdf_fractions),
        tsdf_res=args.tsdf_res,
        tsdf_trunc=args.tsdf_trunc,
        sparse_res=args.sparse_res,
        render_views=args.render_views,
        render_size=args.render_size,
        seed=args.seed,
    )
    summary = pp.preprocess_dataset(
        args.input,
        args.out_dir,
        config,
        workers=args.workers,
        shard=pp.parse_shard(args.shard),
        timeout=args.timeout if args.timeout and args.timeout > 0 else None,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        limit=args.limit,
    )
    print(f"shapeflow preprocess: {summary.line()} -> {args.out_dir}")
    return 0
