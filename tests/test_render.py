"""Headless renderer: image format, camera convention, shading modes, grids and PNG output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from shapeflow import render


@pytest.fixture(scope="module")
def sphere():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    return m.vertices, m.faces


@pytest.fixture(scope="module")
def bumped():
    """A box with a knob on its +x side: not symmetric under a half turn about y."""
    body = trimesh.creation.box((1.0, 1.0, 1.0))
    knob = trimesh.creation.box((0.5, 0.3, 0.3))
    knob.apply_translation((0.7, 0.0, 0.0))
    m = trimesh.util.concatenate([body, knob])
    return m.vertices, m.faces


def test_image_format_and_coverage(sphere):
    img = render.render_mesh(*sphere, size=48)
    assert img.shape == (48, 48, 4) and img.dtype == np.uint8
    assert img[24, 24, 3] == 255  # the object covers the centre
    for r, c in [(0, 0), (0, 47), (47, 0), (47, 47)]:
        assert img[r, c, 3] == 0 and (img[r, c, :3] == 0).all()
    alpha = img[..., 3]
    assert ((alpha > 0) & (alpha < 255)).any()  # anti-aliased edge: fractional coverage
    # Rectangular sizes are (width, height).
    assert render.render_mesh(*sphere, size=(40, 24)).shape == (24, 40, 4)


def test_background_is_composited(sphere):
    img = render.render_mesh(*sphere, size=32, background=(10, 200, 30))
    assert (img[..., 3] == 255).all()
    np.testing.assert_array_equal(img[0, 0, :3], [10, 200, 30])
    plain = render.render_mesh(*sphere, size=32)
    np.testing.assert_array_equal(img[16, 16, :3], plain[16, 16, :3])  # fully covered pixels unchanged


def test_camera_convention_and_opposite_views(bumped):
    front = render.render_mesh(*bumped, size=64, azimuth=0.0, elevation=0.0, distance=3.0)
    back = render.render_mesh(*bumped, size=64, azimuth=180.0, elevation=0.0, distance=3.0)
    assert (front[..., 3] != back[..., 3]).sum() > 100
    # Azimuth 0 looks from +z, so +x (the knob) is on the right; from behind it is on the left.
    cover_f, cover_b = front[..., 3] > 0, back[..., 3] > 0
    assert cover_f[:, 40:].sum() > cover_f[:, :24].sum()
    assert cover_b[:, :24].sum() > cover_b[:, 40:].sum()
    # From above (elevation 90) the silhouette is also the knob-on-the-right one.
    top = render.render_mesh(*bumped, size=64, azimuth=0.0, elevation=90.0, distance=3.0)[..., 3] > 0
    assert top[:, 40:].sum() > top[:, :24].sum()


def test_shading_modes(sphere):
    lam = render.render_mesh(*sphere, size=64, shading="lambert", ambient=0.2)
    # Headlight: the centre (facing the camera) is brighter than a rim pixel.
    rim_col = np.nonzero(lam[32, :, 3] == 255)[0].min()
    assert lam[32, 32, :3].astype(int).sum() > lam[32, rim_col, :3].astype(int).sum() + 30
    nrm = render.render_mesh(*sphere, size=64, shading="normal")
    # Camera-space normal at the centre is ~(0, 0, 1) -> RGB ~(128, 128, 255).
    np.testing.assert_allclose(nrm[32, 32, :3], [128, 128, 255], atol=12)
    # Left of centre the normal points to -x (red < 128), above it to +y (green > 128).
    assert nrm[32, 24, 0] < 100 and nrm[24, 32, 1] > 156
    flat = render.render_mesh(*sphere, size=64, smooth=False)
    assert flat.shape == lam.shape
    with pytest.raises(ValueError, match="shading"):
        render.render_mesh(*sphere, size=8, shading="phong")


def test_render_views(sphere, bumped):
    imgs, cams = render.render_views(*bumped, n_views=3, size=32)
    assert len(imgs) == len(cams) == 3
    assert [c["azimuth"] for c in cams] == [45.0, 165.0, 285.0]
    json.dumps(cams)  # serialisable
    # The camera model: the world origin projects to the image centre.
    c2w = np.array(cams[0]["cam_to_world"])
    p_cam = np.linalg.inv(c2w) @ np.array([0.0, 0.0, 0.0, 1.0])
    k = cams[0]["intrinsics"]
    u = k["fx"] * p_cam[0] / -p_cam[2] + k["cx"]
    v = -k["fy"] * p_cam[1] / -p_cam[2] + k["cy"]
    assert (u, v) == pytest.approx((16.0, 16.0))
    a1, c1 = render.render_views(*bumped, n_views=2, size=16, seed=3)
    a2, c2 = render.render_views(*bumped, n_views=2, size=16, seed=3)
    assert c1 == c2 and all((x == y).all() for x, y in zip(a1, a2))
    assert c1 != render.render_views(*bumped, n_views=2, size=16, seed=4)[1]
    _, fixed = render.render_views(*sphere, size=16, azimuths=[10, 20], elevation=[5, 6])
    assert [(c["azimuth"], c["elevation"]) for c in fixed] == [(10.0, 5.0), (20.0, 6.0)]


def test_image_grid_and_png(tmp_path, sphere):
    from PIL import Image

    imgs, _ = render.render_views(*sphere, n_views=3, size=24)
    grid = render.image_grid(imgs, ncols=2, pad=2)
    assert grid.shape == (2 * (24 + 2) + 2, 2 * (24 + 2) + 2, 3) and grid.dtype == np.uint8
    assert (grid[0, 0] == 255).all()  # white padding
    labelled = render.image_grid(imgs, ncols=2, pad=2, labels=["a", "bb", "ccc"])
    assert labelled.shape[0] > grid.shape[0]
    strip = labelled[2 + 24: 2 + 24 + 10, 2: 2 + 24]  # under the first tile
    assert (strip < 128).any()  # text was drawn
    with pytest.raises(ValueError, match="labels"):
        render.image_grid(imgs, labels=["x"])
    path = tmp_path / "sub" / "preview.png"
    render.save_png(path, labelled)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), labelled)
    render.save_png(tmp_path / "rgba.png", imgs[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgba.png")), imgs[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    with pytest.raises(ValueError, match="uint8"):
        render.save_png(tmp_path / "bad.png", imgs[0].astype(np.float32))
    preview = render.render_preview(*sphere, n_views=2, size=20)
    assert preview.shape == (20 + 8, 2 * 24 + 4, 3)


def test_runs_without_a_display(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    code = (
        "import trimesh, numpy as np; from shapeflow import render; "
        "m = trimesh.creation.box(); img = render.render_mesh(m.vertices, m.faces, size=16); "
        "assert img[8, 8, 3] == 255; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
