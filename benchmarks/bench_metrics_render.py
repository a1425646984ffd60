"""Benchmark: generation metrics, headless rendering, marching cubes, procedural dataset.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_metrics_render.py                 # everything
    .venv/bin/python benchmarks/bench_metrics_render.py --only render mc

Measures, with medians over repeats where cheap:

* ``metrics``: :func:`shapeflow.metrics.generation_metrics` (MMD / COV / 1-NNA with the Chamfer
  distance) for 100 generated vs 100 reference clouds of 2048 surface points. The two sets are
  independent draws of the procedural dataset (seeds 0 and 1, categories cycled), so the 1-NNA
  printed is also a sanity value for "same distribution" (ideal 50%).
* ``render``: :func:`shapeflow.render.render_mesh` at 256^2 of ``lucy.ply`` (~100k faces) from
  ``../shared/meshes`` (``--meshes`` to override): BVH build and per-view time, 1 and 2x2 rays/pixel.
* ``mc``: :func:`shapeflow.geometry.marching_cubes.marching_cubes` of a sphere SDF at 128^3 and 256^3.
* ``synth``: ``generate_dataset`` of 6 classes x 40 shapes at the default resolution, 2 workers.

Prints a Markdown table and the 1-minute load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from shapeflow import metrics, render  # noqa: E402
from shapeflow.geometry import grid, synth  # noqa: E402
from shapeflow.geometry.io import load_mesh  # noqa: E402
from shapeflow.geometry.frame import normalize_vertices  # noqa: E402
from shapeflow.geometry.marching_cubes import marching_cubes  # noqa: E402


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def clouds(seed: int, n: int, points: int) -> np.ndarray:
    out = []
    for k in range(n):
        c = synth.CATEGORIES[k % len(synth.CATEGORIES)]
        v, f = synth.shape_to_mesh(synth.sample_shape(c, synth.object_rng(seed, c, k)), 48)
        out.append(metrics.sample_surface(v, f, points, seed=k)[0])
    return np.stack(out)


def bench_metrics(rows: list) -> None:
    s, r = clouds(0, 100, 2048), clouds(1, 100, 2048)
    cpu0 = time.process_time()
    t, out = timed(lambda: metrics.generation_metrics(s, r))
    cpu = time.process_time() - cpu0
    note = f"MMD-CD {out['MMD-CD']:.5f}, COV {100 * out['COV-CD']:.0f}%, 1-NNA {100 * out['1-NNA-CD']:.1f}%"
    rows.append(("generation_metrics 100 vs 100 clouds x 2048 pts (cKDTree)", f"{t:.1f} s",
                 f"{note}; {cpu:.1f} CPU-s in this process"))


def bench_render(rows: list, meshes: Path) -> None:
    path = meshes / "lucy.ply"
    if not path.is_file():
        rows.append(("render lucy", "skipped", f"{path} not found"))
        return
    v, f = load_mesh(path)
    v, _ = normalize_vertices(v)
    t_build, r = timed(lambda: render.MeshRenderer(v, f), 3)
    for ss in (1, 2):
        r.render(size=256, supersample=ss)  # warm-up
        t, img = timed(lambda: r.render(size=256, azimuth=30, elevation=15, supersample=ss), 5)
        rows.append((f"render 256^2 lucy ({len(f)} faces), {ss}x{ss} rays/px, per view", f"{1000 * t:.0f} ms",
                     f"coverage {100 * (img[..., 3] > 0).mean():.0f}% of pixels"))
    fit = render.default_distance(radius=float(np.linalg.norm(v, axis=1).max()))  # mesh fills the frame
    t, img = timed(lambda: r.render(size=256, azimuth=30, elevation=15, distance=fit), 5)
    rows.append(("render 256^2 lucy, 2x2 rays/px, camera fitted to the mesh", f"{1000 * t:.0f} ms",
                 f"coverage {100 * (img[..., 3] > 0).mean():.0f}% of pixels"))
    rows.append(("render: MeshRenderer set-up (embree BVH + vertex normals) for lucy",
                 f"{1000 * t_build:.0f} ms", "once per mesh"))
    t, _ = timed(lambda: render.render_mesh(v, f, size=256), 3)
    rows.append(("render_mesh 256^2 lucy, default (build + 2x2 rays/px)", f"{1000 * t:.0f} ms", "one call"))


def bench_mc(rows: list) -> None:
    for res in (128, 256):
        p = grid.node_points(res, dtype=np.float32)
        field = (np.linalg.norm(p, axis=1) - 0.6).reshape((res + 1,) * 3)
        del p
        t, (v, f) = timed(lambda: marching_cubes(field), 3)
        rows.append((f"marching_cubes sphere SDF {res}^3", f"{1000 * t:.0f} ms", f"{len(f)} faces"))


def bench_synth(rows: list) -> None:
    classes = synth.CATEGORIES[:6]
    with tempfile.TemporaryDirectory() as d:
        t, _ = timed(lambda: synth.generate_dataset(d, 40, 0, classes=classes, workers=2, progress=False))
        size = sum(p.stat().st_size for p in Path(d).rglob("*.obj")) / 1e6
    rows.append((f"synth 6 classes x 40 shapes, res {synth.DEFAULT_RESOLUTION}, 2 workers", f"{t:.1f} s",
                 f"{size:.0f} MB of OBJ"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=["metrics", "render", "mc", "synth"], default=None)
    default_meshes = os.environ.get("SHAPEFLOW_TEST_MESHES", ROOT.parent / "shared" / "meshes")
    ap.add_argument("--meshes", type=Path, default=Path(default_meshes), help="folder holding lucy.ply")
    args = ap.parse_args()
    todo = args.only or ["render", "mc", "synth", "metrics"]
    load0 = os.getloadavg()[0]
    rows: list = []
    for name in todo:
        {"metrics": bench_metrics, "render": lambda r: bench_render(r, args.meshes), "mc": bench_mc,
         "synth": bench_synth}[name](rows)
    load1 = os.getloadavg()[0]
    print("| what | time | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n1-min load average: {load0:.2f} before, {load1:.2f} after (2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
