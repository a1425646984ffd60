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

**The sparse pipeline** (``shapeflow demo OUT --pipeline sparse``, :func:`_sparse_models`): preprocessing adds
the sparse SDF band (``sparse_res``, the synthetic meshes kept as they are, as the VAE was trained), the VAE is
the shipped tiny sparse SDF VAE (training one takes about 30 minutes on a 2-core CPU: BENCHMARKS.md), stages 4-5
become: encode the band into sparse latents and structure grids, and train the stage-2 sparse DiT
(``assets/configs/demo_sparse_dit.yaml``); stage 1 is the shipped VecSet pair (``sparse_structure="vecset"``,
measured better) or a structure grid DiT trained here (``"grid"``, ``demo_structure_dit.yaml``). Generation runs
both stages and the sparse decoder at 256^3. It has its own budget (``sparse_budget_s``).

**Fitted to the machine.** The demo has a time budget (``DemoConfig.budget_s`` for the ``shapeflow demo``
run; ``make demo`` adds the set-up). The recipe is ``max_vae_steps`` / ``max_dit_steps``; before each
training stage the engine times a few steps of it on this machine (:func:`shapeflow.train.loop.measure_step_time`),
and the stage gets the steps that fit what is left of the budget, at most the recipe's and at least
``min_fraction`` of it (below that the report says the machine is too slow for the budget). The chosen
counts are printed, written to ``OUT/plan.json`` (a resumed demo keeps them) and to the report, and
``--vae-steps N --dit-steps M`` repeats a run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shapeflow import fileio
from shapeflow.data import format as fmt
from shapeflow.data.datasets import ObjectFolder
from shapeflow.data.latents import STRUCTURE_DIR, encode_dataset
from shapeflow.data.preprocess import PreprocessConfig, preprocess_dataset, read_manifest
from shapeflow.evaluate import eval_vae, format_table, generation_eval, reference_shapes
from shapeflow.generate import PIPELINES, generate, load_structure, preview_grid
from shapeflow.geometry.io import load_mesh, save_mesh
from shapeflow.geometry.synth import CATEGORIES, generate_dataset
from shapeflow.models import load_dit, load_vae
from shapeflow.render import image_grid, render_mesh, save_png
from shapeflow.train.experiment import ExperimentConfig, load_config
from shapeflow.train.loop import measure_step_time, run

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``QUICK`` is the reduced run the tests use."""

    per_class: int = 64  # synthetic training shapes per category
    classes: tuple[str, ...] = ()  # categories (() = all)
    synth_resolution: int = 64  # marching-cubes grid of the synthetic meshes
    prep_resolution: int = 128  # watertight grid of preprocessing
    surface_points: int = 16_384  # uniform surface samples per object
    sharp_points: int = 4_096  # sharp-edge samples per object
    sdf_points: int = 32_768  # SDF samples per object
    real_resolution: int = 256  # watertight grid for the real meshes
    budget_s: float = 740.0  # wall time of `shapeflow demo` the training is fitted to (make demo: + set-up)
    max_vae_steps: int = 1100  # the VAE recipe: steps where the budget allows
    max_dit_steps: int = 4000  # the DiT recipe
    min_fraction: float = 0.25  # never train less than this share of the recipe (the machine is too slow then)
    vae_steps: int | None = None  # fixed VAE steps (None: fitted to the budget)
    dit_steps: int | None = None  # fixed DiT steps (None: fitted to the budget)
    probe_steps: int = 8  # timed steps per stage when fitting (after 2 untimed ones)
    step_margin: float = 1.1  # plan with the timed step x this: validation, saving and a busy machine cost more
    precision: str = "auto"  # train.precision of both stages (auto: bf16 on native-bf16 CPUs and CUDA)
    tail_vae_steps: int = 180  # what latents + generate + evaluate cost, in VAE steps (reserved in the plan)
    dit_vae_step_ratio: float = 0.3  # planning estimate of a DiT step / a VAE step (the DiT is timed later)
    num_tokens: int = 64  # VecSet tokens per shape the DiT generates; the VAE trains with 128 (BENCHMARKS.md)
    vae_batch: int = 8
    dit_batch: int = 32
    gen_per_class: int = 8  # generated shapes per class (= fresh reference shapes per class)
    gen_steps: int = 25  # sampler steps
    gen_method: str = "heun"  # the sampler of `shapeflow generate` (BENCHMARKS.md compares them)
    gen_resolution: int = 64  # marching-cubes grid of generated shapes
    gen_smooth: float = 0.0  # Gaussian filter of the decoded fields before meshing (world units)
    cfg_scale: float = 1.0  # classifier-free guidance scale: none
    eval_objects: int = 8  # held-out objects for the VAE metrics
    metric_points: int = 2048  # points per cloud for COV / MMD / 1-NNA (PointFlow protocol)
    workers: int = 2
    seed: int = 0
    pipeline: str = "vecset"  # "vecset" (token DiT on a VecSet VAE) or "sparse" (structure + sparse DiT, sparse VAE)
    sparse_res: int = 256  # sparse pipeline: band resolution (the shipped sparse VAE's)
    sparse_budget_s: float = 1500.0  # sparse pipeline: the budget of the run
    max_structure_steps: int = 1500  # sparse pipeline: the structure DiT recipe
    max_sparse_dit_steps: int = 1500  # sparse pipeline: the sparse DiT recipe
    structure_steps: int | None = None  # fixed structure DiT steps (None: fitted)
    sparse_batch: int = 12  # sparse DiT batch (structure DiT: dit_batch / 2)
    sparse_tail_s: float = 300.0  # sparse pipeline: what generate + evaluate cost (reserved in the plan)
    sparse_structure: str = "vecset"  # sparse pipeline, stage 1: "vecset" (the shipped token DiT + VecSet VAE) or
    #   "grid" (a structure grid DiT trained here); BENCHMARKS.md compares them

    def __post_init__(self):
        if self.pipeline not in ("vecset", "sparse"):
            raise ValueError(f"demo pipeline must be 'vecset' or 'sparse', got {self.pipeline!r}")
        if self.sparse_structure not in ("vecset", "grid"):
            raise ValueError(f"sparse_structure must be 'vecset' or 'grid', got {self.sparse_structure!r}")

    @property
    def budget(self) -> float:
        """The budget of this run's pipeline."""
        return self.sparse_budget_s if self.pipeline == "sparse" else self.budget_s


