"""Sizes and sampling speed of the released Hunyuan3D DiT architectures (random weights of the real size).

* ``params``: parameter counts of the released configs, built on the meta device (no memory, seconds).
* ``speed``: seconds per sampling step (one guided Euler step = one model call on a batch of 2: the
  conditional and the unconditional row, 1370 condition tokens) in float32 and bfloat16, and the peak resident
  memory of the process; ``amp`` keeps float32 weights under bfloat16 autocast (matmuls in bf16, attention in
  float32 on the CPU, as training runs); each (model, dtype) runs in its own subprocess so peaks do not mix. On a CPU the
  large models take minutes per step: ``--steps 1`` is what fits a session.

Usage::

    python benchmarks/bench_hunyuan_dit.py params
    python benchmarks/bench_hunyuan_dit.py speed --models hunyuan2mini hunyuan21 --dtypes fp32 bf16 --steps 1
    python benchmarks/bench_hunyuan_dit.py speed --device cuda --steps 5 --out gpu_hunyuan.json   # a lent GPU
    python benchmarks/bench_hunyuan_dit.py speed --models tiny --steps 2          # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from shapeflow.models.hunyuan_dit import Hunyuan20DiT, Hunyuan21DiT
from shapeflow.sampling import sample

#: name -> (class, preset, latent tokens sampled). Token counts: the paired VAE's num_latents (2.1: 4096,
#: 2.0: 3072); 2mini is measured at 2.0's 3072 as well.
MODELS = {
    "hunyuan21": (Hunyuan21DiT, "hunyuan21", 4096),
    "hunyuan20": (Hunyuan20DiT, "hunyuan20", 3072),
    "hunyuan2mini": (Hunyuan20DiT, "hunyuan2mini", 3072),
    "tiny": (Hunyuan21DiT, "tiny", 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}  # amp: fp32 weights, bf16 autocast


def count_params() -> dict[str, int]:
    out = {}
    for name, (cls, preset, _) in MODELS.items():
        with torch.device("meta"):
            out[name] = cls.from_preset(preset).num_params()
    return out


def one(name: str, dtype: str, steps: int, device: str) -> dict:
    """Time ``steps`` guided Euler steps of model ``name`` in ``dtype`` (in this process)."""
    cls, preset, tokens = MODELS[name]
    t0 = time.perf_counter()
    model = cls.from_preset(preset).to(device=device, dtype=DTYPES[dtype]).eval()
    build = time.perf_counter() - t0
    c = model.config
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, c.cond_tokens, c.cond_dim, generator=g).to(device, DTYPES[dtype])
    noise = torch.randn(1, tokens, c.in_channels, generator=g).to(device, DTYPES[dtype])
    null = torch.zeros_like(cond)
    times = []

    def timed(x, t, cc):
        if device == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        v = model(x, t, cc)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
        return v

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "amp")
    with torch.inference_mode(), amp:
        x = sample(timed, noise, steps=steps, method="euler", cond=cond, null_cond=null, cfg_scale=5.0)
    out = {"model": name, "dtype": dtype, "device": device, "params": model.num_params(), "tokens": tokens,
           "cond_tokens": c.cond_tokens, "build_s": round(build, 1), "steps": steps,
           "s_per_step": [round(s, 2) for s in times], "finite": bool(torch.isfinite(x).all()),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
    if device == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["params", "speed", "one"])
    ap.add_argument("--models", nargs="+", default=["hunyuan2mini", "hunyuan21"], choices=sorted(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.mode == "params":
        res = {k: v for k, v in count_params().items() if k != "tiny"}
        for k, v in res.items():
            print(f"{k:14s} {v / 1e9:.3f} B parameters")
    elif args.mode == "one":
        res = one(args.models[0], args.dtypes[0], args.steps, args.device)
        print(json.dumps(res))
    else:
        res = []
        for name in args.models:
            for dt in args.dtypes:
                cmd = [sys.executable, __file__, "one", "--models", name, "--dtypes", dt, "--steps",
                       str(args.steps), "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    row = {"model": name, "dtype": dt, "error": proc.stderr.strip().splitlines()[-1:]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                res.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
