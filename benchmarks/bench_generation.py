"""Generation quality and speed of trained generators (issue 5 sections 5 and 8).

* ``quality``: for a class-conditional DiT + its VAE, ``--per-class`` shapes per class against the same
  number of **fresh** synthetic shapes per class (``shapeflow synth`` with a seed never trained on, put in
  the canonical frame like every training shape: :func:`shapeflow.evaluate.reference_shapes`):
  COV, MMD and 1-NNA over Chamfer distances of 2048-point clouds (PointFlow protocol; 1-NNA ideal 50%),
  per class and overall. Several generators (token path, grid path) can be given side by side.
* ``sampler``: quality against the number of model evaluations: Euler / Heun / midpoint at several step
  counts vs a many-step reference from the same noise; Chamfer-L1 and F-score@1% of the decoded shapes
  against the reference's decoded shapes.
* ``ceiling``: the same COV / MMD / 1-NNA for the VAE's *reconstructions* of fresh shapes (a
  preprocessed folder ``--data`` of ``shapeflow synth`` shapes from a third seed) against the fresh
  references: what a generator decoding through this VAE would score if it sampled the latent
  distribution perfectly.
* ``floor``: the same 1-NNA between independent draws of the synthetic data itself (``--draws`` sets of
  ``--per-class`` shapes per class, seeds 100, 101, ...), split into disjoint sets of each ``--sizes``
  per class and compared pairwise: what a *perfect* generator scores at that set size. Mean, spread and
  the share of set pairs above the 65 % target, per class and (with ``--pooled``) over all classes.
* ``speed``: one shape sampled with 25 Euler steps (``--steps``, ``--method``) and decoded at 128^3 (wall
  seconds, median of runs; a sparse pipeline: both stages, decoded at its band resolution, per stage too).

Example::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_generation.py quality \\
        --gen token=runs/token_dit,runs/vecset_tiny --gen grid=runs/grid_dit,runs/grid_tiny --per-class 16
    .venv/bin/python benchmarks/bench_generation.py sampler --gen token=runs/token_dit,runs/vecset_tiny
    .venv/bin/python benchmarks/bench_generation.py speed --gen token=runs/token_dit,runs/vecset_tiny
    shapeflow synth fresh3 --per-class 16 --seed 3 && shapeflow preprocess fresh3 prep3 --resolution 128
    .venv/bin/python benchmarks/bench_generation.py ceiling --gen token=runs/token_dit,runs/vecset_tiny \
        --data prep3 --per-class 16 --resolution 64
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_generation.py floor --per-class 64 --draws 4
    # deciding the 1-NNA target: 64 per class; per class only (~5 min on 1 thread instead of ~25)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generation.py quality --gen token=DIT,VAE \
        --per-class 64 --resolution 64 --cfg 1.0 --no-pooled --workers 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _load(spec: str, *, dit_tokens: bool = False):
    """``NAME=DIT,VAE[,STRUCTURE[,STRUCTURE_VAE]]`` -> (name, generator pair, class names of a class-conditional
    DiT); a sparse DiT takes its stage-1 model third: a structure grid DiT, or a token DiT and its VecSet VAE
    (``sparse`` alone: the shipped tiny sparse pipeline).

    ``dit_tokens``: a VecSet VAE paired with a token DiT encodes the DiT's token count (``num_tokens``)
    instead of its own (a load override of the VAE config).
    """
    from shapeflow.models import load_dit, load_vae

    from shapeflow.generate import PIPELINES, load_structure

    name, _, paths = spec.partition("=")
    if paths:
        dit_path, vae_path, *rest = paths.split(",")
    else:
        p = PIPELINES[name]
        dit_path, vae_path, rest = p["dit"], p["vae"], list(p.get("structure", ()))
    dit, dit_kind = load_dit(dit_path)
    structure = load_structure(rest) if rest else None
    overrides = dict(num_tokens=dit.config.num_tokens) if dit_tokens and dit_kind == "token_dit" else {}
    vae, vae_kind = load_vae(vae_path, **overrides)
    pair = dict(dit=dit, vae=vae, dit_kind=dit_kind, vae_kind=vae_kind)
    if structure is not None:
        pair["structure"] = structure
    return name, pair, list(dit.config.classes)


def _res(pair: dict, resolution: int) -> str:
    """The decoding grid of a generator pair: VecSet VAEs use ``resolution``, grid VAEs their own grid."""
    if pair["vae_kind"] == "vecset_vae":
        return f"{resolution}^3"
    if pair["vae_kind"] == "sparse_vae":
        return f"{pair['dit'].config.resolution * pair['vae'].config.factor}^3 (the sparse band of the latent grid)"
    return f"{pair['vae'].config.resolution}^3 (the grid VAE's own grid)"


def _table(table: dict) -> list[str]:
    """Markdown rows of a generation_eval table, plus the mean and the worst of the per-class rows."""
    lines = ["| class | COV | MMD-CD (x1e3) | 1-NNA | clean | extra pieces |", "|---|---|---|---|---|---|"]
    for c, m in table.items():
        lines.append(f"| {c} | {100 * m['COV-CD']:.1f}% | {1e3 * m['MMD-CD']:.2f} | {100 * m['1-NNA-CD']:.1f}% | "
                     f"{100 * m['clean']:.0f}% | {m['extra_components']:.2f} |")
    per_class = [m for c, m in table.items() if c != "all"]
    nna = [100 * m["1-NNA-CD"] for m in per_class]
    lines.append(f"| *mean of classes* | {100 * np.mean([m['COV-CD'] for m in per_class]):.1f}% | "
                 f"{1e3 * np.mean([m['MMD-CD'] for m in per_class]):.2f} | {np.mean(nna):.1f}% (worst {max(nna):.1f}%) | "
                 f"{100 * np.mean([m['clean'] for m in per_class]):.0f}% | "
                 f"{np.nanmean([m['extra_components'] for m in per_class]):.2f} |")
    return lines + [""]


def quality(args) -> str:
    from shapeflow.evaluate import generation_eval, reference_shapes
    from shapeflow.generate import generate

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.gen:
            name, pair, classes = _load(spec)
            refs = reference_shapes(Path(tmp) / "ref", classes, args.per_class, args.ref_seed)
            gens, t0 = {}, time.perf_counter()
            for i, c in enumerate(classes):
                cond = torch.full((args.per_class,), i, dtype=torch.long)
                res = generate(**pair, num=args.per_class, cond=cond, steps=args.steps, method=args.method,
                               shift=args.shift, cfg_scale=args.cfg, seed=args.gen_seed + 1000 * (i + 1),
                               resolution=args.resolution, smooth=args.smooth)
                gens[c] = res.meshes
            seconds = time.perf_counter() - t0
            table = generation_eval(gens, refs, n_points=2048, pooled=not args.no_pooled, workers=args.workers)
            empty = sum(m is None for v in gens.values() for m in v)
            lines.append(f"### {name} ({pair['dit_kind']} + {pair['vae_kind']}): {args.per_class} per class, "
                         f"{args.steps} {args.method} steps (shift {args.shift}), guidance {args.cfg}, "
                         f"generation seed {args.gen_seed}, decoded at {_res(pair, args.resolution)}, "
                         f"smooth {args.smooth}; "
                         f"{empty} empty; {seconds:.0f} s\n")
            lines += _table(table)
            if args.json:
                Path(args.json).with_suffix(f".{name}.json").write_text(json.dumps(table, indent=1))
    return "\n".join(lines)


def sampler(args) -> str:
    from shapeflow import metrics
    from shapeflow.generate import decode_latents, latent_shape
    from shapeflow.sampling import initial_noise, sample

    lines = []
    for spec in args.gen:
        name, pair, classes = _load(spec)
        dit, vae = pair["dit"], pair["vae"]
        n = args.samples
        shape = latent_shape(dit, pair["dit_kind"])
        noise = initial_noise((n, *shape), seed=list(range(n)))
        cond = torch.arange(n) % max(1, len(classes)) if dit.config.cond == "class" else None

        def run(method, steps):
            x = sample(dit, noise, steps=steps, method=method, cond=cond)
            z = vae.unscale_latents(dit.denormalize_latents(x))  # as `generate` does
            meshes, _ = decode_latents(vae, pair["vae_kind"], z, resolution=args.resolution, smooth=args.smooth)
            return meshes

        ref = run("midpoint", 100)
        lines.append(f"### {name}: {n} samples, reference = midpoint with 100 steps (200 evaluations)\n")
        lines.append("| method | steps | evaluations | Chamfer-L1 to reference | F@1% to reference |")
        lines.append("|---|---|---|---|---|")
        for method in ("euler", "heun", "midpoint"):
            for steps in args.steps_list:
                if method != "euler" and steps > max(args.steps_list) // 2:
                    continue
                meshes = run(method, steps)
                cds, fs = [], []
                for m, r in zip(meshes, ref):
                    if m is None or r is None:
                        continue
                    s = metrics.surface_metrics(m, r, n_points=20_000, fscore_thresholds=(0.01,))
                    cds.append(s["chamfer_l1"])
                    fs.append(s["f_score@1%"])
                nfe = steps * (1 if method == "euler" else 2)
                lines.append(f"| {method} | {steps} | {nfe} | {np.mean(cds):.4f} | {np.mean(fs):.3f} |")
        lines.append("")
    return "\n".join(lines)


def ceiling(args) -> str:
    from shapeflow.evaluate import generation_eval, reconstruct_object, reference_shapes

    if not args.data:
        raise SystemExit("ceiling needs --data (a preprocessed folder of fresh synthetic shapes)")
    lines = []
    objs = sorted(d for d in Path(args.data).iterdir() if (d / "meta.json").is_file())
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.gen:
            # VecSet: the encoder input the VAE was trained with (its config, as `encode-latents` uses) and the
            # token count the DiT samples
            name, pair, classes = _load(spec, dit_tokens=True)
            refs = reference_shapes(Path(tmp) / "ref", classes, args.per_class, args.ref_seed)
            vc = pair["vae"].config
            tokens = f", {vc.num_tokens} tokens" if pair["vae_kind"] == "vecset_vae" else ""
            inputs = (f"; encoder input {vc.surface_points} + {vc.sharp_points} points"
                      if pair["vae_kind"] == "vecset_vae" else "")
            recs, t0 = {c: [] for c in classes}, time.perf_counter()
            for d in objs:
                source = json.loads((d / "meta.json").read_text())["source"]
                c = Path(source).parent.name  # `shapeflow synth` writes <class>/<class>_<k>.obj
                if c in recs and len(recs[c]) < args.per_class:
                    r = reconstruct_object(pair["vae"], pair["vae_kind"], d, resolution=args.resolution,
                                           with_metrics=False, smooth=args.smooth)
                    recs[c].append(r["mesh"])
            short = {c: len(v) for c, v in recs.items() if len(v) < args.per_class}
            if short:
                raise SystemExit(f"{args.data}: fewer than {args.per_class} objects for {short}")
            table = generation_eval(recs, refs, n_points=2048, pooled=not args.no_pooled, workers=args.workers)
            lines.append(f"### {name}: reconstructions by {pair['vae_kind']} of {args.per_class} fresh shapes per class "
                         f"({args.data}{inputs}{tokens}), decoded "
                         f"at {_res(pair, args.resolution)} (smooth {args.smooth}), against {args.per_class} fresh "
                         f"references per class (seed {args.ref_seed}); {time.perf_counter() - t0:.0f} s\n")
            lines += _table(table)
    return "\n".join(lines)


def floor(args) -> str:
    from shapeflow.evaluate import reference_shapes
    from shapeflow.geometry.synth import CATEGORIES
    from shapeflow.metrics import one_nna, pairwise_chamfer, sample_surface

    n, draws = args.per_class, args.draws
    sizes = [k for k in args.sizes if n % k == 0 and k >= 2]
    if not sizes:
        raise SystemExit(f"floor: no --sizes divides --per-class {n}")
    classes = list(CATEGORIES)
    clouds = {c: [] for c in classes}  # per class: draws * n clouds, draw-major
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(draws):
            shapes = reference_shapes(Path(tmp) / f"draw{d}", classes, n, 100 + d)  # canonical frame, as quality
            for c in classes:
                for k, mesh in enumerate(shapes[c]):
                    clouds[c].append(sample_surface(*mesh, 2048, seed=d * n + k)[0])
    t_data = time.perf_counter() - t0

    def pairs_of(count):
        return [(a, b) for a in range(count) for b in range(a + 1, count)]

    stats = {k: {} for k in sizes}
    for c in classes:
        m = pairwise_chamfer(np.stack(clouds[c]), workers=args.workers)
        for k in sizes:
            sets = [np.arange(i * k, (i + 1) * k) for i in range(draws * n // k)]
            stats[k][c] = [one_nna(m[np.ix_(sets[a], sets[a])], m[np.ix_(sets[b], sets[b])], m[np.ix_(sets[a], sets[b])])
                           for a, b in pairs_of(len(sets))]
    if args.pooled:  # all classes in one pool (as generation_eval's "all" row), at K per class only
        k = args.pooled
        per_draw = draws * n // k
        sets_c = [[np.arange(i * k, (i + 1) * k) + j * draws * n for j in range(len(classes))] for i in range(per_draw)]
        everything = np.concatenate([np.stack(clouds[c]) for c in classes])
        use = sorted(set(np.concatenate([np.concatenate(s) for s in sets_c[:args.pooled_sets]]).tolist()))
        pos = {g: i for i, g in enumerate(use)}
        m = pairwise_chamfer(everything[use], workers=args.workers)
        idx = [np.array([pos[g] for g in np.concatenate(s)]) for s in sets_c[:args.pooled_sets]]
        stats.setdefault(k, {})["all"] = [one_nna(m[np.ix_(idx[a], idx[a])], m[np.ix_(idx[b], idx[b])],
                                                  m[np.ix_(idx[a], idx[b])]) for a, b in pairs_of(len(idx))]
    lines = [f"### 1-NNA between independent draws of the synthetic data ({draws} draws x {n} shapes per class, "
             f"seeds 100-{99 + draws}; Chamfer on 2048 points; data {t_data:.0f} s)\n",
             "| set size per class | class | set pairs | mean | std | min | max | pairs above 65 % |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted(stats):
        for c, v in stats[k].items():
            v = 100 * np.asarray(v)
            lines.append(f"| {k} | {c} | {len(v)} | {v.mean():.1f}% | {v.std():.1f} | {v.min():.1f}% | {v.max():.1f}% | "
                         f"{100 * np.mean(v > 65.0):.0f}% |")
        if not all(c in stats[k] for c in classes):  # a --pooled size without per-class rows
            continue
        per_class = 100 * np.asarray([stats[k][c] for c in classes])  # (classes, pairs)
        lines.append(f"| {k} | *worst class of a pair* | {per_class.shape[1]} | {per_class.max(axis=0).mean():.1f}% | "
                     f"{per_class.max(axis=0).std():.1f} | {per_class.max(axis=0).min():.1f}% | "
                     f"{per_class.max(axis=0).max():.1f}% | {100 * np.mean(per_class.max(axis=0) > 65.0):.0f}% |")
    lines.append("")
    return "\n".join(lines)


def speed(args) -> str:
    from shapeflow.generate import generate

    lines = []
    for spec in args.gen:
        name, pair, classes = _load(spec)
        cond = torch.zeros(1, dtype=torch.long) if pair["dit"].config.cond == "class" else None
        times, parts = [], []
        for k in range(args.repeats + 1):
            t0 = time.perf_counter()
            res = generate(**pair, num=1, cond=cond, steps=args.steps, method=args.method, seed=k, resolution=128)
            if k:  # the first call warms up
                times.append(time.perf_counter() - t0)
                parts.append(res.seconds)
        stages = ", ".join(f"{key} {statistics.median(p[key] for p in parts):.2f}" for key in parts[0])
        lines.append(f"{name}: one shape, {args.steps} {args.method} steps, decoded at {_res(pair, 128)}: median "
                     f"{statistics.median(times):.2f} s ({stages}; runs: {', '.join(f'{t:.2f}' for t in times)}; "
                     f"torch threads {torch.get_num_threads()})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["quality", "sampler", "speed", "ceiling", "floor"])
    ap.add_argument("--gen", action="append", default=[], metavar="NAME=DIT,VAE[,STRUCTURE[,STRUCTURE_VAE]]",
                    help="a generator: DiT and VAE checkpoints (a sparse DiT: + its structure DiT); a shipped "
                         "pipeline by name alone (vecset, sparse)")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--ref-seed", type=int, default=1, help="seed of the fresh reference shapes (training used 0)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--steps-list", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=1.0,
                    help="guidance scale (1: none, the default of the demo and of `shapeflow generate`)")
    ap.add_argument("--method", default="euler", choices=["euler", "heun", "midpoint"], help="quality, speed: sampler (the demo and `shapeflow generate` use heun)")
    ap.add_argument("--shift", type=float, default=1.0, help="quality: time-grid shift")
    ap.add_argument("--gen-seed", type=int, default=0, help="quality: offset of the generation seeds")
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--smooth", type=float, default=0.0,
                    help="Gaussian filter of decoded fields before meshing, world units (quality, sampler, ceiling)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-pooled", action="store_true",
                    help="quality / ceiling: per-class rows only, no all-class row (at 64 per class that row costs "
                         "about 8x the per-class ones together)")
    ap.add_argument("--workers", type=int, default=-1, help="KD-tree query threads of the Chamfer matrices (-1: all cores)")
    ap.add_argument("--data", default=None, help="ceiling: a preprocessed folder of fresh synthetic shapes")
    ap.add_argument("--draws", type=int, default=4, help="floor: independent draws of --per-class shapes per class")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="floor: set sizes per class")
    ap.add_argument("--pooled", type=int, default=0, metavar="K",
                    help="floor: also the all-classes 1-NNA at K per class (cost grows with the square of the pool)")
    ap.add_argument("--pooled-sets", type=int, default=4, help="floor: disjoint sets used for --pooled")
    args = ap.parse_args()
    if args.part != "floor" and not args.gen:
        ap.error(f"{args.part} needs at least one --gen NAME=DIT,VAE")
    torch.set_flush_denormal(True)  # as the `shapeflow` command does (BENCHMARKS.md, VecSet third round)
    t0 = time.perf_counter()
    print({"quality": quality, "sampler": sampler, "speed": speed, "ceiling": ceiling, "floor": floor}[args.part](args))
    print(f"\n({time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
