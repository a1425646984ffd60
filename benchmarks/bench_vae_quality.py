"""Reconstruction quality of trained VAEs (issue 3 section 6, issue 4 section 6): tables and pictures.

For each checkpoint given (any mix of VecSet and grid VAEs), on the held-out split of a preprocessed
synthetic folder and on a folder of preprocessed real meshes: volume IoU, Chamfer-L1, F-score@1% and
normal consistency, the share of clean meshes (one watertight piece; definitions in
``shapeflow.metrics``), latent size, parameters, encode and decode
seconds. Writes a markdown table (stdout and ``--out/quality.md``), the rows as JSON, and a picture per
dataset with the ground-truth watertight mesh beside each model's reconstruction.

Example (the runs of BENCHMARKS.md)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_vae_quality.py \\
        --vae vecset=runs/vecset_tiny --vae grid=runs/grid_tiny \\
        --synth data/prep --real data/real --out docs/img --limit 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", action="append", required=True, metavar="NAME=CKPT",
                    help="a VAE checkpoint with a short name (repeat for several)")
    ap.add_argument("--synth", default=None, help="preprocessed synthetic folder (its val split is used)")
    ap.add_argument("--real", default=None, help="preprocessed real meshes (all objects are used)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--limit", type=int, default=None, help="objects per dataset")
    ap.add_argument("--resolution", type=int, default=128, help="decoding grid of VecSet VAEs")
    ap.add_argument("--points", type=int, default=50_000, help="surface samples per mesh for the metrics")
    ap.add_argument("--picture", type=int, default=6, help="objects shown per picture")
    ap.add_argument("--out", default=None, help="folder for quality.md, quality.json and pictures")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as the `shapeflow` command does (BENCHMARKS.md, VecSet third round)
    if args.threads:
        torch.set_num_threads(args.threads)

    from shapeflow.data.datasets import ObjectFolder
    from shapeflow.evaluate import reconstruct_object, summarize
    from shapeflow.models import load_vae

    models = {}  # VecSet VAEs encode the input counts they were trained with (config.surface_points / sharp_points)
    for spec in args.vae:
        name, _, path = spec.partition("=")
        models[name] = load_vae(path)
    datasets = []
    if args.synth:
        datasets.append(("synthetic held-out", ObjectFolder(args.synth, split="val", val_fraction=args.val_fraction)))
    if args.real:
        datasets.append(("shared meshes", ObjectFolder(args.real, split="all")))
    out = Path(args.out) if args.out else None
    report, md = {}, []
    for dname, folder in datasets:
        n = len(folder) if args.limit is None else min(args.limit, len(folder))
        rows, meshes = {m: [] for m in models}, {m: [] for m in models}
        for i in range(n):
            for mname, (vae, kind) in models.items():
                r = reconstruct_object(vae, kind, folder.object_dir(i), resolution=args.resolution,
                                       n_points=args.points)
                rows[mname].append({"name": Path(folder.records[i]["source"]).stem, **r["metrics"],
                                    "latent_numel": r["latent_numel"]})
                meshes[mname].append(r["mesh"])
        md.append(f"### {dname} ({n} objects)\n")
        md.append("| model | kind | latent floats (mean) | params (M) | IoU | Chamfer-L1 | F@1% | NC | clean | encode s | decode s |")
        md.append("|---|---|---|---|---|---|---|---|---|---|---|")
        report[dname] = {}
        for mname, (vae, kind) in models.items():
            s = summarize(rows[mname])
            params = sum(p.numel() for p in vae.parameters()) / 1e6
            report[dname][mname] = {"summary": s, "rows": rows[mname], "kind": kind, "params_m": params}
            numel = int(np.mean([r["latent_numel"] for r in rows[mname]]))  # sparse latents vary per object
            md.append(f"| {mname} | {kind} | {numel} | {params:.2f} | {s['iou']:.3f} | "
                      f"{s['chamfer_l1']:.4f} | {s['f_score@1%']:.3f} | {s['normal_consistency']:.3f} | "
                      f"{s['clean']:.2f} | {s['encode_s']:.3f} | {s['decode_s']:.2f} |")
        md.append("")
        md.append("Per object (IoU / F@1%): " + "; ".join(
            f"{r['name']}: " + ", ".join(f"{m} {rows[m][k]['iou']:.2f}/{rows[m][k]['f_score@1%']:.2f}" for m in models)
            for k, r in enumerate(rows[next(iter(models))])))
        md.append("")
        if out is not None:
            _picture(out / f"recon_{dname.split()[0]}.png", folder, range(min(args.picture, n)), meshes, list(models))
    text = "\n".join(md)
    print(text)
    if out is not None:
        from shapeflow import fileio

        fileio.write_text(out / "quality.md", text + "\n")
        fileio.write_text(out / "quality.json", json.dumps(report, indent=1, default=float) + "\n")


def _picture(path: Path, folder, indices, meshes: dict, names: list[str]) -> None:
    """Rows: objects; columns: ground truth, then each model's reconstruction."""
    from shapeflow.data import format as fmt
    from shapeflow.geometry.io import load_mesh
    from shapeflow.render import image_grid, render_mesh, save_png

    tiles, labels = [], []
    blank = np.full((192, 192, 4), 255, np.uint8)
    for i in indices:
        gt = load_mesh(folder.object_dir(i) / fmt.MESH_FILE)
        stem = Path(folder.records[i]["source"]).stem
        tiles.append(render_mesh(*gt, size=192, background=(255, 255, 255)))
        labels.append(f"{stem}: input")
        for m in names:
            mesh = meshes[m][i]
            tiles.append(blank if mesh is None else render_mesh(*mesh, size=192, background=(255, 255, 255)))
            labels.append(m)
    save_png(path, image_grid(tiles, ncols=1 + len(names), labels=labels))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - t0:.0f} s)")
