"""``shapeflow app`` end to end in a real browser: headless Chromium (Debian's ``chromium`` package) driven by
Playwright with ``executable_path`` set, so no browser is ever downloaded.

The app runs as its own process on a free local port with the shipped tiny checkpoints and a small
preprocessed folder. The test generates a shape, waits for the 3D view, downloads the GLB / OBJ / PLY files,
reconstructs an uploaded mesh (both 3D views and the metrics), checks that a bad upload is one readable
line in the page, browses the data tab, and finds no error in the browser console. Screenshots of each tab
go to ``$SHAPEFLOW_SCREENSHOTS`` (``docs/img`` makes the README's pictures) or the test's temporary folder.

Skips, with the reason, where gradio, playwright or a Chromium binary (``/usr/bin/chromium``, or
``$SHAPEFLOW_CHROMIUM``) is missing; ``make test`` installs all three where it can.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trimesh

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SHAPEFLOW_CHROMIUM", "/usr/bin/chromium")
# flags for a closed network: without them Chromium keeps trying Google's hosts
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# gradio's 3D view (Babylon.js) tries WebGPU first in any Chromium that has navigator.gpu, logs this error
# when the browser has no GPU adapter (headless, --disable-gpu), then renders with WebGL: the screenshots show
# the shapes. It is the viewer library's message on GPU-less browsers, not one of the app's; nothing else passes.
KNOWN_CONSOLE_ERROR = re.compile(r"^console error: BJS - \[[0-9:]+\]: A fatal error occurred during WebGPU "
                                 r"creation/initialization\.$")


def _requirements() -> str | None:
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e \".[app]\")"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SHAPEFLOW_CHROMIUM)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _requirements()
    if reason:
        pytest.skip(reason)
    from shapeflow.data import preprocess as pp

    root = tmp_path_factory.mktemp("browser")
    for cls, mesh in (("ball", trimesh.creation.icosphere(2)), ("box", trimesh.creation.box((1, 2, 1)))):
        (root / "in" / cls).mkdir(parents=True)
        mesh.export(root / "in" / cls / f"{cls}_0.obj")
    (root / "in" / "box" / "broken.obj").write_text("v 0 0 0\nf 1 2 3 4\n")
    pp.preprocess_dataset(root / "in", root / "data" / "prep",
                          pp.PreprocessConfig(resolution=32, surface_points=400, sharp_points=0, sdf_points=600),
                          workers=0, progress=False)
    port = _free_port()
    log = open(root / "app.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "shapeflow", "app", "--port", str(port), "--out",
                             str(root / "out"), "--data", str(root / "data")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"the app did not start:\n{(root / 'app.log').read_text()}") from None
                time.sleep(0.2)
        yield {"url": url, "root": root, "start_s": time.perf_counter() - t0}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        yield page, problems
        context.close()
        browser.close()


def _shots() -> Path | None:
    d = os.environ.get("SHAPEFLOW_SCREENSHOTS")
    return Path(d) if d else None


def _screenshot(page, server, name: str) -> Path:
    out = _shots() or server["root"] / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"app_{name}.png"), full_page=True)
    return out / f"app_{name}.png"


def test_generate_reconstruct_and_browse_in_chromium(server, browser_page, tmp_path):
    page, problems = browser_page
    t0 = time.perf_counter()
    page.goto(server["url"])
    page.wait_for_selector("#generate-btn", timeout=30_000)
    load_s = time.perf_counter() - t0

    # ---- generate: the shipped VecSet pair, class chair (preselected), 3D view, downloads, gallery
    page.fill("#seed input", "7")
    page.fill("#steps input[type=number]", "60")
    page.keyboard.press("Enter")
    t0 = time.perf_counter()
    page.click("#generate-btn")
    # the progress bar follows the sampler step by step ("k/60 steps", from its tqdm bar)
    page.wait_for_selector("#gen-view .progress-text:has-text('/60 steps')", timeout=60_000)
    page.wait_for_selector("#gen-view canvas", state="visible", timeout=60_000)
    page.wait_for_selector("#gen-files a", timeout=30_000)
    gen_s = time.perf_counter() - t0
    assert "1 shape(s) from" in page.inner_text("#gen-status")
    page.wait_for_selector("#gen-gallery img", timeout=10_000)
    links = page.locator("#gen-files a")
    names = []
    for i in range(links.count()):
        with page.expect_download() as dl:
            links.nth(i).click()
        path = tmp_path / dl.value.suggested_filename
        dl.value.save_as(path)
        names.append(path.name)
        mesh = trimesh.load(path, force="mesh", process=False)
        assert len(mesh.faces) > 100, path.name
    assert sorted(names) == ["sample_00.glb", "sample_00.obj", "sample_00.ply"], names
    page.wait_for_timeout(500)  # let the 3D view render a frame
    _screenshot(page, server, "generate")

    # ---- reconstruct: upload a torus, the sparse VAE (default), both 3D views and the metrics
    page.get_by_role("tab", name="Reconstruct").click()
    bad = tmp_path / "not_a_mesh.obj"
    bad.write_text("this is not a mesh\n")
    page.set_input_files("#recon-upload input[type=file]", str(bad))
    page.wait_for_selector("#recon-upload a[download='not_a_mesh.obj']", timeout=20_000)
    page.click("#recon-btn")
    message = page.get_by_text("not_a_mesh.obj: not an OBJ file (no vertex 'v' lines in its first 64 KB)")
    message.first.wait_for(timeout=20_000)
    page.locator(".toast-close").first.click()  # dismiss it (the screenshot below shows the result)
    message.first.wait_for(state="hidden", timeout=10_000)
    page.locator("#recon-upload button[aria-label='Clear']").first.click()
    src = tmp_path / "torus.obj"
    trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=32, minor_sections=16).export(src)
    page.set_input_files("#recon-upload input[type=file]", str(src))
    page.wait_for_selector("#recon-upload a[download='torus.obj']", timeout=20_000)
    for slider in ("#recon-res", "#recon-prep-res"):  # 128^3 instead of the default 256^3: a quicker test
        page.fill(f"{slider} input[type=number]", "128")
        page.keyboard.press("Enter")
    t0 = time.perf_counter()
    page.click("#recon-btn")
    page.wait_for_selector("#recon-view canvas", state="visible", timeout=120_000)
    page.wait_for_selector("#recon-input canvas", state="visible", timeout=10_000)
    page.wait_for_selector("#recon-files a", timeout=10_000)
    recon_s = time.perf_counter() - t0
    table = page.inner_text("#recon-metrics")
    assert float(table.split("IoU")[1].split()[0]) > 0.95, table  # the shipped sparse VAE on a torus: about 0.99
    for key in ("IoU", "Chamfer-L1", "F-score@1%", "normal consistency", "preprocess (s)", "decode (s)"):
        assert key in table, table
    page.wait_for_timeout(500)
    _screenshot(page, server, "reconstruct")

    # ---- data: the folder's manifest (a failure and its reason), thumbnails, an object's sample pictures
    page.get_by_role("tab", name="Data").click()
    page.click("#dataset input")
    page.get_by_role("option", name="data/prep").click()
    page.wait_for_selector("#data-thumbs img", timeout=30_000)
    assert "3 objects: 2 ok, 1 failed" in page.inner_text("#data-summary")
    assert "broken.obj" in page.inner_text("#data-table") and "failed" in page.inner_text("#data-table")
    page.click("#data-object input")
    page.get_by_role("option").first.click()
    page.wait_for_function("document.querySelectorAll('#data-pictures img').length >= 3", timeout=30_000)
    page.wait_for_timeout(300)
    _screenshot(page, server, "data")

    # ---- errors a visitor causes are one line in the page: a checkpoint outside --runs, an empty generation
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("Other checkpoints").click()
    page.locator("#dit-path textarea, #dit-path input").first.fill("/etc/passwd")
    page.keyboard.press("Enter")
    page.get_by_text("/etc/passwd: not under the app's checkpoint folders (--runs)").first.wait_for(timeout=20_000)
    page.locator("#dit-path textarea, #dit-path input").first.fill("")
    page.fill("#tokens input", "1")
    page.fill("#steps input[type=number]", "1")
    page.keyboard.press("Enter")
    page.click("#generate-btn")
    page.get_by_text("no shape came out: no sample has a surface").first.wait_for(timeout=30_000)

    problems = [p for p in problems if not KNOWN_CONSOLE_ERROR.match(p)]
    assert not problems, "browser console:\n" + "\n".join(problems)
    (server["root"] / "timings.txt").write_text(
        f"server start {server['start_s']:.1f} s, first page load {load_s:.2f} s, generation {gen_s:.2f} s, "
        f"reconstruction {recon_s:.2f} s\n")
    assert load_s < 15 and gen_s < 60  # loose sanity bounds; the targets are measured by benchmarks/bench_app.py


def test_browser_requirements_message_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    reason = _requirements()
    assert reason is not None and ("/nonexistent/chromium" in reason or "not installed" in reason)


def test_ten_queued_generations_through_the_server_each_get_their_own_output(server, tmp_path):
    """Ten visitors (ten gradio clients, ten sessions) send a generation at once; the server's queue runs them
    all, and each gets the shape of its own seed (the same mesh as the library makes for that seed)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from shapeflow.app.handlers import App

    def one(k: int):
        client = Client(server["url"], verbose=False, download_files=str(tmp_path / f"client{k}"))
        job = client.submit("shipped: vecset", "", "paired", ("mug", "lamp")[k % 2], None, 1, 300 + k, 4, "euler",
                            1.0, 48, 0, api_name="/on_generate")
        return job.result(timeout=240)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    local = App(tmp_path / "local")
    for k, (glb, message, downloads, gallery) in enumerate(results):
        assert "1 shape(s) from" in message and len(downloads) == 3
        assert gallery[0]["caption"] == f"{('mug', 'lamp')[k % 2]} #{300 + k}"
        ref = local.generate("ref", "shipped: vecset", class_name=("mug", "lamp")[k % 2], seed=300 + k, steps=4,
                             method="euler", resolution=48)
        got, want = (trimesh.load(p, force="mesh", process=False) for p in (glb, ref.samples[0].files["glb"]))
        assert len(got.faces) == len(want.faces) and abs(got.vertices - want.vertices).max() < 1e-5
    sessions = list((server["root"] / "out" / "sessions").iterdir())
    assert len(sessions) >= 10  # one folder per visitor (the browser test's visitor too)


def test_the_server_hands_out_no_file_outside_its_output_folder(server):
    root = server["root"]
    probe = root / "out" / "probe.txt"  # the route works for the output folder...
    probe.write_text("inside")
    assert urllib.request.urlopen(f"{server['url']}gradio_api/file={probe}", timeout=10).read() == b"inside"
    # ...and nothing else: not the data it browses, not its log, not system files, not via '..'
    inside_data = next((root / "data" / "prep").rglob("watertight.ply"))
    for path in ("/etc/passwd", str(inside_data), str(root / "app.log"), str(root / "out" / ".." / "app.log")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server['url']}gradio_api/file={path}", timeout=10)
        assert e.value.code in (403, 404), path
