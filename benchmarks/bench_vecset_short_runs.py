"""Short VecSet VAE training runs for comparing variants on a fixed CPU budget (issue 3, quality).

Each run trains the ``tiny`` preset for ``--steps`` steps with occupancy BCE (the shipped objective),
AdamW (betas 0.9 / 0.99, no weight decay), the engine's warm-up + cosine schedule to 1e-5, gradient
clipping 1.0, on one thread by default (so two variants can run side by
side on a 2-core machine), and prints the held-out volume IoU (posterior mean, uniform queries and
near-surface queries) every ``--eval-every`` steps. ``--diagnose`` adds, at the end, how much the decoder
uses its latents (IoU when every shape is decoded with another shape's tokens, and with the mean token)
and how spread the geometry decoder's cross-attention is (entropy vs the uniform ``log m``).

    python benchmarks/bench_vecset_short_runs.py data/prep --name bs2 --batch 2 --lr 1e-3 --steps 2400
    python benchmarks/bench_vecset_short_runs.py data/prep --name pi --batch 2 --lr 1e-3 --steps 2400 \\
        --model '{"include_pi": true}' --diagnose
    python benchmarks/bench_vecset_short_runs.py data/prep --name posbias --batch 8 --lr 2e-3 --steps 600 \\
        --model '{"position_bias": true}' --diagnose

The ``tiny`` preset has the position-biased decoder since 2026-11-26; the earlier rows of BENCHMARKS.md
(plain decoder) are reproduced with ``--model '{"position_bias": false}'``.

Variants: ``--model`` / ``--loss`` take JSON overrides of :class:`VecSetVAEConfig` /
:class:`VecSetLossConfig`; ``--mean-steps N`` decodes the posterior mean for the first N steps, then samples;
``--dilate D --dilate-steps S`` trains on the offset surface ``sdf = D``
shrinking linearly to 0 over S steps (a coarse-to-fine curriculum). Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch

from shapeflow.config import preset
from shapeflow.data.datasets import VecSetDataset
from shapeflow.metrics import volume_iou
from shapeflow.models.vecset_losses import VecSetLossConfig, vecset_vae_loss
from shapeflow.models.vecset_vae import VecSetVAE, VecSetVAEConfig
from shapeflow.train.experiment import TrainConfig
from shapeflow.train.loop import lr_at


def _batches(ds: VecSetDataset, size: int) -> list[dict]:
    out = []
    for i in range(0, len(ds), size):
        items = [ds[j] for j in range(i, min(i + size, len(ds)))]
        out.append({k: torch.stack([it[k] for it in items]) for k in ("surface", "points", "sdf", "groups")})
    return out


def _iou(pred_inside: torch.Tensor, gt_inside: torch.Tensor) -> float:
    return volume_iou(pred_inside.numpy(), gt_inside.numpy())


@torch.no_grad()
def evaluate(model: VecSetVAE, batches: list[dict]) -> tuple[float, float]:
    """Mean per-shape IoU of ``field < 0`` vs ``sdf < 0`` on uniform and on near-surface queries."""
    model.eval()
    scores: dict[int, list[float]] = {0: [], 1: []}
    for b in batches:
        z = model.encode(b["surface"], generator=torch.Generator().manual_seed(0)).mode()
        field = model.query(b["points"], model.decode(z))
        for i in range(len(field)):
            for g, mask in ((0, b["groups"][i] == 0), (1, b["groups"][i] > 0)):
                scores[g].append(_iou(field[i][mask] < 0, b["sdf"][i][mask] < 0))
    model.train()
    return float(np.mean(scores[0])), float(np.mean(scores[1]))


@torch.no_grad()
def diagnose(model: VecSetVAE, batch: dict) -> dict[str, float]:
    """Latent use and attention spread of a trained model on one held-out batch (uniform queries)."""
    model.eval()
    uni = batch["groups"] == 0
    post = model.encode(batch["surface"], generator=torch.Generator().manual_seed(0))
    tokens = model.decode(post.mode())

    def iou_with(tok: torch.Tensor) -> float:
        field = model.query(batch["points"], tok)
        return float(np.mean([_iou(field[i][uni[i]] < 0, batch["sdf"][i][uni[i]] < 0)
                              for i in range(len(field))]))

    sdf = batch["sdf"]
    gt_swapped = float(np.mean([_iou(sdf.roll(1, 0)[i][uni[i]] < 0, sdf[i][uni[i]] < 0)
                                for i in range(len(sdf))]))
    geo = model.geo_decoder
    k, _, pos = geo.context(tokens)
    q = geo.cross_attn.queries(geo.query_proj(model.fourier(batch["points"])))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, q, m)
    if pos is not None:  # position-bias models: the distance penalty is part of the logits
        d2 = torch.cdist(batch["points"], pos)[:, None] ** 2  # (b, 1, q, m)
        logits = logits - geo.pos_log_weight.exp()[None, :, None, None] * d2
    attn = torch.softmax(logits, dim=-1)
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean().item()
    return {"iou_own": iou_with(tokens), "iou_other_shapes_tokens": iou_with(tokens.roll(1, 0)),
            "iou_gt_vs_other_gt": gt_swapped,
            "iou_mean_token": iou_with(tokens.mean(1, keepdim=True).expand_as(tokens)),
            "attn_entropy": entropy, "attn_entropy_uniform": math.log(k.shape[2]),
            "attn_max_weight": attn.max(-1).values.mean().item(),
            "posterior_std": post.std.mean().item(), "posterior_mean_abs": post.mean.abs().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a `shapeflow preprocess` folder")
    ap.add_argument("--name", default="run")
    ap.add_argument("--model", default="{}", help="JSON overrides of the tiny VecSetVAEConfig")
    ap.add_argument("--loss", default="{}", help="JSON overrides of VecSetLossConfig (occupancy BCE base)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--fractions", default="0.5,0.1,0.4", help="uniform, near fine, near coarse")
    ap.add_argument("--mean-steps", type=int, default=0,
                    help="decode the posterior mean (no sampling) for the first N steps")
    ap.add_argument("--dilate", type=float, default=0.0)
    ap.add_argument("--dilate-steps", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diagnose", action="store_true")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as the `shapeflow` command does (BENCHMARKS.md, VecSet third round)
    try:
        model_overrides, loss_overrides = json.loads(args.model), json.loads(args.loss)
    except json.JSONDecodeError as err:
        ap.error(f"--model / --loss must be JSON objects: {err}")

    torch.set_num_threads(args.threads)
    # encoder input 2048 + 512 points per shape (configs/vecset_vae_tiny.yaml) unless --model sets them
    model_cfg = preset(VecSetVAEConfig, "tiny", **{"surface_points": 2048, "sharp_points": 512, **model_overrides})
    common = dict(surface_points=model_cfg.surface_points, sharp_points=model_cfg.sharp_points, val_fraction=0.1,
                  split_seed=0)
    fractions = tuple(float(x) for x in args.fractions.split(","))
    train = VecSetDataset(args.root, split="train", n_queries=args.queries, query_fractions=fractions, **common)
    torch.manual_seed(123)  # fixed held-out queries for every variant
    val = _batches(VecSetDataset(args.root, split="val", n_queries=4096, query_fractions=(0.5, 0.25, 0.25),
                                 **common), 8)
    torch.manual_seed(args.seed)
    model = VecSetVAE(model_cfg)
    loss_cfg = VecSetLossConfig(**{"kind": "occupancy", "group_weights": (1.0, 1.0, 1.0), "kl_weight": 1e-3,
                                   **loss_overrides})
    mean_cfg = dataclasses.replace(loss_cfg, sample_posterior=False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = TrainConfig(steps=args.steps, lr=args.lr, min_lr=1e-5, warmup_steps=args.warmup)

    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=1, persistent_workers=True)
    t0, step = time.time(), 0
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule)
            delta = args.dilate * max(0.0, 1.0 - step / args.dilate_steps)
            if delta > 0:
                batch = dict(batch, sdf=batch["sdf"] - delta)
            loss, _ = vecset_vae_loss(model, batch, mean_cfg if step < args.mean_steps else loss_cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                iou_u, iou_n = evaluate(model, val)
                print(f"{args.name} step {step} {time.time() - t0:.0f}s iou_uniform {iou_u:.4f} "
                      f"iou_near {iou_n:.4f}", flush=True)
    if args.diagnose:
        print(args.name, json.dumps({k: round(v, 4) for k, v in diagnose(model, val[0]).items()}))


if __name__ == "__main__":
    main()