NNA_DATA_STD = {8: 16, 16: 11, 32: 7, 64: 5}
"""Per-class 1-NNA standard deviation (points) between independent draws of the synthetic data at that many
shapes per class (measured by ``benchmarks/bench_generation.py floor --per-class 64 --draws 4``; the report
quotes it so that a small demo's numbers are read with their spread)."""

QUICK = DemoConfig(per_class=3, classes=("chair", "mug", "vase"), synth_resolution=48, prep_resolution=64,
                   surface_points=4096, sharp_points=1024, sdf_points=16_384, real_resolution=96,
                   max_vae_steps=30, max_dit_steps=30, probe_steps=2, vae_batch=4, dit_batch=4, gen_per_class=2,
                   gen_steps=4, gen_resolution=32, eval_objects=2, metric_points=512, sparse_res=128,
                   max_structure_steps=30, max_sparse_dit_steps=30, sparse_batch=4)


def fit_steps(available_s: float, step_s: float, max_steps: int, min_fraction: float) -> tuple[int, bool]:
    """Steps that fit ``available_s`` at ``step_s`` each: ``(steps, too_slow)``.

    At most ``max_steps``; at least ``ceil(min_fraction * max_steps)`` (and 1), in which case ``too_slow``
    is True: the budget cannot hold the floor on this machine.
    """
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    floor = max(1, int(np.ceil(min_fraction * max_steps)))
    fit = int(max(available_s, 0.0) // step_s)
    return (min(max(fit, floor), max_steps), fit < floor)


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, real_meshes: str | Path | None = None,
             progress: bool = True) -> dict:
    """Run every stage into ``out``; returns the report dict (also written to ``out/report.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(cfg.classes or CATEGORIES)
    report: dict = {"config": dataclasses.asdict(cfg), "classes": classes, "seconds": {}}
    t_start = time.perf_counter()
    plan = _Plan(out / "plan.json", cfg, t_start)

    def stage(name: str):
        log.info("=== demo stage: %s ===", name)
        return _Timer(report["seconds"], name)

    with stage("synth"):
        report["synth"] = _synth(out / "synth", classes, cfg.per_class, cfg.seed, cfg, progress)
    with stage("preprocess"):
        report["preprocess"] = _preprocess(out / "synth", out / "prep", cfg.prep_resolution, cfg, progress,
                                           sparse=cfg.pipeline == "sparse")
    if real_meshes is not None and Path(real_meshes).is_dir():
        with stage("preprocess_real"):
            report["preprocess_real"] = _preprocess(Path(real_meshes), out / "prep_real", cfg.real_resolution,
                                                    cfg, progress)
    with stage("preview_data"):
        report["data_preview"] = _data_preview(out)
    if cfg.pipeline == "sparse":
        vae_dir, dit_dir, structure = _sparse_models(out, cfg, classes, report, plan, stage, progress)
    else:
        vae_dir, dit_dir = _vecset_models(out, cfg, classes, report, plan, stage, progress)
        structure = None
    with stage("generate"):
        report["generate"] = _generate(out, dit_dir, vae_dir, classes, cfg, structure)
    with stage("evaluate"):
        report["vae_metrics"] = _eval_vae(out, vae_dir, cfg, progress)
        report["generation_metrics"] = _eval_generation(out, classes, cfg, progress)
    report["training"] = plan.summary()
    # A resumed demo keeps the first run's timings of the stages it found complete.
    done = {"synth": report["synth"]["written"] == 0, "preprocess": report["preprocess"]["new"] == 0,
            "preprocess_real": report.get("preprocess_real", {}).get("new", 1) == 0,
            **{k: (out / "runs" / k / ".skipped").is_file() for k in ("vae", "dit", "structure")},
            "latents": report["latents"]["encoded"] == 0}
    old = json.loads((out / "report.json").read_text()).get("seconds", {}) if (out / "report.json").is_file() else {}
    report["resumed_stages"] = [k for k, v in done.items() if v and k in report["seconds"]]
    for k in report["resumed_stages"]:
        report["seconds"][k] = old.get(k, report["seconds"][k])
    for marker in ("vae", "dit", "structure"):
        (out / "runs" / marker / ".skipped").unlink(missing_ok=True)
    report["seconds"]["total"] = round(sum(v for k, v in report["seconds"].items()), 2)
    fileio.write_json(out / "report.json", report)
    fileio.write_text(out / "report.md", _markdown(report))
    return report


def _vecset_models(out: Path, cfg: DemoConfig, classes: list[str], report: dict, plan: "_Plan", stage,
                   progress: bool) -> tuple[Path, Path]:
    """Stages 3-5 of the VecSet pipeline: the VAE, its latents, the token DiT; returns their checkpoints."""
    with stage("vae"):
        vae_cfg = _experiment("demo_vecset_vae.yaml", out / "runs" / "vae",
                              [f"data.root={out / 'prep'}", f"train.batch_size={cfg.vae_batch}",
                               f"train.precision={cfg.precision}"])
        # the VAE's share of the time left after the last stages, in proportion to the recipe's costs
        share = cfg.max_vae_steps / (cfg.max_vae_steps + cfg.dit_vae_step_ratio * cfg.max_dit_steps)
        steps = plan.steps("vae", vae_cfg, cfg.vae_steps, cfg.max_vae_steps,
                           lambda left, step_s: share * (left - cfg.tail_vae_steps * step_s))
        vae_dir = _train(vae_cfg, steps)
    with stage("latents"):
        s = encode_dataset(vae_dir, out / "prep", out / "latents", num_tokens=cfg.num_tokens, progress=progress)
        report["latents"] = {k: v for k, v in s.items() if k != "seconds"}
    with stage("dit"):
        vae, _ = load_vae(vae_dir)
        dit_cfg = _experiment("demo_token_dit.yaml", out / "runs" / "dit",
                              [f"data.root={out / 'latents'}", f"model.classes={json.dumps(classes)}",
                               f"model.in_channels={vae.config.latent_channels}",
                               f"model.num_tokens={cfg.num_tokens}", f"train.batch_size={cfg.dit_batch}",
                               f"train.precision={cfg.precision}"])
        vae_step_s = plan.step_s("vae")
        steps = plan.steps("dit", dit_cfg, cfg.dit_steps, cfg.max_dit_steps, lambda left, step_s: left - (
            cfg.tail_vae_steps * (vae_step_s or step_s / cfg.dit_vae_step_ratio)))
        dit_dir = _train(dit_cfg, steps)
    return vae_dir, dit_dir


def _sparse_models(out: Path, cfg: DemoConfig, classes: list[str], report: dict, plan: "_Plan", stage,
                   progress: bool) -> tuple[Path, Path, tuple]:
    """Stages 3-5 of the sparse pipeline: the shipped sparse VAE, its latents + structure grids, the stage-1
    model (``cfg.sparse_structure``: the shipped VecSet pair, or a structure grid DiT trained here) and the
    sparse DiT; returns ``(vae, sparse DiT, stage-1 checkpoint paths)``."""
    vae_dir = PIPELINES["sparse"]["vae"]
    plan.entries["vae"] = {"steps": 0, "fitted": False, "shipped": str(vae_dir)}
    with stage("latents"):
        s = encode_dataset(vae_dir, out / "prep", out / "latents", progress=progress)
        report["latents"] = {k: v for k, v in s.items() if k != "seconds"}
    vae, _ = load_vae(vae_dir)
    r = cfg.sparse_res // vae.config.factor
    common = [f"model.classes={json.dumps(classes)}", f"model.resolution={r}", f"train.precision={cfg.precision}"]
    if cfg.sparse_structure == "vecset":
        structure = PIPELINES["sparse"]["structure"]  # the shipped token DiT + VecSet VAE
        plan.entries["structure"] = {"steps": 0, "fitted": False, "shipped": ",".join(map(str, structure))}
    else:
        with stage("structure"):
            exp = _experiment("demo_structure_dit.yaml", out / "runs" / "structure",
                              [f"data.root={out / 'latents' / STRUCTURE_DIR}",
                               f"train.batch_size={cfg.dit_batch // 2}", *common])
            # time left after the last stages, shared in proportion to the recipes' step counts (timed here)
            share = cfg.max_structure_steps / (cfg.max_structure_steps + cfg.max_sparse_dit_steps)
            steps = plan.steps("structure", exp, cfg.structure_steps, cfg.max_structure_steps,
                               lambda left, step_s: share * (left - cfg.sparse_tail_s))
            structure = (_train(exp, steps),)
    with stage("dit"):
        exp = _experiment("demo_sparse_dit.yaml", out / "runs" / "dit",
                          [f"data.root={out / 'latents'}", f"model.in_channels={vae.config.latent_channels}",
                           f"train.batch_size={cfg.sparse_batch}", *common])
        steps = plan.steps("dit", exp, cfg.dit_steps, cfg.max_sparse_dit_steps,
                           lambda left, step_s: left - cfg.sparse_tail_s)
        dit_dir = _train(exp, steps)
    return vae_dir, dit_dir, structure


class _Plan:
    """The training step counts of one demo: given, or fitted to the time left; kept in ``plan.json``."""

    def __init__(self, path: Path, cfg: DemoConfig, t_start: float):
        self.path, self.cfg, self.t_start = path, cfg, t_start
        self.entries: dict = json.loads(path.read_text()) if path.is_file() else {}

    def step_s(self, name: str) -> float:
        return float(self.entries.get(name, {}).get("step_s") or 0.0)

    def steps(self, name: str, exp: ExperimentConfig, given: int | None, max_steps: int,
              available: Callable[[float, float], float]) -> int:
        """The steps of stage ``name``: ``given``, a resumed demo's choice, or fitted: the stage's step is
        timed, and ``available(seconds left in the budget, seconds per step)`` says what it may spend."""
        old = self.entries.get(name)
        if given is not None:
            entry = {"steps": int(given), "fitted": False}
        elif old is not None and (exp.out_dir and Path(exp.out_dir, "checkpoints").is_dir()
                                  or Path(exp.out_dir, "final").is_dir()):
            entry = old  # resuming a started stage: the same schedule
        else:
            step_s = measure_step_time(dataclasses.replace(exp, train=dataclasses.replace(
                exp.train, steps=max_steps)), steps=self.cfg.probe_steps)
            left = self.cfg.budget - (time.perf_counter() - self.t_start)
            plan_s = step_s * self.cfg.step_margin
            spend = available(left, plan_s)
            n, too_slow = fit_steps(spend, plan_s, max_steps, self.cfg.min_fraction)
            entry = {"steps": n, "fitted": True, "step_s": round(step_s, 4), "recipe_steps": max_steps,
                     "available_s": round(spend, 1), "too_slow": too_slow}
        self.entries[name] = entry
        fileio.write_json(self.path, self.entries)
        how = (f"fitted to the budget ({entry['step_s']:.3f} s/step measured, recipe {max_steps})"
               if entry.get("fitted") else "as given")
        log.info("demo %s: %d training steps, %s", name, entry["steps"], how)
        if entry.get("too_slow"):
            log.warning("demo %s: this machine is too slow for the %.0f s budget: training the floor of %d steps "
                        "(%.0f %% of the recipe); the demo will take longer", name, self.cfg.budget,
                        entry["steps"], 100 * self.cfg.min_fraction)
        return entry["steps"]

    def summary(self) -> dict:
        e = self.entries
        if self.cfg.pipeline == "sparse":
            grid = self.cfg.sparse_structure == "grid"
            repeat = ("--pipeline sparse" + (f" --sparse-structure grid --structure-steps {e['structure']['steps']}"
                                              if grid else "") + f" --dit-steps {e['dit']['steps']}")
        else:
            repeat = f"--vae-steps {e['vae']['steps']} --dit-steps {e['dit']['steps']}"
        return {**e, "budget_s": self.cfg.budget, "repeat": repeat}


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
    s = generate_dataset(path, per_class, seed, resolution=cfg.synth_resolution, classes=classes,
                         workers=cfg.workers, progress=progress)
    return {"written": s.get("written"), "skipped": s.get("skipped"), "objects": per_class * len(classes)}


def _prep_config(resolution: int, cfg: DemoConfig, sparse: bool = False) -> PreprocessConfig:
    # The offset surfaces even for the (closed) synthetic meshes: trained on the meshes as they are
    # (PreprocessConfig.keep_closed) the demo pair scored worse (BENCHMARKS.md). The sparse pipeline keeps them
    # as they are (its shipped VAE was trained so) and adds the band.
    if sparse:
        return PreprocessConfig(resolution=resolution, surface_points=cfg.surface_points, sharp_points=0,
                                sdf_points=cfg.sdf_points, keep_closed=True, sparse_res=cfg.sparse_res, seed=cfg.seed)
    return PreprocessConfig(resolution=resolution, surface_points=cfg.surface_points,
                            sharp_points=cfg.sharp_points, sdf_points=cfg.sdf_points, seed=cfg.seed)


def _preprocess(src: Path, dst: Path, resolution: int, cfg: DemoConfig, progress: bool, sparse: bool = False) -> dict:
    s = preprocess_dataset(src, dst, _prep_config(resolution, cfg, sparse), workers=cfg.workers, progress=progress)
    recs = read_manifest(dst)
    secs = [r["stats"].get("seconds", 0.0) for r in recs if r["status"] == "ok"]
    return {"ok": sum(r["status"] == "ok" for r in recs), "failed": sum(r["status"] == "failed" for r in recs),
            "new": s.ok + s.failed,
            "errors": [r["error"] for r in recs if r["status"] == "failed"],
            "run_seconds": round(s.seconds, 2), "median_object_seconds": float(np.median(secs)) if secs else None,
            "resolution": resolution}


def _data_preview(out: Path) -> str | None:
    """Watertight results of a few synthetic objects and every real mesh, rendered in a grid."""
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


def _experiment(config_name: str, out_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """A packaged demo config with the demo's overrides, writing to ``out_dir``."""
    return load_config(CONFIGS / config_name, [*overrides, f"out_dir={out_dir}"])


