"""Grid VAE benchmarks (CPU): upsampling operators, loss choice, and the TRELLIS-size training step.

Parts (``--part``, default ``all``):

* ``upsample``: the same ``tiny`` decoder with pixel-shuffle (TRELLIS), transposed-conv (kernel 4,
  stride 2) and nearest+conv (resize-convolution) upsampling.

  - Data: the embedded procedural shapes (:mod:`shapeflow.geometry.synth`, 8 categories) as TRELLIS-style
    surface-shell occupancy on the ``--res``^3 cell grid: a voxel is occupied when
    ``|sdf(centre)| <= h * sqrt(3) / 2`` (half the voxel diagonal; with a 1-Lipschitz SDF every voxel the
    surface passes through is included, plus a few corner-grazing neighbours). Train and held-out sets use
    different seeds. (The preprocessed dataset of the data pipeline can replace this once it ships grids.)
  - Each variant trains ``--steps`` Adam steps (lr ``--lr``, batch ``--batch``, identical data order and
    seeds) with ``grid_vae_loss``; then on held-out shapes (posterior mean): occupancy IoU and two
    checkerboard measures of the decoded field:
    **nyquist** = share of the spectral energy (DC excluded) of ``p = sigmoid(logits)`` on the three
    Nyquist planes (period-2 patterns along an axis), divided by the same share of the ground truth
    (1 = as much period-2 content as the data; > 1 = extra alternating patterns);
    **parity** = spread (max - min) over the 8 voxel-parity classes ``(i % 2, j % 2, k % 2)`` of the mean
    logit in empty space at least 3 voxels from any occupied voxel, where the ideal output is constant:
    a stride-2 checkerboard shows up directly as a parity-dependent offset (logit units).
  - Speed: forward + backward time of one ``--time-batch`` batch at 64^3 per variant (random init,
    variants interleaved, median of ``--repeats``), plus FLOPs from ``FlopCounterMode``.

* ``loss``: the ``tiny`` pixel-shuffle model trained as above with ``dice``, ``bce`` and ``dice+bce``;
  held-out IoU of ``logits > 0``.

* ``trellis``: forward + backward of the TRELLIS-size model (``trellis`` preset, 133 M parameters) on
  b x 1 x 64^3 occupancy batches (``--trellis-batch``, several values allowed). FLOPs counted with
  ``FlopCounterMode`` at batch 1 (conv FLOPs are linear in the batch); achieved GFLOP/s against a
  2048^2 fp32 matmul measured before and after in the same run. Layout variants (all combinations
  interleaved, median of ``--trellis-repeats``): NCDHW activations (``channels_last=False``),
  ``channels_last_3d`` activations, and NCDHW with oneDNN disabled (``torch.backends.mkldnn``; PyTorch's
  native conv kernels); pick with ``--trellis-layouts``. Then the same NCDHW vs channels-last question
  for the ``tiny`` preset at batch 8 (low channel counts, where memory traffic dominates).

Usage::

    .venv/bin/python benchmarks/bench_grid_vae.py --part all --out bench_grid_vae.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from shapeflow.config import preset
from shapeflow.geometry import grid, synth
from shapeflow.models.grid_losses import grid_vae_loss, occupancy_iou
from shapeflow.models.grid_vae import GridVAE, GridVAEConfig

log = logging.getLogger("bench_grid_vae")


# ------------------------------------------------------------------------------------------------
# Data: surface-shell occupancy of the procedural shapes
# ------------------------------------------------------------------------------------------------


def shell_occupancy(shape: synth.Shape, res: int) -> np.ndarray:
    """(res, res, res) bool: voxels whose centre is within half a voxel diagonal of the surface."""
    d = shape.sdf(grid.cell_centers(res).astype(np.float64)).reshape(res, res, res)
    return np.abs(d) <= grid.spacing(res) * np.sqrt(3.0) / 2.0


def make_shells(res: int, per_class: int, seed: int) -> torch.Tensor:
    """(n, 1, res, res, res) float32 shells, ``per_class`` shapes of every synth category."""
    out = []
    for cat in synth.CATEGORIES:
        for i in range(per_class):
            out.append(shell_occupancy(synth.sample_shape(cat, synth.object_rng(seed, cat, i)), res))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Checkerboard measures
# ------------------------------------------------------------------------------------------------


def nyquist_share(field: torch.Tensor) -> torch.Tensor:
    """Per-sample share of spectral energy (DC excluded) on the Nyquist planes of a (b, r, r, r) field."""
    r = field.shape[-1]
    e = torch.fft.rfftn(field.double(), dim=(-3, -2, -1)).abs().square()  # (b, r, r, r//2+1)
    e[:, 0, 0, 0] = 0.0
    ny = torch.zeros(e.shape[1:], dtype=torch.bool)
    ny[r // 2, :, :] = True
    ny[:, r // 2, :] = True
    ny[:, :, r // 2] = True
    # rfft keeps half of the last axis: interior bins stand for two conjugate bins, edge bins for one.
    w = torch.full((e.shape[-1],), 2.0, dtype=torch.float64)
    w[0] = 1.0
    w[-1] = 1.0 if r % 2 == 0 else 2.0
    e = e * w
    return e[:, ny].sum(1) / e.flatten(1).sum(1).clamp_min(1e-30)


def parity_spread(logits: torch.Tensor, gt: torch.Tensor, margin: int = 3) -> torch.Tensor:
    """Per-sample max - min over the 8 parity classes of the mean logit in far empty space."""
    near = F.max_pool3d(gt, 2 * margin + 1, stride=1, padding=margin) > 0
    far = ~near[:, 0]
    lg = logits[:, 0]
    out = []
    for b in range(lg.shape[0]):
        means = []
        for a in range(2):
            for c in range(2):
                for d in range(2):
                    m = far[b, a::2, c::2, d::2]
                    means.append(lg[b, a::2, c::2, d::2][m].mean() if m.any() else torch.tensor(float("nan")))
        means = torch.stack(means)
        out.append(means.max() - means.min())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Training and timing helpers
# ------------------------------------------------------------------------------------------------


def train(cfg, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int
          ) -> tuple[GridVAE, float, float]:
    """Train from a fixed seed with a fixed data order; returns (model, seconds, last loss)."""
    torch.manual_seed(seed)
    model = GridVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(steps * batch // len(data) + 1)])
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        idx = order[s * batch : (s + 1) * batch]
        loss, logs = grid_vae_loss(model, {"grid": data[idx]}, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s % 50 == 0 or s == steps - 1:
            iou = logs["iou"].item() if "iou" in logs else float("nan")
            log.info("  step %d loss %.4f iou %.3f (%.0f s)", s, loss.item(), iou, time.perf_counter() - t0)
    return model.eval(), time.perf_counter() - t0, loss.item()


@torch.no_grad()
def evaluate(model: GridVAE, data: torch.Tensor) -> dict:
    ious, nys, nys_gt, pars = [], [], [], []
    for i in range(0, len(data), 8):
        x = data[i : i + 8]
        logits = model.decode(model.encode(x).mode())
        ious.append(occupancy_iou(logits, x))
        nys.append(nyquist_share(torch.sigmoid(logits[:, 0])))
        nys_gt.append(nyquist_share(x[:, 0]))
        pars.append(parity_spread(logits, x))
    ny, ny_gt = torch.cat(nys), torch.cat(nys_gt)
    return {
        "iou": torch.cat(ious).mean().item(),
        "nyquist_share": ny.mean().item(),
        "nyquist_share_gt": ny_gt.mean().item(),
        "nyquist_ratio": (ny / ny_gt).mean().item(),
        "parity_spread_logit": torch.cat(pars).nanmean().item(),
    }


def fwd_bwd(model: GridVAE, x: torch.Tensor) -> None:
    out, post = model(x, sample_posterior=False)
    (out.float().mean() + post.kl().mean()).backward()


def count_flops(model: GridVAE, x: torch.Tensor) -> tuple[float, float]:
    """(fwd+bwd FLOPs, seconds of that counted run)."""
    t = time.perf_counter()
    with FlopCounterMode(display=False) as fc:
        fwd_bwd(model, x)
    return float(fc.get_total_flops()), time.perf_counter() - t


def interleaved_times(runs: dict, repeats: int) -> dict:
    """``runs``: name -> zero-arg callable. Calls them round-robin ``repeats`` times; median seconds."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            log.info("  %s %.2f s", k, times[k][-1])
    return {k: {"median_s": statistics.median(v), "all_s": [round(s, 3) for s in v]}
            for k, v in times.items()}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------


