"""Sampler accuracy vs number of model evaluations (NFE): Euler, Heun and midpoint, with and without shift.

Two modes:

* ``analytic`` (default, needs nothing trained): the data distribution is a Gaussian mixture in ``--dim``
  dimensions, so the marginal rectified-flow velocity is known in closed form
  (``v(x, t) = sum_k w_k(x, t) [mu_k + (t s_k^2 - (1 - t)) / s_k(t)^2 (x - t mu_k)]`` with
  ``s_k(t)^2 = (1 - t)^2 + t^2 s_k^2`` and posterior weights ``w_k``). The reference endpoint of each
  noise sample is the midpoint solution with ``--ref-steps`` steps (its own convergence is printed).
  Reported per NFE: mean and median L2 distance of each sampler's endpoint to the reference, and the
  fraction of samples that end in a different mixture component than the reference ("mode flips":
  for a shape generator, a different shape).
* ``--dit CKPT`` (a trained generator, shapeflow checkpoint): the same table in the DiT's normalised
  latent space against a many-step reference of the same model (``--ref-steps``), optionally with
  classifier-free guidance (``--cfg``; class-conditional models cycle through the classes).
  # TODO(lead): decoded-shape quality (Chamfer / F-score of VAE-decoded meshes against the decoded
  # many-step reference, issue 5 section 5) needs the VAE decoder and the metrics module; wire it here
  # by decoding ``out`` and ``ref`` in ``run_dit`` once both exist.

Examples::

    .venv/bin/python benchmarks/bench_sampler.py
    .venv/bin/python benchmarks/bench_sampler.py --dit runs/demo/dit/final --tokens 128 --cfg 3 --num 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from shapeflow.sampling import num_evaluations, sample

METHODS = ("euler", "heun", "midpoint")


def gmm_velocity(means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
    """Exact marginal velocity of noise N(0, I) -> sum_k pi_k N(mu_k, s_k^2 I) on x_t = (1-t) n + t d."""

    def v(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        t = t.to(x.dtype)[:, None, None]  # (b, 1, 1)
        d = x.shape[-1]
        var = (1 - t) ** 2 + t**2 * stds[None, :, None] ** 2  # (b, k, 1)
        diff = x[:, None, :] - t * means[None]  # (b, k, d)
        logp = torch.log(weights)[None] - 0.5 * (diff.pow(2).sum(-1) / var[..., 0] + d * torch.log(var[..., 0]))
        w = torch.softmax(logp, dim=1)[..., None]  # (b, k, 1)
        vk = means[None] + (t * stds[None, :, None] ** 2 - (1 - t)) / var * diff  # (b, k, d)
        return (w * vk).sum(1)

    return v


def table(rows: list[dict]) -> str:
    """Markdown table: one row per (shift, NFE), one column per method with ``mean / median [/ flips]``."""
    flips = "flips" in rows[0]
    unit = "mean / median L2" + (" / mode flips" if flips else "")
    lines = ["| shift | NFE | " + " | ".join(f"{m} ({unit})" for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for shift in sorted({r["shift"] for r in rows}):
        for nfe in sorted({r["nfe"] for r in rows if r["shift"] == shift}):
            cells = []
            for m in METHODS:
                r = next((r for r in rows if r["shift"] == shift and r["nfe"] == nfe and r["method"] == m), None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['mean']:.2e} / {r['median']:.2e}"
                cells.append(cell + (f" / {100 * r['flips']:.1f}%" if flips else ""))
            lines.append(f"| {shift:g} | {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(v, noise, ref, nfes, shifts, sample_kwargs, mode_of=None) -> list[dict]:
    """Run every method at every NFE / shift; errors are per-sample L2 distances to ``ref``."""
    rows = []
    for shift in shifts:
        for nfe in nfes:
            for m in METHODS:
                steps = nfe if m == "euler" else nfe // 2
                if steps < 1 or num_evaluations(steps, m) != nfe:
                    continue
                t0 = time.perf_counter()
                out = sample(v, noise, steps=steps, method=m, shift=shift, **sample_kwargs)
                err = (out - ref).flatten(1).norm(dim=1)
                row = dict(shift=shift, nfe=nfe, method=m, steps=steps, mean=err.mean().item(),
                           median=err.median().item(), seconds=time.perf_counter() - t0)
                if mode_of is not None:  # fraction of samples that end in another mixture component
                    row["flips"] = (mode_of(out) != mode_of(ref)).double().mean().item()
                rows.append(row)
    return rows


def run_analytic(args) -> list[dict]:
    g = torch.Generator().manual_seed(args.seed)
    k, d = args.components, args.dim
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * 2.0
    stds = 0.1 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    v = gmm_velocity(means, stds, weights)
    noise = torch.randn(args.num, d, generator=g, dtype=torch.float64)
    ref = sample(v, noise, steps=args.ref_steps, method="midpoint")
    half = sample(v, noise, steps=args.ref_steps // 2, method="midpoint")
    print(f"reference: midpoint {args.ref_steps} steps; |ref - ref(half steps)| mean = "
          f"{(ref - half).flatten(1).norm(dim=1).mean().item():.2e}")

    def mode_of(x):  # nearest component mean, in units of its std
        return ((x[:, None] - means[None]).norm(dim=-1) / stds[None]).argmin(1)

    return sweep(v, noise, ref, args.nfe, args.shift, {}, mode_of)


def run_dit(args) -> list[dict]:
    from shapeflow.generate import latent_shape
    from shapeflow.models import load_dit

    model, kind = load_dit(args.dit)
    model.eval()
    cfg = model.config
    shape = (args.num, *latent_shape(model, kind, args.tokens))  # tokens: None = the DiT's trained count
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    kw: dict = {}
    if cfg.cond == "class":
        kw = dict(cond=torch.arange(args.num) % cfg.num_classes, null_cond=model.null_condition(args.num),
                  cfg_scale=args.cfg)
    elif cfg.cond == "image":
        raise SystemExit("image-conditional DiTs need condition images; not wired in this benchmark yet")
    with torch.inference_mode():
        ref = sample(model, noise, steps=args.ref_steps, method="midpoint", **kw)
        return sweep(model, noise, ref, args.nfe, args.shift, kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dit", help="trained DiT checkpoint; default: the analytic Gaussian-mixture field")
    p.add_argument("--tokens", type=int, default=None,
                   help="latent tokens for a TokenDiT (default: the count it was trained on, config.num_tokens)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale for conditional DiTs")
    p.add_argument("--num", type=int, default=2000, help="samples")
    p.add_argument("--dim", type=int, default=8, help="analytic: data dimension")
    p.add_argument("--components", type=int, default=6, help="analytic: mixture components")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--ref-steps", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    rows = run_dit(args) if args.dit else run_analytic(args)
    print(table(rows))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:  # benchmark output, not library I/O
            json.dump(rows, fh, indent=1)
    # equal-NFE summary: which second-order method wins, and by how much, per shift
    for shift in args.shift:
        for nfe in args.nfe:
            r = {m: next((x for x in rows if x["shift"] == shift and x["nfe"] == nfe and x["method"] == m), None)
                 for m in METHODS}
            if all(r.values()):
                print(f"shift {shift:g} NFE {nfe}: euler/heun error ratio {r['euler']['mean'] / r['heun']['mean']:.1f}, "
                      f"euler/midpoint {r['euler']['mean'] / r['midpoint']['mean']:.1f}")


if __name__ == "__main__":
    main()