def _train(cfg: ExperimentConfig, steps: int) -> Path:
    """Train ``cfg`` for ``steps`` unless ``out_dir/final`` exists; resume an interrupted run."""
    out_dir = Path(cfg.out_dir)
    if (out_dir / "final" / "config.json").is_file():
        log.info("%s: already trained, skipping", out_dir)
        (out_dir / ".skipped").touch()
        return out_dir / "final"
    warmup = max(1, steps // 10)
    train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, warmup))
    if train.warmup_steps < cfg.train.warmup_steps:  # short runs would never reach the peak lr
        log.info("%s: %d steps: warm-up shortened from %d to %d steps", out_dir, steps, cfg.train.warmup_steps,
                 train.warmup_steps)
    run(dataclasses.replace(cfg, train=train), resume=(out_dir / "checkpoints").is_dir())
    return out_dir / "final"


def _generate(out: Path, dit_dir: Path, vae_dir: Path, classes: list[str], cfg: DemoConfig,
              structure_paths: tuple | None = None) -> dict:
    dit, dit_kind = load_dit(dit_dir)
    vae, vae_kind = load_vae(vae_dir)
    structure = load_structure(structure_paths) if structure_paths is not None else None
    labels = [c for c in classes for _ in range(cfg.gen_per_class)]
    cond = torch.tensor([classes.index(c) for c in labels])
    res = generate(dit, vae, dit_kind=dit_kind, vae_kind=vae_kind, num=len(labels), cond=cond, labels=labels,
                   steps=cfg.gen_steps, method=cfg.gen_method, cfg_scale=cfg.cfg_scale, seed=1000,
                   resolution=cfg.gen_resolution, smooth=cfg.gen_smooth, structure=structure)
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
            "steps": cfg.gen_steps, "method": cfg.gen_method,
            "resolution": cfg.sparse_res if structure is not None else cfg.gen_resolution, "smooth": cfg.gen_smooth}


