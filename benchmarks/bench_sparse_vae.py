"""Sparse SDF VAE: band preprocessing, encode and decode of one real mesh at 256^3-1024^3 (time, peak RSS).

Each case runs in a fresh process (``spawn``), so the peak RSS is its own (imports included; the growth over
the RSS after imports in brackets). Parts:

* ``band``: the SDF band of ``--mesh`` (made watertight at 256^3 first, as ``shapeflow preprocess`` does) at
  each ``--res``: :func:`shapeflow.geometry.sparse_band.band_nodes`, nodes and seconds (the issue's target:
  at most 2 s per worker on top of preprocessing at 256^3, 1024^3 in at most 4 GB).
* ``codec``: with ``--ckpt`` (default: the shipped ``tiny``), the band at each ``--res`` encoded in one
  process, the latent decoded and meshed in another (:meth:`SparseSDFVAE.decode_mesh`: structure, values,
  closing, sparse marching cubes, floaters dropped): latent nodes, decoded nodes, faces, seconds, the peak
  RSS of each process (target: a 1024^3 decode in at most 2 GB), and whether the mesh is one closed piece.

Usage::

    .venv/bin/python benchmarks/bench_sparse_vae.py                                  # lucy, 256 512 1024
    .venv/bin/python benchmarks/bench_sparse_vae.py --part codec --res 1024 --ckpt runs/sparse/final
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MESH = ROOT.parent / "shared" / "meshes" / "lucy.ply"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _watertight(mesh: str):
    import numpy as np

    from shapeflow.geometry.frame import normalize_transform
    from shapeflow.geometry.io import load_mesh
    from shapeflow.geometry.watertight import make_watertight

    v, f = load_mesh(mesh)
    t = normalize_transform(v)
    wt = make_watertight(t.to_canonical(v), f, resolution=256)
    return wt.vertices.astype(np.float32).astype(np.float64), np.asarray(wt.faces)


def _band_case(mesh: str, res: int, threads: int) -> dict:
    import torch

    from shapeflow.geometry.sparse_band import band_nodes

    torch.set_num_threads(threads)
    v, f = _watertight(mesh)
    base = _rss_mb()
    t0 = time.perf_counter()
    coords, sdf = band_nodes(v, f, res)
    sec = time.perf_counter() - t0
    return {"res": res, "nodes": len(coords), "seconds": sec, "peak_mb": _rss_mb(), "growth_mb": _rss_mb() - base}


def _load(ckpt: str | None):
    from shapeflow.generate import SHIPPED_VAES
    from shapeflow.models import load_vae

    vae, kind = load_vae(ckpt or SHIPPED_VAES["sparse"])
    if kind != "sparse_vae":
        raise SystemExit(f"{ckpt}: a {kind} checkpoint, not a sparse VAE")
    return vae


def _encode_case(mesh: str, res: int, ckpt: str | None, threads: int, latent_path: str) -> dict:
    import numpy as np
    import torch

    from shapeflow.geometry.sparse_band import band_nodes

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    vae = _load(ckpt)
    v, f = _watertight(mesh)
    coords, sdf = band_nodes(v, f, res)
    x = vae.band_input(coords, sdf, res)
    base = _rss_mb()
    with torch.inference_mode():
        t0 = time.perf_counter()
        posterior, latent = vae.encode(x)
        z = latent.replace(posterior.mode())
        sec = time.perf_counter() - t0
    np.savez(latent_path, coords=z.coords.numpy(), feats=z.feats.numpy(), shape=z.shape)
    return {"band_nodes": x.num_voxels, "latent_nodes": z.num_voxels, "encode_s": sec,
            "peak_mb": _rss_mb(), "growth_mb": _rss_mb() - base}


def _decode_case(latent_path: str, ckpt: str | None, threads: int) -> dict:
    import numpy as np
    import torch

    from shapeflow import metrics
    from shapeflow.sparse import SparseTensor

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    vae = _load(ckpt)
    a = np.load(latent_path)
    z = SparseTensor(torch.from_numpy(a["coords"]), torch.from_numpy(a["feats"]), int(a["shape"]), 1)
    base = _rss_mb()
    with torch.inference_mode():
        t0 = time.perf_counter()
        coords, _ = vae.decode_band(z)  # the network alone: structure and values
        t1 = time.perf_counter()
        n_dec = len(coords)
        del coords
        verts, faces = vae.decode_mesh(z)  # decodes again, then closes, meshes and drops floaters
        t2 = time.perf_counter()
    clean = metrics.mesh_cleanliness(verts, faces)
    return {"decoded_nodes": n_dec, "faces": len(faces), "decode_s": t1 - t0, "decode_mesh_s": t2 - t1,
            "clean": clean["clean"], "components": clean["components"], "watertight": clean["watertight"],
            "peak_mb": _rss_mb(), "growth_mb": _rss_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["band", "codec", "all"], default="all")
    ap.add_argument("--mesh", default=str(DEFAULT_MESH))
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--ckpt", default=None, help="sparse VAE checkpoint (default: the shipped tiny)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")

    def run(fn, *a):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            return ex.submit(fn, *a).result()

    print(f"mesh {args.mesh}, {args.threads} threads")
    if args.part in ("band", "all"):
        print("\n| grid | band nodes | seconds | peak RSS MB (growth) |\n|---|---|---|---|")
        for r in args.res:
            o = run(_band_case, args.mesh, r, args.threads)
            print(f"| {r}^3 | {o['nodes']:,} | {o['seconds']:.2f} | {o['peak_mb']:.0f} ({o['growth_mb']:.0f}) |")
    if args.part in ("codec", "all"):
        print("\n| grid | band nodes | latent nodes | encode s | encode peak RSS MB (growth) | decoded nodes | faces "
              "| decode s | decode + mesh s | mesh | decode + mesh peak RSS MB (growth) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for r in args.res:
                path = str(Path(tmp) / f"z{r}.npz")
                e = run(_encode_case, args.mesh, r, args.ckpt, args.threads, path)
                d = run(_decode_case, path, args.ckpt, args.threads)
                mesh = ("one closed piece" if d["clean"] else
                        f"{d['components']} component(s), {'closed' if d['watertight'] else 'with boundary edges'}")
                print(f"| {r}^3 | {e['band_nodes']:,} | {e['latent_nodes']:,} | {e['encode_s']:.2f} | "
                      f"{e['peak_mb']:.0f} ({e['growth_mb']:.0f}) | {d['decoded_nodes']:,} | {d['faces']:,} | "
                      f"{d['decode_s']:.2f} | {d['decode_mesh_s']:.2f} | {mesh} | {d['peak_mb']:.0f} ({d['growth_mb']:.0f}) |")

if __name__ == "__main__":
    main()
