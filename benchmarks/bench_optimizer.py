"""Optimizer step time on the ``tiny`` models: AdamW, torch's Muon and :class:`BatchedMuon`.

The split is the training loop's (``train.optimizer=muon``: block matrices to Muon, the rest to
AdamW), built by the loop's own ``_optimizer``; gradients are random (the step's cost does not depend
on their values). Each optimizer is timed in turn, twice, so drift on a shared machine shows.

Example::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_optimizer.py --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _models() -> dict[str, torch.nn.Module]:
    from shapeflow.models.dit import TokenDiT
    from shapeflow.models.vecset_vae import VecSetVAE

    classes = tuple(f"class{i}" for i in range(8))  # 8 classes: only the class-embedding size matters
    return {"tiny VecSet VAE": VecSetVAE.from_preset("tiny"),
            "tiny token DiT (class-conditional)": TokenDiT.from_preset("tiny", cond="class", classes=classes,
                                                                       in_channels=16)}


def _time(opt, repeats: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from shapeflow.train.experiment import TrainConfig
    from shapeflow.train.loop import _optimizer
    from shapeflow.train.muon import BatchedMuon

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print("| model | block matrices / other tensors | AdamW (all) | torch Muon + AdamW "
          "| BatchedMuon + AdamW |")
    print("|---|---|---|---|---|")
    for name, model in _models().items():
        torch.manual_seed(0)
        for p in model.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        cfg = TrainConfig(optimizer="muon", lr=1e-3)
        combined, _ = _optimizer(model, cfg)
        muon, adamw = combined.optimizers
        assert isinstance(muon, BatchedMuon)
        plain = torch.optim.Muon(muon.param_groups[0]["params"], **{k: v for k, v in muon.defaults.items()})
        adamw_all, _ = _optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
        rows = {"adamw": [], "torch": [], "batched": []}
        for _ in range(2):
            rows["adamw"].append(_time(adamw_all, args.repeats))
            a = _time(adamw, args.repeats)
            rows["torch"].append(_time(plain, args.repeats) + a)
            rows["batched"].append(_time(muon, args.repeats) + a)
        n_mat = len(muon.param_groups[0]["params"])
        n_other = sum(len(g["params"]) for g in adamw.param_groups)
        cells = " | ".join(" / ".join(f"{1e3 * t:.1f}" for t in rows[k]) + " ms"
                           for k in ("adamw", "torch", "batched"))
        print(f"| {name} | {n_mat} / {n_other} | {cells} |")
    print(f"\n(median of {args.repeats} steps, each measured twice; torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