def _eval_vae(out: Path, vae_dir: Path, cfg: DemoConfig, progress: bool) -> dict:
    split = "val" if len(ObjectFolder(out / "prep", split="val", val_fraction=0.1)) else "all"
    rows, summary = eval_vae(vae_dir, out / "prep", split=split, val_fraction=0.1, limit=cfg.eval_objects,
                             resolution=128, n_points=20_000, progress=progress)
    fileio.write_text(out / "vae_eval.md", format_table(rows, summary))
    return {**summary, "split": split}


def _eval_generation(out: Path, classes: list[str], cfg: DemoConfig, progress: bool) -> dict:
    """COV / MMD / 1-NNA (Chamfer) per class: generated meshes vs fresh synthetic shapes (seed 1, canonical frame)."""
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
    t = r["training"]
    lines += ["", "## Training", "", f"Fitted to a budget of {t['budget_s']:.0f} s for the whole run "
              "(the recipe where it fits; the steps are timed on this machine first):", "",
              "| model | steps | recipe | s / step (measured) | how |", "|---|---|---|---|---|"]
    sparse = r["config"].get("pipeline") == "sparse"
    models = ((("vae", "sparse SDF VAE"), ("structure", "stage 1 (structure)"), ("dit", "sparse DiT (stage 2)"))
              if sparse else (("vae", "VecSet VAE"), ("dit", "token DiT")))
    for name, label in models:
        e = t[name]
        how = ("fitted; **too slow for the budget: the floor**" if e.get("too_slow")
               else "fitted" if e.get("fitted") else "the shipped checkpoint, not trained here" if e.get("shipped")
               else "given")
        step_s = f"{e['step_s']:.3f}" if e.get("step_s") else "-"
        lines.append(f"| {label} | {e['steps']} | {e.get('recipe_steps', '-')} | {step_s} | {how} |")
    lines += ["", f"Repeat exactly: `shapeflow demo OUT {t['repeat']}`."]
    lines += ["", "## Data", ""]
    for key in ("preprocess", "preprocess_real"):
        if key in r:
            p = r[key]
            median = p["median_object_seconds"]
            lines.append(f"- `{key}`: {p['ok']} ok, {p['failed']} failed at {p['resolution']}^3"
                         + (f", median {median:.2f} s per object" if median is not None else ""))
            lines += [f"  - failed: {e}" for e in p["errors"]]
    if r.get("data_preview"):
        lines += ["", f"![watertight results]({r['data_preview']})"]
    v = r["vae_metrics"]
    held = "held-out" if v.get("split") == "val" else "all (no held-out split at this size)"
    lines += ["", f"## {'Sparse SDF' if sparse else 'VecSet'} VAE reconstruction ({held} synthetic objects)", "",
              f"{v['objects']} objects: volume IoU {v.get('iou', float('nan')):.3f}, "
              f"Chamfer-L1 {v.get('chamfer_l1', float('nan')):.4f}, F@1% {v.get('f_score@1%', float('nan')):.3f}, "
              f"normal consistency {v.get('normal_consistency', float('nan')):.3f} (table: vae_eval.md)"]
    g = r["generate"]
    lines += ["", "## Generation", "",
              f"{len(g['files'])} shapes ({g['empty']} empty), {g['steps']} {g['method'].capitalize()} steps, "
              f"guidance {g['cfg_scale']}, "
              f"decoded at {g['resolution']}^3; meshes in `generated/`.", "", "![generated](generated.png)", "",
              "Generation metrics against fresh synthetic shapes of each class (Chamfer on "
              f"{r['config']['metric_points']} points; 1-NNA ideal 50%):", "",
              "| class | COV | MMD (x1e3) | 1-NNA | clean | extra pieces |", "|---|---|---|---|---|---|"]
    for c, m in r["generation_metrics"].items():
        lines.append(f"| {c} | {m['COV-CD']:.2f} | {1e3 * m['MMD-CD']:.3f} | {m['1-NNA-CD']:.2f} | "
                     f"{m.get('clean', float('nan')):.2f} | {m.get('extra_components', float('nan')):.2f} |")
    n = r["config"]["gen_per_class"]
    spread = min(NNA_DATA_STD.items(), key=lambda kv: abs(kv[0] - n))
    lines += ["", f"With {n} shapes per class a per-class 1-NNA is a rough estimate: between two independent draws "
              f"of the synthetic data itself it has a standard deviation of about {spread[1]} points at "
              f"{spread[0]} shapes per class (BENCHMARKS.md); compare generators with "
              "`benchmarks/bench_generation.py quality --per-class 64`. \"clean\": the share of generated meshes "
              "that are one watertight piece; \"extra pieces\": the mean count of further components."]
    return "\n".join(lines) + "\n"
