"""``shapeflow demo OUT``: the whole pipeline on the embedded synthetic data (see :mod:`shapeflow.demo`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the embedded synthetic set (synth -> ... -> generated meshes + report)",
        description="Synthesize, preprocess (plus real meshes when found), train a tiny VecSet VAE, encode "
                    "latents, train a tiny class-conditional DiT, generate shapes for every class, evaluate, "
                    "and write OUT/report.md. Resumes when re-run on the same OUT.",
        epilog="examples:\n  shapeflow demo runs/demo\n  shapeflow demo runs/quick --quick\n"
               "  shapeflow demo runs/demo2 --vae-steps 1100 --dit-steps 4000   # repeat a run's step counts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--quick", action="store_true", help="a reduced run (3 classes, seconds of training)")
    p.add_argument("--real-meshes", default=None, metavar="DIR",
                   help="folder of real meshes to preprocess too (default: $SHAPEFLOW_TEST_MESHES or "
                        "../shared/meshes when present)")
    p.add_argument("--pipeline", choices=["vecset", "sparse"], default=None,
                   help="vecset (default: VecSet VAE + token DiT, about 14 min on 2 cores) or sparse (a sparse DiT "
                        "trained here on the shipped sparse SDF VAE's latents; own budget 1500 s)")
    p.add_argument("--per-class", type=int, default=None, help="synthetic shapes per class")
    p.add_argument("--vae-steps", type=int, default=None, metavar="N",
                   help="VAE training steps (default: the recipe's, fewer if the time budget needs it)")
    p.add_argument("--dit-steps", type=int, default=None, metavar="N",
                   help="DiT training steps (default: the recipe's, fewer if the time budget needs it)")
    p.add_argument("--sparse-structure", choices=["vecset", "grid"], default=None,
                   help="sparse pipeline, stage 1: the shipped VecSet pair (default, measured better) or a structure "
                        "grid DiT trained here")
    p.add_argument("--structure-steps", type=int, default=None, metavar="N",
                   help="--sparse-structure grid: structure DiT training steps (default: fitted like the others)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time budget of the run the training is fitted to (default 740; sparse pipeline 1500)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="training precision (default auto: bf16 where the CPU has native bf16, else fp32)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shapeflow.demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if args.quick else DemoConfig()
    sparse = args.pipeline == "sparse"
    if sparse and args.vae_steps is not None:
        raise ValueError("--vae-steps: the sparse pipeline uses the shipped sparse VAE (not trained by the demo)")
    if args.sparse_structure is not None and not sparse:
        raise ValueError("--sparse-structure goes with --pipeline sparse")
    if args.structure_steps is not None and args.sparse_structure != "grid":
        raise ValueError("--structure-steps goes with --pipeline sparse --sparse-structure grid")
    changes = {k: v for k, v in (("per_class", args.per_class), ("vae_steps", args.vae_steps),
                                 ("dit_steps", args.dit_steps), ("workers", args.workers),
                                 ("structure_steps", args.structure_steps), ("pipeline", args.pipeline),
                                 ("sparse_structure", args.sparse_structure),
                                 ("sparse_budget_s" if sparse else "budget_s", args.budget),
                                 ("precision", args.precision)) if v is not None}
    for name in ("vae_steps", "dit_steps", "per_class", "structure_steps"):
        if changes.get(name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {changes[name]}")
    cfg = dataclasses.replace(cfg, **changes)
    real = args.real_meshes or os.environ.get("SHAPEFLOW_TEST_MESHES")
    if real is None and Path("../shared/meshes").is_dir():
        real = "../shared/meshes"
    if real is not None and not Path(real).is_dir():
        raise FileNotFoundError(f"{real}: no such folder of real meshes")
    report = run_demo(args.out, cfg, real_meshes=real, progress=not args.no_progress)
    gm = report["generation_metrics"]["all"]
    t = report["training"]
    print(f"demo done in {report['seconds']['total']:.0f} s -> {Path(args.out) / 'report.md'} "
          f"(generation: COV {gm['COV-CD']:.2f}, 1-NNA {gm['1-NNA-CD']:.2f}; "
          f"clean {gm.get('clean', float('nan')):.2f}; "
          f"VAE IoU {report['vae_metrics'].get('iou', float('nan')):.3f}; trained {t['repeat']})")
    return 0