def part_upsample(args, train_x, test_x) -> dict:
    res = {}
    for mode in ("pixel_shuffle", "transpose", "nearest"):
        cfg = preset(GridVAEConfig, "tiny", resolution=args.res, upsample=mode)
        log.info("upsample=%s: training %d steps", mode, args.steps)
        model, secs, last = train(cfg, train_x, args.steps, args.batch, args.lr, args.seed)
        res[mode] = {"train_s": secs, "final_loss": last,
                     "params": sum(p.numel() for p in model.parameters()), **evaluate(model, test_x)}
        log.info("  %s", res[mode])
    # speed at 64^3 (random init; the operator cost does not depend on the weights)
    x = make_shells(64, 1, args.seed + 7)[: args.time_batch]
    models = {m: GridVAE(preset(GridVAEConfig, "tiny", upsample=m)) for m in res}
    for m, model in models.items():
        res[m]["flops_fwd_bwd_64"], _ = count_flops(model, x)
    timing = interleaved_times({m: (lambda mm=mm: fwd_bwd(mm, x)) for m, mm in models.items()}, args.repeats)
    for m in res:
        res[m]["fwd_bwd_64_s"] = timing[m]
    return res


def part_loss(args, train_x, test_x, reuse: dict | None) -> dict:
    res = {}
    for loss in ("dice", "bce", "dice+bce"):
        if loss == "dice+bce" and reuse is not None:
            res[loss] = {"iou": reuse["iou"], "train_s": reuse["train_s"], "reused": "upsample/pixel_shuffle"}
            continue
        cfg = preset(GridVAEConfig, "tiny", resolution=args.res, loss=loss)
        log.info("loss=%s: training %d steps", loss, args.steps)
        model, secs, last = train(cfg, train_x, args.steps, args.batch, args.lr, args.seed)
        ev = evaluate(model, test_x)
        res[loss] = {"iou": ev["iou"], "train_s": secs, "final_loss": last}
        log.info("  %s", res[loss])
    return res


