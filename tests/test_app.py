"""The web app's request handling (``shapeflow.app.handlers``), without gradio or a browser.

Generation and reconstruction run the shipped tiny checkpoints; the data tab reads a small preprocessed
folder made here (one object fails on purpose). The browser test is ``test_app_browser.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from shapeflow import cli
from shapeflow.app.handlers import App, AppError, check_upload
from shapeflow.checkpoint import read_config
from shapeflow.commands.app import is_loopback
from shapeflow.data import preprocess as pp
from shapeflow.generate import PIPELINES

FAST = dict(steps=4, method="euler", resolution=48)  # a tiny generation: well under a second here


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A preprocessed folder with two good objects and one failed (a corrupt OBJ)."""
    root = tmp_path_factory.mktemp("data")
    for cls, mesh in (("ball", trimesh.creation.icosphere(2)), ("box", trimesh.creation.box((1, 2, 1)))):
        (root / "in" / cls).mkdir(parents=True)
        mesh.export(root / "in" / cls / f"{cls}_0.obj")
    (root / "in" / "box" / "broken.obj").write_text("v 0 0 0\nf 1 2 3 4\n")
    cfg = pp.PreprocessConfig(resolution=32, surface_points=400, sharp_points=0, sdf_points=600)
    pp.preprocess_dataset(root / "in", root / "prep", cfg, workers=0, progress=False)
    return root / "prep"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A --runs root holding a copy of the shipped VecSet pair as a 'training run' folder each."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(PIPELINES["vecset"]["dit"], root / "dit_run" / "final")
    shutil.copytree(PIPELINES["vecset"]["vae"], root / "vae_run" / "final")
    return root


@pytest.fixture(scope="module")
def app(tmp_path_factory, prepared, runs) -> App:
    return App(tmp_path_factory.mktemp("app_out"), runs=[runs], data=[prepared.parent], max_upload_mb=1)


