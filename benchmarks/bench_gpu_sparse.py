"""GPU check of the sparse SDF VAE family, one run of a few minutes on a lent GPU machine.

Three checks, each printed as it finishes and written to ``--out`` (``gpu_check.json``):

1. **conv**: :class:`shapeflow.sparse.SubMConv3d` on the device against the same layer on the CPU in float64
   (max |difference| of the output and the input and weight gradients), and its forward + backward time on
   the shell of a ``--conv-res`` grid at 64 channels (float32 and bf16 autocast).
2. **train**: ``--steps`` bf16 training steps of the ``--preset`` VAE (``base``: 512^3) on the bands of two
   analytic shapes at the preset's resolution, crops of ``--crop`` cells as the tiny config trains; seconds
   per step, peak device memory, the loss going down.
3. **decode**: encode + decode of one whole ``--preset``-resolution band and block-wise marching cubes
   (never a dense ``R^3`` array): seconds, peak device memory, faces.

Usage (on the GPU machine; well under 8 minutes on one H100)::

    python benchmarks/bench_gpu_sparse.py --out gpu_out
    python benchmarks/bench_gpu_sparse.py --device cpu --smoke --out /tmp/g   # the same code, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from shapeflow.config import preset
from shapeflow.geometry.sparse_band import band_nodes
from shapeflow.models.sparse_vae import SparseSDFVAE, SparseSDFVAEConfig, sparse_vae_loss
from shapeflow.sparse import SparseTensor, SubMConv3d


def shapes(res: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bands of a sphere and a torus at ``res`` (exact, :func:`band_nodes`)."""
    sphere = trimesh.creation.icosphere(5, radius=0.7)
    torus = trimesh.creation.torus(0.55, 0.2, major_sections=128, minor_sections=64)
    return [band_nodes(m.vertices, m.faces, res) for m in (sphere, torus)]


def batch_of(bands, res: int) -> dict:
    coords = torch.cat([torch.cat([torch.full((len(c), 1), b, dtype=torch.int32),
                                   torch.from_numpy(c.astype(np.int32))], 1) for b, (c, _) in enumerate(bands)])
    sdf = torch.cat([torch.from_numpy(s) for _, s in bands])
    return {"coords": coords, "sdf": sdf, "batch_size": len(bands), "shape": res + 1}


def crop(c: np.ndarray, s: np.ndarray, res: int, size: int, rng: np.random.Generator, align: int):
    """The band inside a random aligned cube of ``size`` cells around a band node, shifted to the origin."""
    origin = np.clip((c[rng.integers(len(c))] - size // 2) // align * align, 0, max(res - size, 0))
    keep = np.all((c >= origin) & (c <= origin + size), axis=1)
    return c[keep] - origin, s[keep]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def check_conv(device: torch.device, res: int, channels: int, repeats: int) -> dict:
    c, _ = shapes(res)[0]
    coords = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), torch.from_numpy(c.astype(np.int32))], 1)
    g = torch.Generator().manual_seed(0)
    # equality in float64: device vs CPU, forward and both gradients
    small = coords[: min(len(coords), 20000)]
    conv = SubMConv3d(channels, channels).double()
    x = torch.randn(len(small), channels, generator=g, dtype=torch.float64)
    outs = []
    for dev in (torch.device("cpu"), device):
        layer = SubMConv3d(channels, channels).double().to(dev)
        layer.load_state_dict(conv.state_dict())
        xi = x.to(dev).requires_grad_(True)
        y = layer(SparseTensor(small.to(dev), xi, res + 1))
        y.feats.square().sum().backward()
        outs.append([t.detach().cpu() for t in (y.feats, xi.grad, layer.weight.grad)])
    err = [float((a - b).abs().max()) for a, b in zip(*outs)]
    # speed on the whole shell
    layer = SubMConv3d(channels, channels).to(device)
    st = SparseTensor(coords.to(device), torch.randn(len(coords), channels, device=device), res + 1)
    t0 = time.perf_counter()
    st.neighbors(3)
    sync(device)
    map_s = time.perf_counter() - t0
    times = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        runs = []
        for i in range(repeats + 1):
            xi = st.feats.detach().requires_grad_(True)
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                y = layer(st.replace(xi))
            y.feats.float().square().mean().backward()
            sync(device)
            if i:
                runs.append(time.perf_counter() - t0)
        times[name] = float(np.median(runs))
    return {"voxels": len(coords), "channels": channels, "max_err_out_dx_dw_fp64": err, "map_s": map_s,
            "fwd_bwd_s": times}


def check_train(device: torch.device, cfg: SparseSDFVAEConfig, steps: int, crop_cells: int) -> dict:
    bands = shapes(cfg.resolution)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vae = SparseSDFVAE(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times, voxels = [], [], []
    for step in range(steps):
        b = batch_of([crop(c, s, cfg.resolution, crop_cells, rng, cfg.factor) for c, s in bands], crop_cells)
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, logs = sparse_vae_loss(vae, b, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        voxels.append(len(b["coords"]))
    return {"params_M": sum(p.numel() for p in vae.parameters()) / 1e6, "steps": steps,
            "voxels_per_step": float(np.mean(voxels)), "s_per_step": float(np.median(times[1:] or times)),
            "first_loss": losses[0], "last_loss": float(np.mean(losses[-3:])),
            "finite": bool(np.isfinite(losses).all()), "peak_mb": peak_mb(device)}, vae


@torch.no_grad()
def check_decode(device: torch.device, vae: SparseSDFVAE) -> dict:
    res = vae.config.resolution
    c, s = shapes(res)[1]
    vae.eval()
    x = vae.band_input(c, s, res)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        posterior, latent = vae.encode(x)
    sync(device)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = latent.replace(posterior.mode())
    band_coords, sdf = vae.decode_band(z)
    sync(device)
    decode_s = time.perf_counter() - t0
    out = {"band_voxels": len(c), "latent_voxels": len(z.coords), "encode_s": encode_s,
           "decode_band_s": decode_s, "decoded_voxels": len(band_coords), "peak_mb": peak_mb(device)}
    t0 = time.perf_counter()
    try:
        v, f = vae.decode_mesh(z)
        out.update(mesh_s=time.perf_counter() - t0, faces=len(f))
    except ValueError as e:  # an untrained VAE may decode nothing to mesh; the timing above still counts
        out.update(mesh_s=time.perf_counter() - t0, faces=0, mesh_error=str(e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--crop", type=int, default=256, help="training crop, cells (a multiple of the latent factor)")
    ap.add_argument("--conv-res", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of this script)")
    ap.add_argument("--out", default="gpu_check")
    args = ap.parse_args()
    device = torch.device(args.device)
    overrides = {}
    if args.smoke:
        overrides = dict(resolution=32, channels=(4, 8, 8, 16), blocks=(0, 1, 1, 1), latent_channels=2,
                         attn_blocks=1, attn_window=2, attn_heads=2)
        args.steps, args.crop, args.conv_res, args.repeats = 3, 16, 32, 1
    cfg = preset(SparseSDFVAEConfig, args.preset, **overrides)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "smoke": args.smoke}
    t_all = time.perf_counter()
    report["conv"] = check_conv(device, args.conv_res, 64 if not args.smoke else 8, args.repeats)
    print("conv", json.dumps(report["conv"]), flush=True)
    report["train"], vae = check_train(device, cfg, args.steps, args.crop)
    print("train", json.dumps(report["train"]), flush=True)
    report["decode"] = check_decode(device, vae)
    print("decode", json.dumps(report["decode"]), flush=True)
    report["total_s"] = time.perf_counter() - t_all
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'gpu_check.json'} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
