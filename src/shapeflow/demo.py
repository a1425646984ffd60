"""The main job (``make demo`` / ``shapeflow demo OUT``): the whole pipeline on the embedded synthetic set.

Stages (each skipped when its output is already complete, so an interrupted demo resumes):

1. ``synth``: procedural shapes of every category (:mod:`shapeflow.geometry.synth`), seed 0;
2. ``preprocess``: watertight surfaces + samples of the synthetic set, and of real meshes when a folder
   of them is given (``../shared/meshes`` in the project checkout);
3. ``vae``: train a ``tiny`` VecSet VAE (``assets/configs/demo_vecset_vae.yaml``);
4. ``latents``: encode the dataset with it (posterior means);
5. ``dit``: train a ``tiny`` class-conditional token DiT (``assets/configs/demo_token_dit.yaml``);
6. ``generate``: sample shapes for every class, decode them to meshes (GLB) and a preview picture;
7. ``evaluate``: VAE reconstruction metrics on held-out objects and generation metrics (COV, MMD,
   1-NNA over Chamfer) per class against **fresh** synthetic shapes (seed 1, never trained on);
8. ``report``: ``OUT/report.md`` (+ ``report.json``) with counts, timings, metrics and pictures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shapeflow import fileio

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``QUICK`` is the reduced run the tests use."""

    per_class: int = 64  # synthetic training shapes per category (1-NNA at 64 per class: 71.8 vs 76.3 % with 24)
    classes: tuple[str, ...] = ()  # categories (() = all)
    synth_resolution: int = 64  # marching-cubes grid of the synthetic meshes
    prep_resolution: int = 128  # watertight grid of preprocessing
    surface_points: int = 16_384  # uniform surface samples per object
    sharp_points: int = 4_096  # sharp-edge samples per object
    sdf_points: int = 32_768  # SDF samples per object
    real_resolution: int = 256  # watertight grid for the real meshes
    vae_steps: int = 1100
    num_tokens: int = 64  # VecSet tokens per shape the DiT generates; the VAE trains with 128 (BENCHMARKS.md)
    vae_batch: int = 8
    dit_steps: int = 4000  # on 64 tokens a step costs about half of one on 128: 65.0 vs 69.4 % for 2000 steps
    dit_batch: int = 32
    gen_per_class: int = 8  # generated shapes per class (= fresh reference shapes per class)
    gen_steps: int = 25  # sampler steps
    gen_method: str = "heun"  # 1-NNA at 64 per class 63.8 / 63.0 % vs 65.6 / 64.9 % for Euler (two seeds; BENCHMARKS.md)
    gen_resolution: int = 64  # marching-cubes grid of generated shapes
    gen_smooth: float = 0.0  # Gaussian filter of the decoded fields before meshing (world units)
    cfg_scale: float = 1.0  # classifier-free guidance scale: none; the 1400-step DiT loses COV under 2.0
    eval_objects: int = 8  # held-out objects for the VAE metrics
    metric_points: int = 2048  # points per cloud for COV / MMD / 1-NNA (PointFlow protocol)
    workers: int = 2
    seed: int = 0


NNA_DATA_STD = {8: 16, 16: 11, 32: 7, 64: 5}
"""Per-class 1-NNA standard deviation (points) between independent draws of the synthetic data at that many
shapes per class (``benchmarks/bench_generation.py floor --per-class 64 --draws 4``, BENCHMARKS.md)."""