def part_trellis(args) -> dict:
    batches = sorted(set(args.trellis_batch))
    xs = make_shells(64, 1, args.seed + 11)  # (8, 1, 64, 64, 64)
    out = {"batches": batches, "load_before": load(), "matmul_2048_gflops_before": matmul_gflops()}
    torch.manual_seed(0)
    base = GridVAE(preset(GridVAEConfig, "trellis", channels_last=False))
    cl = GridVAE(preset(GridVAEConfig, "trellis", channels_last=True))
    cl.load_state_dict(base.state_dict())
    # conv FLOPs are linear in the batch: count once at batch 1
    flops1, secs = count_flops(cl, xs[:1])
    out.update(flops_fwd_bwd_per_sample=flops1, counted_run_s=secs,
               params=sum(p.numel() for p in base.parameters()))

    def make(layout: str, x: torch.Tensor):
        if layout == "ncdhw_no_mkldnn":
            def fn():
                with torch.backends.mkldnn.flags(enabled=False):
                    fwd_bwd(base, x)
            return fn
        model = cl if layout == "channels_last_3d" else base
        return lambda: fwd_bwd(model, x)

    runs = {f"{layout}_b{b}": make(layout, xs[:b]) for b in batches for layout in args.trellis_layouts}
    timing = interleaved_times(runs, args.trellis_repeats)
    out["matmul_2048_gflops_after"] = matmul_gflops()
    mm = (out["matmul_2048_gflops_before"] + out["matmul_2048_gflops_after"]) / 2
    for k, v in timing.items():
        b = int(k.rsplit("_b", 1)[1])
        v["gflops"] = b * flops1 / v["median_s"] / 1e9
        v["share_of_matmul"] = v["gflops"] / mm
        v["s_per_sample"] = v["median_s"] / b
    out["layouts"] = timing
    # the same layout question for the tiny preset (low channel counts, where memory traffic dominates)
    xt = make_shells(64, 1, args.seed + 13)  # (8, 1, 64, 64, 64): one shape per category
    tiny_nc = GridVAE(preset(GridVAEConfig, "tiny", channels_last=False))
    tiny_cl = GridVAE(preset(GridVAEConfig, "tiny", channels_last=True))
    tiny_cl.load_state_dict(tiny_nc.state_dict())
    tiny_flops, _ = count_flops(tiny_cl, xt)
    runs = {"ncdhw": lambda: fwd_bwd(tiny_nc, xt), "channels_last_3d": lambda: fwd_bwd(tiny_cl, xt)}
    tiny = interleaved_times(runs, args.repeats + 2)
    for v in tiny.values():
        v["gflops"] = tiny_flops / v["median_s"] / 1e9
    out["tiny_batch8_layouts"] = tiny
    out["load_after"] = load()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "train", "upsample", "loss", "trellis"], default="all",
                   help="train = upsample + loss")
    p.add_argument("--res", type=int, default=32, help="grid resolution for the training comparisons")
    p.add_argument("--train-per-class", type=int, default=8)
    p.add_argument("--test-per-class", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trellis-batch", type=int, nargs="+", default=[1])
    p.add_argument("--trellis-repeats", type=int, default=2)
    p.add_argument("--trellis-layouts", nargs="+", default=["ncdhw", "channels_last_3d", "ncdhw_no_mkldnn"],
                   choices=["ncdhw", "channels_last_3d", "ncdhw_no_mkldnn"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_start": load(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.part in ("all", "train", "upsample", "loss"):
        t = time.perf_counter()
        train_x = make_shells(args.res, args.train_per_class, seed=args.seed)
        test_x = make_shells(args.res, args.test_per_class, seed=args.seed + 1000)
        result["data"] = {"train": len(train_x), "test": len(test_x), "res": args.res,
                          "occupied_share": train_x.mean().item(), "seconds": time.perf_counter() - t}
        if args.part in ("all", "train", "upsample"):
            result["upsample"] = part_upsample(args, train_x, test_x)
        if args.part in ("all", "train", "loss"):
            reuse = result.get("upsample", {}).get("pixel_shuffle")
            result["loss"] = part_loss(args, train_x, test_x, reuse)
    if args.part in ("all", "trellis"):
        result["trellis"] = part_trellis(args)
    result["load_end"] = load()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from shapeflow.fileio import write_text

        write_text(args.out, text)


if __name__ == "__main__":
    main()
