"""Speed of one 3^3 submanifold convolution (:class:`shapeflow.sparse.SubMConv3d`) on a surface shell, CPU.

The issue's target: a ``256^3`` node grid (``shape = 257``), the surface shell of a sphere (about 123k
active nodes: nodes within half a voxel diagonal of the surface), ``32 -> 32`` channels, forward +
backward in float32 on 2 threads, the neighbour map built once and reused; no slower than spconv's CPU
wheel in the same run. Smaller grids with wider layers show the scaling (``--cases``).

Each case runs in a fresh process (``spawn``), so its peak RSS is its own; the table gives

* **map**: building the neighbour map once (plus the per-offset pair lists for ``offsets``);
* **fwd+bwd**: median (and min) of ``--repeats`` forward + backward passes after one warm-up, with the
  map reused (``x.replace(feats)`` shares it);
* **peak RSS**: the process's peak resident memory, and in brackets its growth over the RSS after imports;
* for spconv (``spconv==2.3.8`` CPU wheel, when importable and ``--spconv``): the same timings; its map
  time is first forward minus a later one (an estimate; noise can make it negative on small grids). Its
  backward calls ``torch.cuda.current_stream()``; this script (and only this script) patches
  ``spconv.pytorch.cppcore.get_current_stream`` (and the copy ``spconv.pytorch.ops`` imported) to return 0
  at run time. **err** is the largest ``|spconv - torch|`` of the forward outputs for the same input and
  weights (the torch backend equals ``F.conv3d`` to 1e-12 in float64, see ``tests/test_sparse.py``). With
  torch 2.13 the wheel's CPU neighbour pairs are wrong (see the err column), so its times are not a fair
  comparison there.

Usage::

    .venv/bin/python benchmarks/bench_sparse_conv.py                          # all cases, about 1 minute
    .venv/bin/python benchmarks/bench_sparse_conv.py --cases 256:32 --surface torus
    # with spconv, installed outside the project venv (.venv/bin/pip install --target DIR spconv==2.3.8)
    PYTHONPATH=DIR .venv/bin/python benchmarks/bench_sparse_conv.py --spconv
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import time

import torch

from shapeflow.sparse import SparseTensor, SubMConv3d
from shapeflow.sparse.nn import _offset_pairs

CASES = ("256:32", "128:64", "128:128", "64:64", "64:128")


# ------------------------------------------------------------------------------------------------
# Data: surface shell on the node grid
# ------------------------------------------------------------------------------------------------


def shell_coords(res: int, surface: str) -> torch.Tensor:
    """(N, 4) int32 nodes of the ``res``-cell node grid within half a voxel diagonal of the surface.

    Sphere of radius ``0.293 res`` or torus of radii ``0.25 res`` / ``0.1 res`` (node units), centred; built one
    ``i`` slice at a time so the dense grid never exists.
    """
    s = res + 1
    ar = torch.arange(s, dtype=torch.float64) - res / 2
    y, z = ar[:, None], ar[None, :]
    parts = []
    for i in range(s):
        if surface == "sphere":
            d = (ar[i] ** 2 + y**2 + z**2).sqrt() - 0.293 * res
        else:
            d = ((ar[i] ** 2 + y**2).sqrt() - 0.25 * res).hypot(z) - 0.1 * res
        jk = (d.abs() <= 3**0.5 / 2).nonzero()  # (n_i, 2), sorted
        parts.append(torch.cat([torch.zeros(len(jk), 1, dtype=torch.long), torch.full((len(jk), 1), i), jk], 1))
    return torch.cat(parts).int()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# One case in one process
# ------------------------------------------------------------------------------------------------


def run_torch(res: int, channels: int, surface: str, algorithm: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    base = _rss_mb()
    coords = shell_coords(res, surface)
    g = torch.Generator().manual_seed(0)
    x = SparseTensor(coords, torch.randn(len(coords), channels, generator=g), res + 1)
    torch.manual_seed(0)
    conv = SubMConv3d(channels, channels, 3, algorithm=algorithm)
    t0 = time.perf_counter()
    x.neighbors(3, 1)
    if conv.algorithm == "offsets":
        _offset_pairs(x, 3, 1)
    t_map = time.perf_counter() - t0
    grad = torch.randn(len(coords), channels, generator=g)
    times = []
    for r in range(repeats + 1):
        feats = x.feats.clone().requires_grad_()
        t0 = time.perf_counter()
        conv(x.replace(feats)).feats.backward(grad)
        if r:  # the first pass is a warm-up
            times.append(time.perf_counter() - t0)
    return dict(backend="torch", algorithm=conv.algorithm, voxels=len(coords), map=t_map,
                median=statistics.median(times), min=min(times), peak=_peak_mb(), base=base)


def run_spconv(res: int, channels: int, surface: str, repeats: int, threads: int) -> dict:
    import spconv.pytorch as spconv  # lazy: optional, only with --spconv
    import spconv.pytorch.cppcore as spconv_cppcore  # lazy: optional
    import spconv.pytorch.ops as spconv_ops  # lazy: optional
    from spconv.core import ConvAlgo  # lazy: optional

    # spconv's CPU backward asks torch.cuda for the current stream; 0 is the CPU "stream" (this run only)
    spconv_cppcore.get_current_stream = lambda: 0
    spconv_ops.get_current_stream = lambda: 0

    torch.set_num_threads(threads)
    base = _rss_mb()
    coords = shell_coords(res, surface)
    g = torch.Generator().manual_seed(0)
    x = SparseTensor(coords, torch.randn(len(coords), channels, generator=g), res + 1)
    torch.manual_seed(0)
    ref_conv = SubMConv3d(channels, channels, 3)
    with torch.no_grad():
        ref = ref_conv(x).feats
    conv = spconv.SubMConv3d(channels, channels, 3, bias=True, indice_key="subm", algo=ConvAlgo.Native)
    with torch.no_grad():  # spconv's weight layout is (out, k, k, k, in); indices [b, i, j, k] as given
        conv.weight.copy_(ref_conv.weight.permute(0, 2, 3, 4, 1))
        conv.bias.copy_(ref_conv.bias)
    shape = [res + 1] * 3
    t0 = time.perf_counter()
    with torch.no_grad():
        first = conv(spconv.SparseConvTensor(x.feats, coords, shape, 1))
    t_first = time.perf_counter() - t0
    indices = first.indice_dict  # reused: no map is rebuilt below
    t0 = time.perf_counter()
    with torch.no_grad():
        out = conv(spconv.SparseConvTensor(x.feats, coords, shape, 1, indice_dict=indices)).features
    t_map = t_first - (time.perf_counter() - t0)
    err = float((out - ref).abs().max())
    grad = torch.randn(len(coords), channels, generator=g)
    times = []
    for r in range(repeats + 1):
        feats = x.feats.clone().requires_grad_()
        t0 = time.perf_counter()
        conv(spconv.SparseConvTensor(feats, coords, shape, 1, indice_dict=indices)).features.backward(grad)
        if r:
            times.append(time.perf_counter() - t0)
    return dict(backend="spconv", algorithm="native", voxels=len(coords), map=t_map,
                median=statistics.median(times), min=min(times), peak=_peak_mb(), base=base, err=err)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), help="RES:CHANNELS (RES cells per axis)")
    ap.add_argument("--surface", choices=("sphere", "torus"), default="sphere")
    ap.add_argument("--algorithms", nargs="+", default=["im2col", "offsets"],
                    choices=("auto", "im2col", "offsets"), help="torch-backend algorithms to time")
    ap.add_argument("--spconv", action="store_true", help="also time spconv (must be importable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", help="also write the markdown table to this file")
    args = ap.parse_args()

    jobs = []
    for case in args.cases:
        res, channels = (int(v) for v in case.split(":"))
        for algorithm in args.algorithms:
            jobs.append((case, run_torch, (res, channels, args.surface, algorithm, args.repeats, args.threads)))
        if args.spconv:
            jobs.append((case, run_spconv, (res, channels, args.surface, args.repeats, args.threads)))

    ctx = multiprocessing.get_context("spawn")
    lines = [f"SubMConv3d 3^3, C -> C, fwd+bwd float32, {args.threads} threads, {args.surface} shell, "
             f"torch {torch.__version__}",
             "",
             "| grid | C | voxels | backend | algorithm | map (s) | fwd+bwd median (s) | min (s) | peak RSS MB "
             "(+ over imports) | err vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for case, fn, fn_args in jobs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            r = pool.submit(fn, *fn_args).result()
        res, channels = case.split(":")
        err = f"{r['err']:.1e}" if "err" in r else "-"
        line = (f"| {res}^3 | {channels} | {r['voxels']} | {r['backend']} | {r['algorithm']} | {r['map']:.3f} | "
                f"{r['median']:.3f} | {r['min']:.3f} | {r['peak']:.0f} (+{r['peak'] - r['base']:.0f}) | {err} |")
        lines.append(line)
        print(line, flush=True)
    if args.write:
        with open(args.write, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