QUICK = DemoConfig(per_class=3, classes=("chair", "mug", "vase"), synth_resolution=48, prep_resolution=64,
                   surface_points=4096, sharp_points=1024, sdf_points=16_384, real_resolution=96,
                   vae_steps=30, vae_batch=4, dit_steps=30, dit_batch=4, gen_per_class=2, gen_steps=4, gen_resolution=32, eval_objects=2,
                   metric_points=512)


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, real_meshes: str | Path | None = None,
             progress: bool = True) -> dict:
    """Run every stage into ``out``; returns the report dict (also written to ``out/report.json``)."""
    from shapeflow.geometry.synth import CATEGORIES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(cfg.classes or CATEGORIES)
    report: dict = {"config": dataclasses.asdict(cfg), "classes": classes, "seconds": {}}

    def stage(name: str):
        log.info("=== demo stage: %s ===", name)
        return _Timer(report["seconds"], name)

    with stage("synth"):
        report["synth"] = _synth(out / "synth", classes, cfg.per_class, cfg.seed, cfg, progress)
    with stage("preprocess"):
        report["preprocess"] = _preprocess(out / "synth", out / "prep", cfg.prep_resolution, cfg, progress)
    if real_meshes is not None and Path(real_meshes).is_dir():
        with stage("preprocess_real"):
            report["preprocess_real"] = _preprocess(Path(real_meshes), out / "prep_real", cfg.real_resolution,
                                                    cfg, progress)
    with stage("preview_data"):
        report["data_preview"] = _data_preview(out)
    with stage("vae"):
        vae_dir = _train("demo_vecset_vae.yaml", out / "runs" / "vae",
                         [f"data.root={out / 'prep'}", f"train.steps={cfg.vae_steps}",
                          f"train.batch_size={cfg.vae_batch}"])
    with stage("latents"):
        from shapeflow.data.latents import encode_dataset

        s = encode_dataset(vae_dir, out / "prep", out / "latents", num_tokens=cfg.num_tokens, progress=progress)
        report["latents"] = {k: v for k, v in s.items() if k != "seconds"}
    with stage("dit"):
        from shapeflow.models import load_vae

        vae, _ = load_vae(vae_dir)
        dit_dir = _train("demo_token_dit.yaml", out / "runs" / "dit",
                         [f"data.root={out / 'latents'}", f"model.classes={json.dumps(classes)}",
                          f"model.in_channels={vae.config.latent_channels}", f"model.num_tokens={cfg.num_tokens}",
                          f"train.steps={cfg.dit_steps}", f"train.batch_size={cfg.dit_batch}"])
    with stage("generate"):
        report["generate"] = _generate(out, dit_dir, vae_dir, classes, cfg)
    with stage("evaluate"):
        report["vae_metrics"] = _eval_vae(out, vae_dir, cfg, progress)
        report["generation_metrics"] = _eval_generation(out, classes, cfg, progress)
    # A resumed demo keeps the first run's timings of the stages it found complete.
    done = {"synth": report["synth"]["written"] == 0, "preprocess": report["preprocess"]["new"] == 0,
            "preprocess_real": report.get("preprocess_real", {}).get("new", 1) == 0,
            "vae": (out / "runs" / "vae" / ".skipped").is_file(), "dit": (out / "runs" / "dit" / ".skipped").is_file(),
            "latents": report["latents"]["encoded"] == 0}
    old = json.loads((out / "report.json").read_text()).get("seconds", {}) if (out / "report.json").is_file() else {}
    report["resumed_stages"] = [k for k, v in done.items() if v and k in report["seconds"]]
    for k in report["resumed_stages"]:
        report["seconds"][k] = old.get(k, report["seconds"][k])
    for marker in ("vae", "dit"):
        (out / "runs" / marker / ".skipped").unlink(missing_ok=True)
    report["seconds"]["total"] = round(sum(v for k, v in report["seconds"].items()), 2)
    fileio.write_json(out / "report.json", report)
    fileio.write_text(out / "report.md", _markdown(report))
    return report


class _Timer:
    def __init__(self, table: dict, name: str):
        self.table, self.name = table, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.table[self.name] = round(time.perf_counter() - self.t0, 2)
        return False


# -- stages ------------------------------------------------------------------------------------------


def _synth(path: Path, classes, per_class: int, seed: int, cfg: DemoConfig, progress: bool) -> dict:
    from shapeflow.geometry.synth import generate_dataset

    s = generate_dataset(path, per_class, seed, resolution=cfg.synth_resolution, classes=classes,
                         workers=cfg.workers, progress=progress)
    return {"written": s.get("written"), "skipped": s.get("skipped"), "objects": per_class * len(classes)}


def _prep_config(resolution: int, cfg: DemoConfig):
    from shapeflow.data.preprocess import PreprocessConfig

    # The offset surfaces even for the (closed) synthetic meshes: trained on the meshes as they are
    # (PreprocessConfig.keep_closed) the demo pair scored worse (1-NNA 78.2 vs 75.0 % at 64 per class).
    return PreprocessConfig(resolution=resolution, surface_points=cfg.surface_points,
                            sharp_points=cfg.sharp_points, sdf_points=cfg.sdf_points, seed=cfg.seed)


