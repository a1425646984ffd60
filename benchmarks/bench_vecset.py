"""VecSet VAE benchmarks (CPU): volume decoding, a base training step, tiny encode + decode.

Parts (``--part``, default ``all``):

* ``decode``: hierarchical vs dense decoding at 256^3.
  - ``base``: the base preset (random init) evaluated at every query, on the field
    ``torus_sdf(p) + 0.005 * net(p)`` so there is a real surface (a random net has none) and every query
    pays the base decoder's cost. Hierarchical runs in full; dense runs ``--dense-chunks`` chunks and its
    time is extrapolated linearly to all ``257^3`` nodes (every dense chunk does identical work; a full
    base dense decode would take about half an hour on this CPU).
  - ``tiny``: a tiny model briefly trained (``--train-steps``) to reconstruct a torus; both strategies run
    in full at 256^3 and the meshes are compared (Chamfer-L1, Euler characteristic, components).
* ``train``: one base training step (forward + backward + AdamW) on CPU; FLOPs counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (plus SDPA, which it does not count on CPU), divided by
  the step time, against a 2048^2 fp32 matmul measured in the same run.
* ``tiny``: encode + decode (hierarchical, 128^3, marching cubes) of one shape with the trained tiny model.
* ``tiny-real``: the same encode + decode timing for trained checkpoints (``--ckpt``, repeatable) on the
  first ``--objects`` held-out objects of a preprocessed folder (``--data``), so a plain and a
  position-biased decoder are timed on the same shapes in one run; float32 denormals are flushed as
  the ``shapeflow`` command does.
* ``hier-real``: dense vs hierarchical decoding of the first ``--ckpt`` on ``--objects`` held-out real
  shapes of ``--data`` at ``--res``: the default (surface tracing, no final dilation) against the
  untraced FlashVDM-style setting (final dilation 1); queries, field time (interleaved), Chamfer-L1 of
  the marching-cubes vertices to the dense mesh's, and whether the largest connected component is
  the dense one's (trained tiny models leave small floaters, which a coarse level can miss).
* ``tiny-step``: one tiny training step (batch 8 of ``--data``, the shipped truncated-SDF loss), the plain
  and the position-biased decoder (or the ``--variant NAME=JSON`` tiny overrides), each under every
  ``--precision`` (fp32, or bf16 autocast as ``train.precision=bf16``), interleaved, median of
  ``--repeats``.
* ``mem``: peak RSS of a chunked dense 256^3 decode with the base preset, in a fresh subprocess
  (``--mem-chunks`` chunks; memory is at steady state after the first chunk).

Usage::

    .venv/bin/python benchmarks/bench_vecset.py --part all --out bench_vecset.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from shapeflow.decode import VecSetField, dense_field, field_to_mesh, hierarchical_field, reconstruct_mesh
from shapeflow.models.vecset_losses import VecSetLossConfig, vecset_vae_loss
from shapeflow.models.vecset_vae import VecSetVAE

R_MAJOR, R_MINOR = 0.5, 0.2


# ------------------------------------------------------------------------------------------------
# An analytic shape: torus around z
# ------------------------------------------------------------------------------------------------


def torus_sdf(p: torch.Tensor) -> torch.Tensor:
    q = torch.stack([torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - R_MAJOR, p[..., 2]], dim=-1)
    return q.norm(dim=-1) - R_MINOR


def torus_surface(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 7) area-uniform surface samples [xyz, outward normal, sharp flag 0]."""
    u = torch.rand(4 * n, generator=g) * 2 * math.pi
    v = torch.rand(4 * n, generator=g) * 2 * math.pi
    keep = torch.rand(4 * n, generator=g) < (R_MAJOR + R_MINOR * torch.cos(v)) / (R_MAJOR + R_MINOR)
    u, v = u[keep][:n], v[keep][:n]
    normal = torch.stack([torch.cos(v) * torch.cos(u), torch.cos(v) * torch.sin(u), torch.sin(v)], -1)
    centre = torch.stack([R_MAJOR * torch.cos(u), R_MAJOR * torch.sin(u), torch.zeros_like(u)], -1)
    return torch.cat([centre + R_MINOR * normal, normal, torch.zeros(n, 1)], dim=-1)