def _mesh_digest(path: Path) -> str:
    m = trimesh.load(path, force="mesh", process=False)
    return hashlib.sha256(np.round(np.asarray(m.vertices), 5).tobytes() + np.asarray(m.faces).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------- catalogue


def test_catalog_lists_shipped_and_found_checkpoints_and_data(app, prepared):
    gens, vaes = app.catalog.generators, app.catalog.vaes
    assert {"shipped: vecset", "shipped: sparse"} <= set(gens)
    found = [g for g in gens.values() if g.dit.name == "dit_run"]
    assert len(found) == 1 and "token_dit" in found[0].label
    assert any(p.name == "vae_run" for p in vaes.values()) and "shipped: sparse" in vaes
    assert list(app.catalog.datasets.values()) == [prepared.resolve()]


def test_checkpoint_paths_are_confined_to_the_roots(app, runs, tmp_path):
    dit, kind = app.catalog.checkpoint(str(runs / "dit_run"), ("token_dit", "grid_dit", "sparse_dit"))
    assert kind == "token_dit" and dit == (runs / "dit_run").resolve()
    assert app.catalog.checkpoint("dit_run", ("token_dit",))[0] == dit  # relative to a root
    outside = tmp_path / "elsewhere"
    shutil.copytree(PIPELINES["vecset"]["dit"], outside)
    for text in (str(outside), "/etc/passwd", str(runs / ".." / ".." / "etc"), "../../../../etc/passwd"):
        with pytest.raises(AppError, match="not under the app's checkpoint folders"):
            app.catalog.checkpoint(text, ("token_dit",))
    link = runs / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(AppError, match="not under the app's checkpoint folders"):
            app.catalog.checkpoint(str(link), ("token_dit",))
    finally:
        link.unlink()
    with pytest.raises(AppError, match="is a vecset_vae checkpoint, not one of token_dit"):
        app.catalog.checkpoint(str(runs / "vae_run"), ("token_dit",))
    with pytest.raises(AppError, match="no such checkpoint"):
        app.catalog.checkpoint(str(runs / "missing"), ("token_dit",))


# ------------------------------------------------------------------------------------------- generation


def test_generation_writes_the_visitors_files_and_matches_the_library(app):
    g = app.generate("visitor-a", "shipped: vecset", class_name="mug", num=2, seed=3, **FAST)
    assert g.folder.is_relative_to(app.session_dir("visitor-a")) and app.owns("visitor-a", g.folder)
    assert not app.owns("visitor-b", g.folder)
    assert [s.index for s in g.samples] == [0, 1] and [s.label for s in g.samples] == ["mug", "mug"]
    for s in g.samples:
        assert set(s.files) == {"glb", "obj", "ply"} and s.preview.is_file()
        meshes = [trimesh.load(p, force="mesh", process=False) for p in s.files.values()]
        assert {len(m.faces) for m in meshes} == {s.faces} and s.faces > 100
        assert s.files["glb"].read_bytes()[:4] == b"glTF"
    meta = json.loads((g.folder / "generate.json").read_text())
    assert meta["seed"] == 3 and meta["class"] == "mug" and meta["files"]["1"]["glb"] == "sample_01.glb"
    # the same request through the command line gives the same mesh (same seed -> same shape)
    out = g.folder.parent / "cli"
    assert cli.main(["generate", "--class", "mug", "--num", "2", "--seed", "3", "--steps", "4", "--method", "euler",
                     "--resolution", "48", "--out", str(out)]) == 0
    assert _mesh_digest(out / "sample_001.glb") == _mesh_digest(g.samples[1].files["glb"])


def test_generation_with_a_found_checkpoint_and_a_chosen_vae(app):
    label = next(k for k, g in app.catalog.generators.items() if g.dit.name == "dit_run")
    vae = next(k for k, p in app.catalog.vaes.items() if p.name == "vae_run")
    info = app.generator_info(label)
    assert info["cond"] == "class" and "chair" in info["classes"]
    g = app.generate("visitor-a", label, vae=vae, class_name="chair", **FAST)
    ref = app.generate("visitor-a", "shipped: vecset", class_name="chair", **FAST)
    assert _mesh_digest(g.samples[0].files["glb"]) == _mesh_digest(ref.samples[0].files["glb"])


def test_image_conditional_generation_with_a_local_image_encoder(tmp_path):
    """An image-conditional DiT found under --runs (random weights: the path, not the shape, is tested) with a
    local DINOv2 folder as the image encoder; the class list is empty and the image is required."""
    from PIL import Image
    from transformers import AutoModel, Dinov2Config

    from shapeflow.models.dit import TokenDiT, TokenDiTConfig

    torch.manual_seed(0)
    AutoModel.from_config(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56)).save_pretrained(
        tmp_path / "dino")
    TokenDiT(TokenDiTConfig(in_channels=16, width=32, depth=1, heads=2, cond="image", cond_dim=32,
                            num_tokens=64)).save_pretrained(tmp_path / "runs" / "image_dit")
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 20:44] = (200, 30, 30, 255)
    Image.fromarray(img).save(tmp_path / "photo.png")
    app = App(tmp_path / "out", runs=[tmp_path / "runs"], image_encoder=str(tmp_path / "dino"))
    label = next(k for k in app.catalog.generators if "image_dit" in k)
    assert app.generator_info(label) == {"cond": "image", "classes": [], "kind": "token_dit", "sampler": None}
    with pytest.raises(AppError, match="no VAE is paired"):
        app.generate("v", label, image=str(tmp_path / "photo.png"), **FAST)
    with pytest.raises(AppError, match="image-conditional; upload an image"):
        app.generate("v", label, vae="shipped: vecset", **FAST)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AppError, match="broken.png: cannot read image"):
        app.generate("v", label, vae="shipped: vecset", image=str(tmp_path / "broken.png"), **FAST)
    missing = App(tmp_path / "out2", runs=[tmp_path / "runs"], image_encoder=str(tmp_path / "no_such_dino"))
    with pytest.raises(AppError, match="no_such_dino: cannot load"):
        missing.generate("v", label, vae="shipped: vecset", image=str(tmp_path / "photo.png"), **FAST)
    g = app.generate("v", label, vae="shipped: vecset", image=str(tmp_path / "photo.png"), **FAST)
    assert g.samples[0].label == "image" and g.samples[0].files["glb"].is_file()


def test_generation_errors_are_one_readable_line(app, runs):
    cases = [
        (dict(generator="no such model"), "unknown generator 'no such model'"),
        (dict(generator="shipped: vecset", dit_path="/etc/passwd"), "not under the app's checkpoint folders"),
        (dict(generator="shipped: vecset", dit_path=str(runs / "vae_run")), "is a vecset_vae checkpoint"),
        (dict(generator="shipped: vecset", class_name=None), "class-conditional; pick a class"),
        (dict(generator="shipped: vecset", class_name="dragon"), "unknown class 'dragon'"),
        (dict(generator="shipped: vecset", class_name="mug", vae="nope"), "unknown VAE 'nope'"),
        (dict(generator="shipped: vecset", class_name="mug", steps=0), "steps must be 1 to 500"),
        # an empty generation: one latent token and one Euler step decode to a field with no surface
        (dict(generator="shipped: vecset", class_name="mug", steps=1, method="euler", resolution=32, num_tokens=1),
         "no shape came out: no sample has a surface"),
    ]
    for kwargs, message in cases:
        gen = kwargs.pop("generator")
        with pytest.raises(AppError, match=message) as e:
            app.generate("visitor-c", gen, **kwargs)
        assert "\n" not in str(e.value)