def _preprocess(src: Path, dst: Path, resolution: int, cfg: DemoConfig, progress: bool) -> dict:
    from shapeflow.data.preprocess import preprocess_dataset, read_manifest

    s = preprocess_dataset(src, dst, _prep_config(resolution, cfg), workers=cfg.workers, progress=progress)
    recs = read_manifest(dst)
    secs = [r["stats"].get("seconds", 0.0) for r in recs if r["status"] == "ok"]
    return {"ok": sum(r["status"] == "ok" for r in recs), "failed": sum(r["status"] == "failed" for r in recs),
            "new": s.ok + s.failed,
            "errors": [r["error"] for r in recs if r["status"] == "failed"],
            "run_seconds": round(s.seconds, 2), "median_object_seconds": float(np.median(secs)) if secs else None,
            "resolution": resolution}


def _data_preview(out: Path) -> str | None:
    """Watertight results of a few synthetic objects and every real mesh, rendered in a grid."""
    from shapeflow.data import format as fmt
    from shapeflow.data.preprocess import read_manifest
    from shapeflow.geometry.io import load_mesh
    from shapeflow.render import image_grid, render_mesh, save_png

    picks = []
    for folder, k in ((out / "prep_real", 12), (out / "prep", 8)):
        if (folder / "manifest.jsonl").is_file():
            recs = [r for r in read_manifest(folder, status="ok") if (folder / r["id"] / fmt.MESH_FILE).is_file()]
            seen: set = set()
            for r in sorted(recs, key=lambda r: r["source"]):  # one per class first, then the rest
                cls = Path(r["source"]).parent.name
                if cls not in seen or folder.name == "prep_real":
                    seen.add(cls)
                    picks.append((folder / r["id"] / fmt.MESH_FILE, Path(r["source"]).stem))
                if len([p for p in picks if p[0].parent.parent == folder]) >= k:
                    break
    if not picks:
        return None
    tiles = [render_mesh(*load_mesh(p), size=160, background=(255, 255, 255)) for p, _ in picks]
    save_png(out / "data_preview.png", image_grid(tiles, ncols=6, labels=[n for _, n in picks]))
    return "data_preview.png"


def _train(config_name: str, out_dir: Path, overrides: list[str]) -> Path:
    """Train from a packaged config unless ``out_dir/final`` exists; resume an interrupted run."""
    from shapeflow.train.experiment import load_config
    from shapeflow.train.loop import run

    if (out_dir / "final" / "config.json").is_file():
        log.info("%s: already trained, skipping", out_dir)
        (out_dir / ".skipped").touch()
        return out_dir / "final"
    cfg = load_config(CONFIGS / config_name, [*overrides, f"out_dir={out_dir}"])
    warmup = max(1, cfg.train.steps // 10)
    if cfg.train.warmup_steps > warmup:  # short runs (--quick, --vae-steps 50) would never reach the peak lr
        log.info("%s: %d steps: warm-up shortened from %d to %d steps", config_name, cfg.train.steps,
                 cfg.train.warmup_steps, warmup)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=warmup))
    run(cfg, resume=(out_dir / "checkpoints").is_dir())
    return out_dir / "final"


def _generate(out: Path, dit_dir: Path, vae_dir: Path, classes: list[str], cfg: DemoConfig) -> dict:
    import torch

    from shapeflow.generate import generate, preview_grid
    from shapeflow.geometry.io import save_mesh
    from shapeflow.models import load_dit, load_vae
    from shapeflow.render import save_png

    dit, dit_kind = load_dit(dit_dir)
    vae, vae_kind = load_vae(vae_dir)
    labels = [c for c in classes for _ in range(cfg.gen_per_class)]
    cond = torch.tensor([classes.index(c) for c in labels])
    res = generate(dit, vae, dit_kind=dit_kind, vae_kind=vae_kind, num=len(labels), cond=cond, labels=labels,
                   steps=cfg.gen_steps, method=cfg.gen_method, cfg_scale=cfg.cfg_scale, seed=1000, resolution=cfg.gen_resolution,
                   smooth=cfg.gen_smooth)
    gen_dir = out / "generated"
    files = []
    for k, (mesh, label) in enumerate(zip(res.meshes, labels)):
        name = f"{label}_{k % cfg.gen_per_class:02d}.glb"
        if mesh is not None:
            save_mesh(gen_dir / name, *mesh)
        files.append(name if mesh is not None else None)
    save_png(out / "generated.png", preview_grid(res.meshes, labels, ncols=cfg.gen_per_class))
    return {"files": files, "empty": sum(f is None for f in files), "nfe": res.nfe,
            "seconds": {k: round(v, 2) for k, v in res.seconds.items()}, "cfg_scale": cfg.cfg_scale,
            "steps": cfg.gen_steps, "method": cfg.gen_method, "resolution": cfg.gen_resolution, "smooth": cfg.gen_smooth}