def torus_batch(b: int, n: int, q: int, g: torch.Generator) -> dict:
    surface = torch.stack([torus_surface(n, g) for _ in range(b)])
    uni = torch.rand(b, q // 2, 3, generator=g) * 2 - 1
    base = torch.stack([torus_surface(q - q // 2, g)[:, :3] for _ in range(b)])
    sigma = torch.where(torch.arange(q - q // 2) % 2 == 0, 0.005, 0.05)[None, :, None]
    near = base + sigma * torch.randn(base.shape, generator=g)
    points = torch.cat([uni, near], dim=1)
    groups = torch.cat([torch.zeros(b, q // 2), 1 + (torch.arange(q - q // 2) % 2).expand(b, -1)], 1)
    return dict(surface=surface, points=points, sdf=torus_sdf(points), groups=groups.to(torch.uint8))


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()))


def topology(v, f) -> tuple[int, int]:
    import trimesh

    m = trimesh.Trimesh(v, f, process=True)
    return int(m.euler_number), len(m.split(only_watertight=False))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------


def train_tiny(steps: int, seed: int = 0) -> VecSetVAE:
    """Overfit the tiny preset to the torus (one thread: small ops gain nothing from a second one, and
    OpenMP barriers stall when the other core is busy with someone else's job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(steps: int, seed: int) -> VecSetVAE:
    torch.manual_seed(seed)
    model = VecSetVAE.from_preset("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    cfg = VecSetLossConfig()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * cosine
        loss, logs = vecset_vae_loss(model, torus_batch(4, 2048, 4096, g), cfg, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    logs = {k: float(v) for k, v in logs.items()}  # 0-d tensors
    print(f"tiny trained {steps} steps in {time.perf_counter() - t0:.1f}s; last logs {logs}", flush=True)
    return model.eval()


def bench_decode_tiny(model: VecSetVAE, res: int) -> dict:
    g = torch.Generator().manual_seed(1)
    surface = torus_surface(4096, g)
    with torch.no_grad():
        from shapeflow.decode import encode_surface

        z = encode_surface(model, surface)
        fn = VecSetField(model, model.decode(z))
        hier, sh = hierarchical_field(fn, res)
        dense, sd = dense_field(fn, res)
    known = ~np.isnan(hierarchical_field(fn, res, fill="nan")[0])
    v_d, f_d = field_to_mesh(dense, sd)
    v_h, f_h = field_to_mesh(hier, sh)
    return dict(
        model="tiny (trained on a torus)", resolution=res, levels=list(sh.levels),
        dense_queries=sd.queries, hier_queries=sh.queries, query_ratio=sd.queries / sh.queries,
        dense_s=sd.seconds, hier_s=sh.seconds, time_ratio=sd.seconds / sh.seconds,
        max_abs_diff_evaluated=float(np.abs(hier[known] - dense[known]).max()),
        chamfer_dense_vs_hier=chamfer(v_d, v_h), topology_dense=topology(v_d, f_d),
        topology_hier=topology(v_h, f_h),
        chamfer_vs_true_torus=chamfer(v_h, torus_surface(100_000, g)[:, :3].numpy()),
        faces=len(f_h),
    )


def bench_decode_base(res: int, dense_chunks: int, chunk: int) -> dict:
    torch.manual_seed(0)
    model = VecSetVAE.from_preset("base").eval()
    torch.nn.init.normal_(model.geo_decoder.output_proj.weight, std=1.0 / math.sqrt(model.config.width))
    with torch.no_grad():
        tokens = model.decode(torch.randn(1, model.config.num_tokens, model.config.latent_channels))
    net = VecSetField(model, tokens)

    def fn(p):
        return torus_sdf(p) + 0.005 * net(p)

    hier, sh = hierarchical_field(fn, res, chunk_size=chunk)
    v_h, f_h = field_to_mesh(hier, sh)
    # dense: time `dense_chunks` full chunks of the dense traversal, extrapolate to (res + 1)^3 nodes
    calls = {"n": 0}

    class _Stop(Exception):
        pass

    def counted(p):
        if calls["n"] == dense_chunks:
            raise _Stop
        calls["n"] += 1
        return fn(p)

    t0 = time.perf_counter()
    try:
        dense_field(counted, res, chunk_size=chunk)
    except _Stop:
        pass
    t_part = time.perf_counter() - t0
    dense_q = (res + 1) ** 3
    dense_s = t_part / (dense_chunks * chunk) * dense_q
    return dict(
        model="base (random init), field = torus_sdf + 0.005 * net", resolution=res, levels=list(sh.levels),
        dense_queries=dense_q, hier_queries=sh.queries, query_ratio=dense_q / sh.queries,
        hier_s=sh.seconds, dense_s_extrapolated=dense_s, dense_measured_queries=dense_chunks * chunk,
        dense_measured_s=t_part, time_ratio=dense_s / sh.seconds, hier_queries_per_s=sh.queries / sh.seconds,
        dense_queries_per_s=dense_chunks * chunk / t_part, topology_hier=topology(v_h, f_h),
        chamfer_hier_vs_true_torus=chamfer(
            v_h, torus_surface(100_000, torch.Generator().manual_seed(2))[:, :3].numpy()),
    )


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_train_base(batch: int, surface_points: int, n_query: int, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    torch.manual_seed(0)
    model = VecSetVAE.from_preset("base")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = torus_batch(batch, surface_points, n_query, g)
    cfg = VecSetLossConfig()

    def step():
        loss, _ = vecset_vae_loss(model, data, cfg, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda go, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(go, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()  # also the warm-up
    flops = counter.get_total_flops()
    # The machine is shared: measure the matmul rate right before and after every step and compare
    # each step with the mean of its two neighbours.
    rows = []
    mm_prev = matmul_rate()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t = time.perf_counter() - t0
        mm_next = matmul_rate()
        mm = 0.5 * (mm_prev + mm_next)
        rows.append(dict(step_s=t, achieved_gflops=flops / t / 1e9, matmul_gflops=mm,
                         fraction=flops / t / 1e9 / mm))
        mm_prev = mm_next
    best = max(rows, key=lambda r: r["achieved_gflops"])
    return dict(model="base", params=sum(p.numel() for p in model.parameters()), batch=batch,
                surface_points=surface_points, query_points=n_query, num_tokens=model.config.num_tokens,
                gflop_per_step=flops / 1e9, steps=rows,
                median_fraction_of_matmul=statistics.median(r["fraction"] for r in rows),
                best_step=best)


def bench_tiny_recon(model: VecSetVAE, res: int, reps: int = 3) -> dict:
    surface = torus_surface(4096, torch.Generator().manual_seed(3)).numpy()
    out = {}
    for strategy in ("hierarchical", "dense"):
        times = []
        for _ in range(reps if strategy == "hierarchical" else 1):
            t0 = time.perf_counter()
            v, f, stats = reconstruct_mesh(model, surface, res, strategy=strategy)
            times.append(time.perf_counter() - t0)
        out[strategy] = dict(total_s=statistics.median(times), all_s=times,
                             encode_s=stats.extra["seconds_encode"], field_s=stats.seconds,
                             mesh_s=stats.seconds_mesh, queries=stats.queries, faces=len(f))
    return dict(model="tiny (trained on a torus)", resolution=res, surface_points=len(surface), **out)


def bench_tiny_real(ckpts: list[str], data: str, objects: int, reps: int = 3) -> dict:
    from shapeflow.data.datasets import ObjectFolder
    from shapeflow.evaluate import reconstruct_object

    folder = ObjectFolder(data, split="val", val_fraction=0.1, split_seed=0)
    dirs = [folder.object_dir(i) for i in range(min(objects, len(folder)))]
    # encoder input 4096 + 1024 points for every checkpoint (the timings of BENCHMARKS.md), not each one's own
    models = {c: VecSetVAE.from_pretrained(c, surface_points=4096, sharp_points=1024).eval() for c in ckpts}
    out = {c: {"total_s": [], "encode_s": [], "decode_s": []} for c in ckpts}
    for d in dirs:
        for _ in range(reps):
            for c, model in models.items():  # interleaved, so machine noise hits every model alike
                t0 = time.perf_counter()
                r = reconstruct_object(model, "vecset_vae", d, resolution=128, with_metrics=False)
                out[c]["total_s"].append(time.perf_counter() - t0)
                out[c]["encode_s"].append(r["metrics"]["encode_s"])
                out[c]["decode_s"].append(r["metrics"]["decode_s"])
    return {c: dict(position_bias=models[c].config.position_bias, objects=len(dirs), repeats=reps,
                    **{f"median_{k}": statistics.median(v) for k, v in t.items()},
                    max_total_s=max(t["total_s"])) for c, t in out.items()}


def bench_hier_real(ckpt: str, data: str, objects: int, res: int) -> dict:
    import trimesh

    from shapeflow.data.datasets import ObjectFolder
    from shapeflow.decode import encode_surface
    from shapeflow.evaluate import encoder_input
    from shapeflow.geometry.marching_cubes import marching_cubes

    def parts(v, f):
        return sorted((len(p.faces) for p in trimesh.Trimesh(v, f, process=False).split(only_watertight=False)),
                      reverse=True)

    variants = {"traced": dict(), "untraced_dil1": dict(trace=False, final_dilation=1)}
    folder = ObjectFolder(data, split="val", val_fraction=0.1, split_seed=0)
    model = VecSetVAE.from_pretrained(ckpt, surface_points=4096, sharp_points=1024).eval()  # encoder input
    rows = {k: [] for k in ("dense", *variants)}
    for i in range(min(objects, len(folder))):
        x = encoder_input(model, "vecset_vae", folder.object_dir(i))
        with torch.no_grad():
            fn = VecSetField(model, model.decode(encode_surface(model, x[0])))
            dense, sd = dense_field(fn, res)
            v_d, f_d = marching_cubes(dense)
            p_d = parts(v_d, f_d)
            rows["dense"].append(dict(queries=sd.queries, seconds=sd.seconds, parts=len(p_d)))
            for name, kw in variants.items():
                field, st = hierarchical_field(fn, res, **kw)
                v, f = marching_cubes(field)
                p = parts(v, f)
                rows[name].append(dict(queries=st.queries, seconds=st.seconds, chamfer_to_dense=chamfer(v_d, v),
                                       same_largest_part=p[0] == p_d[0], parts=len(p),
                                       missed_faces=len(f_d) - len(f)))
    out = {}
    for name, r in rows.items():
        out[name] = {k: float(np.mean([x[k] for x in r])) for k in r[0]}
        if name != "dense":
            out[name]["max_chamfer_to_dense"] = max(x["chamfer_to_dense"] for x in r)
            out[name]["query_ratio_dense"] = out["dense"]["queries"] / out[name]["queries"]
    return dict(ckpt=ckpt, objects=len(rows["dense"]), resolution=res, **out)


def bench_tiny_step(data: str, reps: int, variants: dict[str, dict] | None = None,
                    precisions: tuple[str, ...] = ("fp32",)) -> dict:
    """Median fwd + bwd time of one tiny training step per model variant (tiny preset overrides) and
    precision, all interleaved so a shared machine's drift hits them alike; ratios to the first."""
    from shapeflow.data.datasets import VecSetDataset

    variants = variants or {"plain": {"position_bias": False}, "position_bias": {}}
    ds = VecSetDataset(data, split="train", n_queries=2048, query_fractions=(0.5, 0.1, 0.4), surface_points=2048,
                       sharp_points=512, val_fraction=0.1, split_seed=0)
    items = [ds[i] for i in range(8)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("surface", "points", "sdf", "groups")}
    cfg = VecSetLossConfig(kind="sdf", truncation=0.05, group_weights=(1.0, 2.0, 1.0))  # vecset_vae_tiny.yaml
    models = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        models[name] = VecSetVAE.from_preset("tiny", **overrides)
        torch.nn.init.normal_(models[name].geo_decoder.output_proj.weight, std=0.01)
    runs = {(f"{name}/{p}" if len(precisions) > 1 else name): (model, p)
            for name, model in models.items() for p in precisions}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps + 1):
        for name, (model, precision) in runs.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = vecset_vae_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
            loss.backward()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}  # the first step warms up
    first = next(iter(med))
    return dict(batch=8, variants=variants, precisions=list(precisions), median_s=med,
                ratio={n: med[n] / med[first] for n in med}, all_s={n: t[1:] for n, t in times.items()})


def bench_mem_child(res: int, chunks: int, chunk: int, strategy: str) -> dict:
    """Run in a fresh process: RSS after building base, then peak RSS during a chunked decode
    (dense: the first ``chunks`` chunks, memory is at steady state after the first; hierarchical: in full,
    on the torus + net field of the decode benchmark)."""
    torch.manual_seed(0)
    model = VecSetVAE.from_preset("base").eval()
    with torch.no_grad():
        tokens = model.decode(torch.randn(1, model.config.num_tokens, model.config.latent_channels))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net = VecSetField(model, tokens)
    calls = {"n": 0}

    class _Stop(Exception):
        pass

    def fn(p):
        if calls["n"] == chunks:
            raise _Stop
        calls["n"] += 1
        return net(p)

    t0 = time.perf_counter()
    if strategy == "hierarchical":
        torch.nn.init.normal_(model.geo_decoder.output_proj.weight, std=1.0 / math.sqrt(model.config.width))
        _, stats = hierarchical_field(lambda p: torus_sdf(p) + 0.005 * net(p), res, chunk_size=chunk)
        chunks = math.ceil(stats.queries / chunk)
    else:
        try:
            dense_field(fn, res, chunk_size=chunk)
        except _Stop:
            pass
    return dict(model="base", strategy=strategy, resolution=res, chunk_size=chunk, chunks_run=chunks,
                seconds=time.perf_counter() - t0,
                params=sum(p.numel() for p in model.parameters()),
                peak_rss_after_model_mb=rss_model,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all",
                    choices=["all", "decode", "train", "tiny", "tiny-real", "hier-real", "tiny-step", "mem",
                             "mem-child"])
    ap.add_argument("--ckpt", action="append", default=[], help="tiny-real: a trained VecSet VAE (repeatable)")
    ap.add_argument("--data", default=None, help="tiny-real: a preprocessed folder (its held-out split)")
    ap.add_argument("--objects", type=int, default=8, help="tiny-real: held-out objects to time")
    ap.add_argument("--repeats", type=int, default=7, help="tiny-step: timed steps per decoder")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="tiny-step: a model variant as tiny preset overrides (repeatable; default: the plain "
                         "and the position-biased decoder)")
    ap.add_argument("--precision", action="append", choices=["fp32", "bf16"], default=[],
                    help="tiny-step: time under this precision (repeatable; default fp32)")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--dense-chunks", type=int, default=24)
    ap.add_argument("--mem-chunks", type=int, default=6)
    ap.add_argument("--mem-strategy", default="dense", choices=["dense", "hierarchical"])
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-base-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--tiny-cache", default=None,
                    help="directory: reuse the trained tiny model saved there (trained and saved if absent)")
    ap.add_argument("--out", default=None, help="append results as JSON lines to this file")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # before the first parallel op, as `shapeflow` does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "mem-child":
        print(json.dumps(bench_mem_child(args.res, args.mem_chunks, args.chunk, args.mem_strategy)))
        return
    results = dict(torch=torch.__version__, threads=torch.get_num_threads(), load_start=load(),
                   date=time.strftime("%Y-%m-%d %H:%M"))
    print(f"load average at start: {results['load_start']}", flush=True)
    if args.part in ("all", "mem"):
        for strategy in ("dense", "hierarchical"):
            child = subprocess.run([sys.executable, __file__, "--part", "mem-child", "--res", str(args.res),
                                    "--mem-chunks", str(args.mem_chunks), "--chunk", str(args.chunk),
                                    "--mem-strategy", strategy,
                                    *(["--threads", str(args.threads)] if args.threads else [])],
                                   capture_output=True, text=True, check=True)
            results[f"mem_{strategy}"] = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps(results[f"mem_{strategy}"]), flush=True)
    if args.part in ("all", "train"):
        results["train"] = bench_train_base(args.train_batch, 4096, 4096, steps=args.train_base_steps)
        print(json.dumps(results["train"]), flush=True)
    if args.part in ("all", "decode", "tiny"):
        cache = args.tiny_cache and os.path.isfile(os.path.join(args.tiny_cache, "model.safetensors"))
        if cache:
            model = VecSetVAE.from_pretrained(args.tiny_cache).eval()
        else:
            model = train_tiny(args.train_steps)
            if args.tiny_cache:
                model.save_pretrained(args.tiny_cache)
        results["tiny_model"] = dict(cached=bool(cache), train_steps=args.train_steps)
        results["tiny"] = bench_tiny_recon(model, 128)
        print(json.dumps(results["tiny"]), flush=True)
        if args.part != "tiny":
            results["decode_tiny"] = bench_decode_tiny(model, args.res)
            print(json.dumps(results["decode_tiny"]), flush=True)
    if args.part == "tiny-step":
        if not args.data:
            ap.error("--part tiny-step needs --data")
        variants = {}
        for spec in args.variant:
            name, _, overrides = spec.partition("=")
            try:
                variants[name] = json.loads(overrides or "{}")
            except json.JSONDecodeError as err:
                ap.error(f"--variant {spec!r}: the part after '=' must be a JSON object ({err})")
            if not name or not isinstance(variants[name], dict):
                ap.error(f"--variant {spec!r}: expected NAME={{tiny preset overrides as a JSON object}}")
        results["tiny_step"] = bench_tiny_step(args.data, args.repeats, variants or None,
                                               tuple(dict.fromkeys(args.precision)) or ("fp32",))
        print(json.dumps(results["tiny_step"]), flush=True)
    if args.part == "tiny-real":
        if not args.ckpt or not args.data:
            ap.error("--part tiny-real needs --ckpt (one or more) and --data")
        results["tiny_real"] = bench_tiny_real(args.ckpt, args.data, args.objects)
        print(json.dumps(results["tiny_real"]), flush=True)
    if args.part == "hier-real":
        if not args.ckpt or not args.data:
            ap.error("--part hier-real needs --ckpt and --data")
        results["hier_real"] = bench_hier_real(args.ckpt[0], args.data, args.objects, args.res)
        print(json.dumps(results["hier_real"]), flush=True)
    if args.part in ("all", "decode"):
        results["decode_base"] = bench_decode_base(args.res, args.dense_chunks, args.chunk)
        print(json.dumps(results["decode_base"]), flush=True)
    results["load_end"] = load()
    print(f"load average at end: {results['load_end']}", flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
