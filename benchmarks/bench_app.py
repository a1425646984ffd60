"""Speed of the web app (issue 27) as a visitor sees it, in headless Chromium.

Usage::

    .venv/bin/python benchmarks/bench_app.py                                   # print the markdown rows
    .venv/bin/python benchmarks/bench_app.py --mesh ../shared/meshes/lucy.ply --repeats 3

Starts ``shapeflow app`` (the shipped tiny checkpoints) on a free local port and drives Debian's Chromium
through Playwright (``executable_path``; no browser download). Each repeat opens a fresh browser context.

1. **server start**: from launching the process to the first HTTP 200.
2. **first page load**: ``goto`` until the Generate button is visible; the first one after the start, and the
   median of all repeats.
3. **tiny generation**: a click on Generate with the page's defaults (shipped VecSet pair, class chair,
   25 Heun steps, 128^3) until the 3D view shows the shape (its canvas is visible) and the downloads are listed.
4. **reconstruction**: upload ``--mesh`` (default ``../shared/meshes/lucy.ply``, about 100k faces; a
   100k-face torus where that is absent), a click on Reconstruct with the defaults (shipped sparse VAE,
   watertight and decoding at 256^3) until both 3D views show; the page's own stage times are printed too.

The machine may be shared: the load average before and after is printed with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trimesh

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "shapeflow", "app", "--port", str(port), "--out", str(out)],
                            stdout=open(out.parent / "app.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError((out.parent / "app.log").read_text()) from None
            time.sleep(0.05)


def test_mesh(path: Path | None, tmp: Path) -> Path:
    if path is not None and path.is_file():
        return path
    mesh = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=500, minor_sections=100)
    out = tmp / "torus_100k.ply"
    mesh.export(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recon-repeats", type=int, default=2)
    ap.add_argument("--mesh", type=Path, default=REPO.parent / "shared" / "meshes" / "lucy.ply")
    ap.add_argument("--chromium", default=os.environ.get("SHAPEFLOW_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench_app_"))
    mesh = test_mesh(args.mesh, tmp)
    faces = len(trimesh.load(mesh, force="mesh", process=False).faces)
    load_before = os.getloadavg()
    proc, url, start_s = start_server(tmp / "out")
    loads, gens, recons, stages = [], [], [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            for k in range(args.repeats):
                ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#generate-btn", state="visible", timeout=60_000)
                loads.append(time.perf_counter() - t0)
                page.fill("#seed input", str(k))
                t0 = time.perf_counter()
                page.click("#generate-btn")
                page.wait_for_selector("#gen-view canvas", state="visible", timeout=120_000)
                page.wait_for_selector("#gen-files a", timeout=60_000)
                gens.append(time.perf_counter() - t0)
                print(f"repeat {k}: page load {loads[-1]:.2f} s, generation visible {gens[-1]:.2f} s "
                      f"({page.inner_text('#gen-status').strip()})", flush=True)
                ctx.close()
            for k in range(args.recon_repeats):
                ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = ctx.new_page()
                page.goto(url)
                page.get_by_role("tab", name="Reconstruct").click()
                page.set_input_files("#recon-upload input[type=file]", str(mesh))
                page.wait_for_selector(f"#recon-upload a[download='{mesh.name}']", timeout=60_000)
                t0 = time.perf_counter()
                page.click("#recon-btn")
                page.wait_for_selector("#recon-view canvas", state="visible", timeout=300_000)
                page.wait_for_selector("#recon-input canvas", state="visible", timeout=60_000)
                recons.append(time.perf_counter() - t0)
                table = " ".join(page.inner_text("#recon-metrics").split())
                stages.append(table)
                print(f"reconstruction {k}: {recons[-1]:.2f} s visible; page table: {table}", flush=True)
                ctx.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    load_after = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    date = datetime.date.today().isoformat()
    cmd = "`python benchmarks/bench_app.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else "") + "`"
    print()
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after "
          f"{load_after[0]:.2f}; date {date}")
    print("| target | result | command |")
    print("|---|---|---|")
    print(f"| first page load after start: < 3 s | {loads[0]:.2f} s (median of {len(loads)}: "
          f"{statistics.median(loads):.2f} s; server start {start_s:.1f} s) | {cmd} |")
    print(f"| tiny generation visible in the browser: < 10 s | median {statistics.median(gens):.2f} s "
          f"({', '.join(f'{g:.2f}' for g in gens)}) | {cmd} |")
    print(f"| {faces // 1000}k-face reconstruction ({mesh.name}) visible: < 30 s | median "
          f"{statistics.median(recons):.2f} s ({', '.join(f'{r:.2f}' for r in recons)}); stages of the last: "
          f"{stages[-1] if stages else ''} | {cmd} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