def _eval_vae(out: Path, vae_dir: Path, cfg: DemoConfig, progress: bool) -> dict:
    from shapeflow.evaluate import eval_vae, format_table

    from shapeflow.data.datasets import ObjectFolder

    split = "val" if len(ObjectFolder(out / "prep", split="val", val_fraction=0.1)) else "all"
    rows, summary = eval_vae(vae_dir, out / "prep", split=split, val_fraction=0.1, limit=cfg.eval_objects,
                             resolution=128, n_points=20_000, progress=progress)
    fileio.write_text(out / "vae_eval.md", format_table(rows, summary))
    return {**summary, "split": split}


def _eval_generation(out: Path, classes: list[str], cfg: DemoConfig, progress: bool) -> dict:
    """COV / MMD / 1-NNA (Chamfer) per class: generated meshes vs fresh synthetic shapes (seed 1, canonical frame)."""
    from shapeflow.evaluate import generation_eval, reference_shapes
    from shapeflow.geometry.io import load_mesh

    refs = reference_shapes(out / "reference", classes, cfg.gen_per_class, cfg.seed + 1,
                            resolution=cfg.synth_resolution, workers=cfg.workers, progress=progress)
    gens = {}
    for c in classes:
        paths = [out / "generated" / f"{c}_{k:02d}.glb" for k in range(cfg.gen_per_class)]
        gens[c] = [load_mesh(p) if p.is_file() else None for p in paths]
    return generation_eval(gens, refs, n_points=cfg.metric_points)


def _markdown(r: dict) -> str:
    lines = ["# shapeflow demo report", ""]
    s = r["seconds"]
    lines += ["## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f}{' (first run; resumed)' if k in r.get('resumed_stages', []) else ''} |"
              for k, v in s.items()]
    lines += ["", "## Data", ""]
    for key in ("preprocess", "preprocess_real"):
        if key in r:
            p = r[key]
            lines.append(f"- `{key}`: {p['ok']} ok, {p['failed']} failed at {p['resolution']}^3, "
                         f"median {p['median_object_seconds']:.2f} s per object")
            lines += [f"  - failed: {e}" for e in p["errors"]]
    if r.get("data_preview"):
        lines += ["", f"![watertight results]({r['data_preview']})"]
    v = r["vae_metrics"]
    held = "held-out" if v.get("split") == "val" else "all (no held-out split at this size)"
    lines += ["", f"## VecSet VAE reconstruction ({held} synthetic objects)", "",
              f"{v['objects']} objects: volume IoU {v.get('iou', float('nan')):.3f}, "
              f"Chamfer-L1 {v.get('chamfer_l1', float('nan')):.4f}, F@1% {v.get('f_score@1%', float('nan')):.3f}, "
              f"normal consistency {v.get('normal_consistency', float('nan')):.3f} (table: vae_eval.md)"]
    g = r["generate"]
    lines += ["", "## Generation", "",
              f"{len(g['files'])} shapes ({g['empty']} empty), {g['steps']} {g.get('method', 'euler').capitalize()} steps, guidance {g['cfg_scale']}, "
              f"decoded at {g['resolution']}^3; meshes in `generated/`.", "", "![generated](generated.png)", "",
              "Generation metrics against fresh synthetic shapes of each class (Chamfer on "
              f"{r['config']['metric_points']} points; 1-NNA ideal 50%):", "",
              "| class | COV | MMD (x1e3) | 1-NNA |", "|---|---|---|---|"]
    for c, m in r["generation_metrics"].items():
        lines.append(f"| {c} | {m['COV-CD']:.2f} | {1e3 * m['MMD-CD']:.3f} | {m['1-NNA-CD']:.2f} |")
    n = r["config"]["gen_per_class"]
    spread = min(NNA_DATA_STD.items(), key=lambda kv: abs(kv[0] - n))
    lines += ["", f"With {n} shapes per class a per-class 1-NNA is a rough estimate: between two independent draws "
              f"of the synthetic data itself it has a standard deviation of about {spread[1]} points at "
              f"{spread[0]} shapes per class (BENCHMARKS.md); compare generators with "
              "`benchmarks/bench_generation.py quality --per-class 64`."]
    return "\n".join(lines) + "\n"
