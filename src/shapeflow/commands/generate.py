"""``shapeflow generate``: sample shapes from a trained DiT, decode them with its VAE, write GLBs + a preview."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PIPELINE_NAMES = ("vecset", "sparse")  # = shapeflow.generate.PIPELINES (not imported here: the CLI loads lazily)
DEFAULT_PIPELINE = "vecset"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample shapes from a trained generator (DiT + VAE) to meshes and a preview picture",
        description="Writes OUT/sample_<k>.<fmt> per shape, OUT/preview.png and OUT/generate.json. The same "
                    "arguments and seed give the same files. Without --dit/--vae the shipped tiny "
                    "class-conditional checkpoints (trained on the synthetic set) of --pipeline are used. A "
                    "sparse DiT (--dit of kind sparse_dit) runs two stages: its structure grid DiT "
                    "(--structure) samples which latent voxels are active, the sparse DiT their latents, and "
                    "the sparse SDF VAE decodes them at 256^3 (tiny models).",
        epilog="examples:\n"
               "  shapeflow generate --class chair --num 4 --out out/chairs\n"
               "  shapeflow generate --pipeline sparse --class all --num 2 --out out/sparse\n"
               "  shapeflow generate --dit runs/dit/final --vae runs/vae/final --num 8 --steps 50 --cfg 3 "
               "--out out/gen\n"
               "  shapeflow generate --dit runs/sparse_dit/final --structure runs/structure/final "
               "--vae runs/sparse_vae/final --class mug --out out/mugs\n"
               "  shapeflow generate --dit DIT --vae VAE --image photo.png --image-encoder facebook/dinov2-large "
               "--out out/img\n"
               "  shapeflow generate --image photo.png --dit hunyuan3d-dit-v2-1 --vae hunyuan3d-vae-v2-1 --out out/hy\n"
               "\nA released Hunyuan3D DiT folder brings its own DINOv2 and image recipe; its defaults are the\n"
               "reference pipeline's: Euler, 49 steps (its 50 calls end with a zero-length step), guidance 5,\n"
               "marching cubes at 384.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pipeline", default=None, choices=sorted(PIPELINE_NAMES),
                   help="which shipped tiny generator fills in what --dit/--structure/--vae leave out (default: "
                        f"{DEFAULT_PIPELINE}, or sparse for a --dit of kind sparse_dit)")
    p.add_argument("--dit", default=None, metavar="CKPT", help="DiT checkpoint (default: shipped tiny)")
    p.add_argument("--structure", default=None, metavar="CKPT[,VAE]",
                   help="stage 1 of a sparse DiT (required with your own sparse --dit): a structure grid DiT, or a "
                        "token DiT and its VecSet VAE as DIT,VAE")
    p.add_argument("--vae", default=None, metavar="CKPT", help="VAE checkpoint (default: shipped tiny)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="class name for class-conditional DiTs ('all': NUM per class)")
    g.add_argument("--image", default=None, metavar="IMG", help="conditioning image (RGBA PNG preferred)")
    p.add_argument("--image-encoder", default=None, metavar="NAME_OR_DIR",
                   help="DINOv2 hub name or local directory for --image (default: a release's own encoder, else "
                        "facebook/dinov2-large)")
    p.add_argument("--num", type=int, default=4, metavar="N", help="shapes to generate (per class with 'all')")
    p.add_argument("--steps", type=int, default=None, metavar="S",
                   help="ODE steps (default 25; a Hunyuan3D release: 49)")
    p.add_argument("--method", default=None, choices=["euler", "heun", "midpoint"],
                   help="ODE sampler (default heun: two evaluations per step; a Hunyuan3D release: euler)")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift (> 1: more steps near noise)")
    p.add_argument("--cfg", type=float, default=None, metavar="W",
                   help="guidance scale (default 1 = none; a Hunyuan3D release: 5)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (t = 0 noise, 1 data)")
    p.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    p.add_argument("--structure-pieces", default="largest", choices=["largest", "all"],
                   help="sparse DiTs: keep the largest 26-connected piece of each sampled structure (default) or "
                        "all of it")
    p.add_argument("--resolution", type=int, default=None, metavar="R",
                   help="marching-cubes grid (VecSet; default 128, a Hunyuan3D release: 384)")
    p.add_argument("--num-tokens", type=int, default=None, metavar="M",
                   help="latent tokens per shape (token DiTs; default: the DiT's trained count, model.num_tokens)")
    p.add_argument("--smooth", type=float, default=0.0, metavar="SIGMA",
                   help="Gaussian filter of the decoded field before meshing, standard deviation in world units "
                        "(default 0: the raw field)")
    p.add_argument("--format", default="glb", choices=["glb", "obj", "ply"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shapeflow import fileio
    from shapeflow.generate import (PIPELINES, check_token_pair, generate, image_tokens, load_structure, preview_grid,
                                    sampler_defaults)
    from shapeflow.geometry.io import save_mesh
    from shapeflow.models import TOKEN_DIT_KINDS, load_dit, load_vae
    from shapeflow.models.pretrained.hunyuan_dit import is_release
    from shapeflow.render import save_png

    if args.num < 1:
        raise ValueError("--num must be >= 1")
    if args.num_tokens is not None and args.num_tokens < 1:
        raise ValueError(f"--num-tokens must be >= 1, got {args.num_tokens}")
    if args.smooth < 0:
        raise ValueError(f"--smooth must be >= 0 (a length in world units), got {args.smooth}")
    pipeline = args.pipeline or DEFAULT_PIPELINE
    dit_path = Path(args.dit) if args.dit else PIPELINES[pipeline]["dit"]
    dit, dit_kind = load_dit(dit_path, ema=False)
    if args.dit and args.pipeline is None and dit_kind == "sparse_dit":
        pipeline = "sparse"
    released = is_release(dit_path)
    if released and not args.vae:
        raise ValueError(f"{dit_path}: a Hunyuan3D DiT release needs its VAE: pass --vae <hunyuan3d-vae folder>")
    defaults = sampler_defaults(dit_path)
    for arg, key in (("steps", "steps"), ("method", "method"), ("cfg", "cfg_scale"), ("resolution", "resolution")):
        if getattr(args, arg) is None:
            setattr(args, arg, defaults[key])
    vae_path = Path(args.vae) if args.vae else PIPELINES[pipeline]["vae"]
    vae, vae_kind = load_vae(vae_path)
    num_tokens = args.num_tokens
    if dit_kind in TOKEN_DIT_KINDS and vae_kind == "vecset_vae":
        check_token_pair(dit, dit_path, vae, vae_path)
        if released and num_tokens is None:
            num_tokens = vae.config.num_tokens  # the reference samples the VAE's latent shape
    structure, structure_path = None, None
    if dit_kind == "sparse_dit":
        if args.structure is None and args.dit:
            raise ValueError(f"{dit_path}: a sparse DiT needs a stage-1 structure model: pass --structure CKPT (a "
                             "grid_dit trained on the latent folder's structure/) or --structure DIT,VAE (a token "
                             "DiT and its VecSet VAE)")
        structure_path = args.structure or ",".join(str(p) for p in PIPELINES["sparse"]["structure"])
        structure = load_structure(structure_path)
    elif args.structure:
        raise ValueError(f"{dit_path}: --structure goes with a sparse DiT, this is a {dit_kind}")

    cond, labels = None, [""] * args.num
    if dit.config.cond == "class":
        names = list(dit.config.classes)
        if args.class_name is None:
            raise ValueError(f"{dit_path}: class-conditional DiT; pass --class NAME or --class all "
                             f"(classes: {', '.join(names)})")
        if args.class_name == "all":
            picked = [n for n in names for _ in range(args.num)]
        elif args.class_name in names:
            picked = [args.class_name] * args.num
        else:
            raise ValueError(f"unknown class {args.class_name!r} (classes: {', '.join(names)})")
        cond = torch.tensor([names.index(n) for n in picked], dtype=torch.long)
        labels = picked
    elif dit.config.cond == "image":
        if args.image is None:
            raise ValueError(f"{dit_path}: image-conditional DiT; pass --image IMG")
        cond = image_tokens(args.image, release=dit_path if released and args.image_encoder is None else None,
                            encoder=args.image_encoder, num=len(labels), device=args.device)
    elif args.class_name or args.image:
        raise ValueError(f"{dit_path}: unconditional DiT; --class / --image do not apply")

    result = generate(dit, vae, dit_kind=dit_kind, vae_kind=vae_kind, num=len(labels), cond=cond,
                      labels=labels, steps=args.steps, method=args.method, shift=args.shift, cfg_scale=args.cfg,
                      cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None, seed=args.seed,
                      resolution=args.resolution, smooth=args.smooth, num_tokens=num_tokens,
                      device=args.device, progress=True, structure=structure,
                      structure_pieces=args.structure_pieces)
    out = Path(args.out)
    files = []
    for k, mesh in enumerate(result.meshes):
        if mesh is None:
            files.append(None)
            continue
        name = f"sample_{k:03d}.{args.format}"
        save_mesh(out / name, *mesh)
        files.append(name)
    save_png(out / "preview.png", preview_grid(result.meshes, [f"{k}:{label}" if label else str(k)
                                                               for k, label in enumerate(result.labels)]))
    fileio.write_json(out / "generate.json", {
        "dit": str(dit_path), "vae": str(vae_path), "labels": result.labels, "files": files,
        "structure": str(structure_path) if structure_path else None,
        "structure_pieces": args.structure_pieces if structure is not None else None,
        "steps": args.steps, "method": args.method, "shift": args.shift, "cfg": args.cfg,
        "cfg_interval": args.cfg_interval, "seed": args.seed, "resolution": args.resolution,
        "smooth": args.smooth, "num_tokens": num_tokens,
        "nfe": result.nfe, "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "empty": {str(k): reason for k, reason in result.empty.items()},
    })
    for k, reason in result.empty.items():
        print(f"sample {k}: no surface decoded ({reason})", file=sys.stderr)
    n_ok = sum(f is not None for f in files)
    stages = "".join(f"{name} {result.seconds[key]:.1f} s, " for key, name in
                     (("structure", "structure"), ("sample", "sampling")) if key in result.seconds)
    print(f"generated {n_ok}/{len(files)} shapes ({result.nfe} evaluations each) -> {out} "
          f"({stages}decoding {result.seconds.get('decode', 0):.1f} s)")
    return 0 if n_ok == len(files) else 1