def test_ten_concurrent_generations_each_get_their_own_correct_output(app):
    """Ten requests at once (ten visitors, ten seeds, two classes) on one shared model pair: every result is
    in its visitor's folder and equals the same request run alone."""
    requests = [(f"visitor-{k}", ("chair", "vase")[k % 2], 100 + k) for k in range(10)]
    loads = app.models.loads
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda r: app.generate(r[0], "shipped: vecset", class_name=r[1], seed=r[2], **FAST),
                                requests))
    assert app.models.loads == loads  # the shipped pair was already loaded: no second copy
    folders = {g.folder for g in results}
    assert len(folders) == 10
    for (session, cls, seed), g in zip(requests, results):
        assert app.owns(session, g.folder) and g.settings["seed"] == seed and g.samples[0].label == cls
        alone = app.generate("check", "shipped: vecset", class_name=cls, seed=seed, **FAST)
        assert _mesh_digest(g.samples[0].files["glb"]) == _mesh_digest(alone.samples[0].files["glb"])
    assert len({_mesh_digest(g.samples[0].files["glb"]) for g in results}) == 10


def test_model_cache_loads_a_checkpoint_once_under_concurrent_requests(tmp_path):
    app = App(tmp_path)
    barrier = threading.Barrier(6)

    def get(_):
        barrier.wait()
        return app._model("vae", PIPELINES["vecset"]["vae"])[0]

    with ThreadPoolExecutor(6) as pool:
        models = list(pool.map(get, range(6)))
    assert app.models.loads == 1 and all(m is models[0] for m in models)


# ------------------------------------------------------------------------------------------- reconstruction


def test_reconstruction_of_an_upload_gives_meshes_metrics_and_times(app, tmp_path):
    src = tmp_path / "Ring Upload.obj"  # a torus: no training class; a name with a space
    trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=32, minor_sections=16).export(src)
    r = app.reconstruct("visitor-r", str(src), "shipped: sparse", resolution=128, prep_resolution=128,
                        n_points=20_000)
    assert app.owns("visitor-r", r.folder) and r.watertight.read_bytes()[:4] == b"glTF"
    assert [p.suffix for p in r.files] == [".glb", ".obj", ".ply"] and all(p.is_file() for p in r.files)
    m = r.metrics
    assert m["iou"] > 0.95 and m["f_score@1%"] > 0.9 and m["normal_consistency"] > 0.97, m
    assert set(r.seconds) == {"upload check", "preprocess", "encode", "decode", "metrics"}
    assert all(v >= 0 for v in r.seconds.values())
    assert json.loads((r.folder / "metrics.json").read_text())["source"] == "Ring Upload.obj"


def _glb_with_external_buffer(path: Path) -> None:
    doc = json.dumps({"asset": {"version": "2.0"}, "buffers": [{"uri": "../../../etc/passwd", "byteLength": 10}]})
    doc = doc.encode() + b" " * (-len(doc) % 4)
    path.write_bytes(b"glTF" + struct.pack("<II", 2, 20 + len(doc)) + struct.pack("<II", len(doc), 0x4E4F534A) + doc)


