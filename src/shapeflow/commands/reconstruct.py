"""``shapeflow reconstruct``: mesh files -> preprocess -> encode -> decode -> mesh, with metrics against the input."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="reconstruct meshes through a trained VAE (VecSet, grid or sparse SDF) and print the metrics",
        description="Each MESH is preprocessed (watertight + samples, cached in OUT/prep), encoded and decoded; "
                    "OUT/<name>.<fmt> is the reconstruction in the input's own frame and units. Metrics are "
                    "computed in the canonical frame against the watertight input (see shapeflow.evaluate). "
                    "Without --ckpt the shipped tiny checkpoint of --model is used.",
        epilog="examples:\n  shapeflow reconstruct chair.obj cup.glb --model sparse --out out/recon\n"
               "  shapeflow reconstruct chair.obj --ckpt runs/vae/final --out out/recon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("meshes", nargs="+", metavar="MESH")
    p.add_argument("--ckpt", default=None, metavar="CKPT",
                   help="VAE checkpoint (VecSet, grid or sparse); default: the shipped tiny VAE of --model "
                        "(vecset for auto)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", choices=["auto", "vecset", "grid", "sparse"], default="auto",
                   help="expected VAE family (default: from the checkpoint)")
    p.add_argument("--resolution", type=int, default=256, metavar="R",
                   help="decoding grid (VecSet) or the SDF band's grid (sparse); default 256")
    p.add_argument("--decoder", choices=["dense", "hierarchical"], default="hierarchical")
    p.add_argument("--prep-resolution", type=int, default=256, metavar="R", help="watertight grid of the input")
    p.add_argument("--points", type=int, default=100_000, metavar="N", help="surface samples per mesh for metrics")
    p.add_argument("--num-tokens", type=int, default=None, metavar="M",
                   help="VecSet tokens per shape (default: the VAE's num_tokens; more than trained with can "
                        "add detail)")
    p.add_argument("--format", default="glb", choices=["glb", "obj", "ply"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shapeflow import fileio
    from shapeflow.data.latents import vae_encoder_overrides
    from shapeflow.data.preprocess import PreprocessConfig, process_object
    from shapeflow.evaluate import reconstruct_object
    from shapeflow.generate import SHIPPED_VAES
    from shapeflow.geometry.frame import Transform
    from shapeflow.geometry.io import save_mesh
    from shapeflow.models import load_vae, model_kind

    ckpt = args.ckpt
    if ckpt is None:
        if args.model == "grid":
            raise ValueError("no grid VAE is shipped: pass --ckpt")
        ckpt = SHIPPED_VAES["sparse" if args.model == "sparse" else "vecset"]
    kind = model_kind(ckpt)
    if args.model != "auto" and kind != f"{args.model}_vae":
        raise ValueError(f"{ckpt}: is a {kind} checkpoint, not {args.model}")
    vae, kind = load_vae(ckpt, **vae_encoder_overrides(kind, ckpt, num_tokens=args.num_tokens))
    vae.to(args.device)
    extra = {}
    if kind == "grid_vae" and vae.config.input == "sdf":
        extra = dict(tsdf_res=vae.config.resolution, tsdf_trunc=vae.config.sdf_truncation)
    if kind == "sparse_vae":
        if args.resolution % vae.config.factor:
            raise ValueError(f"--resolution {args.resolution}: the sparse VAE needs a multiple of "
                             f"{vae.config.factor}")
        extra = dict(sparse_res=args.resolution)
    prep_cfg = PreprocessConfig(resolution=args.prep_resolution, surface_points=20_000,
                                sharp_points=0 if kind == "sparse_vae" else 8_192, sdf_points=100_000, **extra)
    out = Path(args.out)
    results, failed = {}, 0
    for mesh_path in args.meshes:
        name = Path(mesh_path).stem
        t0 = time.perf_counter()
        rec = process_object(mesh_path, out / "prep", prep_cfg)
        prep_s = time.perf_counter() - t0
        if rec["status"] != "ok":
            print(f"{mesh_path}: failed: {rec['error']}")
            failed += 1
            continue
        r = reconstruct_object(vae, kind, out / "prep" / rec["id"], resolution=args.resolution,
                               strategy=args.decoder, n_points=args.points)
        m = r["metrics"]
        results[name] = {"source": str(mesh_path), "id": rec["id"], "preprocess_s": prep_s, **m}
        if r["mesh"] is None:
            print(f"{mesh_path}: no surface decoded ({r['empty']})")
            failed += 1
            continue
        t = Transform(center=tuple(rec["transform"]["center"]), scale=rec["transform"]["scale"])
        v, f = r["mesh"]
        save_mesh(out / f"{name}.{args.format}", t.to_source(v), f)
        pieces = "one closed piece" if m["clean"] else f"not clean ({m['components']} components)"
        print(f"{name}: IoU {m['iou']:.4f}  Chamfer-L1 {m['chamfer_l1']:.5f}  F@1% {m['f_score@1%']:.4f}  "
              f"NC {m['normal_consistency']:.4f}  {pieces}  "
              f"(preprocess {prep_s:.2f} s, encode {m['encode_s']:.2f} s, decode {m['decode_s']:.2f} s) "
              f"-> {out / f'{name}.{args.format}'}")
    fileio.write_text(out / "metrics.json", json.dumps(results, indent=2, default=float) + "\n")
    return 1 if failed else 0