def test_bad_uploads_are_refused_before_the_mesh_reader(app, tmp_path):
    bad = {
        "notes.txt": (b"hello", "unsupported mesh format '.txt'"),
        "scene.gltf": (b"{}", "unsupported mesh format '.gltf'"),
        "empty.obj": (b"", "empty file"),
        "binary.obj": (b"\x00\x01\x02v 1 2 3", "not an OBJ file \\(binary content\\)"),
        "words.obj": (b"this is not a mesh\n", "no vertex 'v' lines"),
        "fake.glb": (b"PK\x03\x04" + b"\0" * 40, "no 'glTF' magic"),
        "fake.ply": (b"solid x\n", "no 'ply' header"),
        "fake.stl": (b"\x00" * 90, "neither a binary STL"),
        "fake.off": (b"3 1 0\n", "no 'OFF' header"),
        "big.obj": (b"v 0 0 0\n" * 200_000, "over the upload limit of 1 MB"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AppError, match=message) as e:
            app.reconstruct("visitor-u", str(tmp_path / name), "shipped: sparse")
        assert str(e.value).startswith(f"{name}: ") and "\n" not in str(e.value)
    _glb_with_external_buffer(tmp_path / "outside.glb")
    with pytest.raises(AppError, match="refer to outside files"):
        check_upload(tmp_path / "outside.glb", 2**20)
    # passes the checks but is no usable mesh: the reader's one-line reason, under the visitor's file name
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(AppError, match=r"^flat\.obj: ") as e:
        app.reconstruct("visitor-u", str(tmp_path / "flat.obj"), "shipped: sparse", resolution=64,
                        prep_resolution=64)
    assert str(tmp_path) not in str(e.value) and "\n" not in str(e.value)
    good = tmp_path / "ok.stl"
    trimesh.creation.box().export(good)
    assert check_upload(good, 2**20) == ".stl"
    with pytest.raises(AppError, match="unknown VAE"):
        app.reconstruct("visitor-u", str(good), "../../etc")


# ------------------------------------------------------------------------------------------- data


def test_data_browsing_lists_status_failures_thumbnails_and_samples(app, prepared):
    label = next(iter(app.catalog.datasets))
    rows = app.data_objects(label)
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["source"] == "broken.obj" and "broken.obj: cannot parse OBJ" in failed["error"]  # the reason
    assert str(prepared.parent) not in failed["error"]
    thumbs = app.data_thumbnails(label)
    assert sorted(c for _, c in thumbs) == ["ball/ball_0.obj", "box/box_0.obj"]
    assert all(p.is_file() and p.is_relative_to(app.out) for p, _ in thumbs)
    ok = next(r["id"] for r in rows if r["source"] == "box_0.obj")
    pics = app.data_pictures(label, ok)
    assert [c.split(" ")[0] for _, c in pics] == ["surface", "SDF", "64^3"]
    from PIL import Image
    for p, _ in pics:
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.std() > 10  # a picture, not a blank tile
    sdf = np.asarray(Image.open(pics[1][0]).convert("RGB")).astype(int)
    assert ((sdf[..., 2] > 150) & (sdf[..., 0] < 120)).sum() > 500  # blue inside the box
    with pytest.raises(AppError, match="failed in preprocessing"):
        app.data_pictures(label, failed["id"])
    with pytest.raises(AppError, match="no object"):
        app.data_pictures(label, "../../etc")
    with pytest.raises(AppError, match="unknown data folder"):
        app.data_objects("/etc")


# ------------------------------------------------------------------------------------------- command


def test_app_command_warns_off_loopback_and_refuses_bad_settings(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert cli.main(["app", "--host", "0.0.0.0", "--port", "70000"]) == 2  # refused before anything starts
    err = capsys.readouterr().err.strip().splitlines()
    assert "WARNING: listening on 0.0.0.0: the app has no authentication" in err[0]
    assert err[1] == "shapeflow app: error: --port 70000: not a port number"
    assert cli.main(["app", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "shapeflow app: error: --concurrency must be >= 1"  # loopback by default: no warning


def test_shipped_checkpoints_are_in_the_catalog_by_their_kind():
    for name, p in PIPELINES.items():
        assert read_config(p["dit"])["kind"].endswith("dit"), name


def test_hunyuan_release_folders_generate_from_an_image_with_their_own_encoder(tmp_path):
    """Released Hunyuan3D folders under --runs (tiny, random weights): the DiT folder is a generator (not the
    VAE it bundles), the image goes through the release's DINOv2 and recipe, latent tokens default to the VAE's
    count, and an alpha-less photo is a one-line message."""
    from PIL import Image
    from test_hunyuan_dit import _release_pair, _rgba_object

    dit, vae = _release_pair(tmp_path / "runs")
    app = App(tmp_path / "out", runs=[tmp_path / "runs"])
    label = next(k for k in app.catalog.generators if "runs/dit" in k)
    vae_label = next(k for k in app.catalog.vaes if "runs/vae" in k)
    info = app.generator_info(label)
    assert info["kind"] == "hunyuan21_dit" and info["sampler"] == {"steps": 49, "method": "euler", "cfg": 5.0}
    Image.fromarray(_rgba_object(), mode="RGBA").save(tmp_path / "photo.png")
    try:
        g = app.generate("v", label, vae=vae_label, image=str(tmp_path / "photo.png"), steps=2, method="euler",
                         cfg=5.0, resolution=32)
        assert g.settings["num_tokens"] == 32 and g.samples[0].files["glb"].is_file()
    except AppError as e:  # random weights may decode no surface: then the message says so
        assert "no shape came out" in str(e)
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "shot.jpg")
    with pytest.raises(AppError, match=r"^shot\.jpg: no alpha channel"):
        app.generate("v", label, vae=vae_label, image=str(tmp_path / "shot.jpg"), steps=1, resolution=32)
