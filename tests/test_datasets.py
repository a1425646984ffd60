"""Torch datasets over a preprocessed folder: shapes, labels, splits, worker-safe subsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from torch.utils.data import DataLoader

from shapeflow.data import preprocess as pp
from shapeflow.data.datasets import (
    GridDataset,
    SparseSDFDataset,
    VecSetDataset,
    class_names,
    collate_sparse,
    is_val,
)

COUNTS = dict(surface_points=32, sharp_points=8, n_queries=32)

CFG = pp.PreprocessConfig(resolution=32, surface_points=400, sharp_points=100, sdf_points=900, tsdf_res=8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    shapes = {
        "ball": [trimesh.creation.icosphere(3, radius=r) for r in (0.5, 0.8)],  # smooth: no sharp edges
        "cube": [trimesh.creation.box(extents=e) for e in ((1, 1, 1), (1, 2, 1), (2, 1, 0.5))],
    }
    for cls, meshes in shapes.items():
        for k, m in enumerate(meshes):
            p = root / "in" / cls / f"{cls}_{k:04d}.obj"
            p.parent.mkdir(parents=True, exist_ok=True)
            m.export(p)
    s = pp.preprocess_dataset(root / "in", root / "out", CFG, workers=0, progress=False)
    assert s.ok == 5
    return root / "out"


def test_vecset_item_shapes_and_values(prepared):
    ds = VecSetDataset(prepared, surface_points=64, sharp_points=16, n_queries=90, split="all",
                       classes=["ball", "cube"])
    assert len(ds) == 5
    for i in range(len(ds)):
        item = ds[i]
        assert item["surface"].shape == (80, 7) and item["surface"].dtype == torch.float32
        assert item["points"].shape == (90, 3) and item["sdf"].shape == (90,)
        assert isinstance(item["id"], str) and item["label"] in (0, 1)
        n = item["surface"][:, 3:6]
        assert torch.allclose(n.norm(dim=1), torch.ones(80), atol=1e-5)
        flag = item["surface"][:, 6]
        assert (flag[:64] == 0).all()
        rec = ds.records[i]
        if "cube" in rec["source"]:
            assert (flag[64:] == 1).all()  # boxes have sharp edges
        else:
            assert (flag[64:] == 0).all()  # no sharp samples: the sharp slots hold uniform points
    # Labels follow the parent folder.
    labels = {ds.records[i]["source"].split("/")[-2]: ds[i]["label"] for i in range(len(ds))}
    assert labels == {"ball": 0, "cube": 1}
    assert class_names(prepared) == ["ball", "cube"]


def test_vecset_sdf_sign_matches_geometry(prepared):
    ds = VecSetDataset(prepared, surface_points=8, sharp_points=0, n_queries=500, query_fractions=(1, 0, 0),
                       split="all")
    eps = CFG.eps_voxels * 2.0 / CFG.resolution
    for i in range(len(ds)):
        item = ds[i]
        pts, sdf = item["points"].numpy(), item["sdf"].numpy()
        assert sdf.min() < 0  # (at res 32 eps ~ the 0.05 margin: a cube's shell can fill the whole box)
        if "ball" in ds.records[i]["source"]:
            # A sphere of radius 0.95 (canonical frame) grown by eps: |x| - (0.95 + eps) up to tessellation.
            r = np.linalg.norm(pts, axis=1)
            assert np.abs(sdf - (r - 0.95 - eps)).max() < 0.03


def test_query_group_fractions(prepared):
    ds = VecSetDataset(prepared, surface_points=8, sharp_points=0, n_queries=100, query_fractions=(0, 1, 0),
                       split="all")
    item = ds[0]
    # All points come from the fine near-surface group: |sdf| small.
    assert item["sdf"].abs().max() < 0.06
    assert (item["groups"] == 1).all()
    ds = VecSetDataset(prepared, surface_points=8, sharp_points=0, n_queries=100, query_fractions=(0.5, 0.2, 0.3),
                       split="all")
    assert np.bincount(ds[1]["groups"].numpy(), minlength=3).tolist() == [50, 20, 30]


def test_vecset_items_are_rows_of_the_file(prepared):
    # every drawn surface point / query is one row of the object's arrays, with its own normal, flag,
    # value and group (the loader reads them through memory maps)
    from shapeflow.data import format as fmt

    ds = VecSetDataset(prepared, surface_points=50, sharp_points=20, n_queries=120, split="all")
    for i in range(len(ds)):
        a = fmt.read_sample_file(ds.object_dir(i) / fmt.SAMPLES_FILE)
        item = ds[i]
        table = np.concatenate([a["surface_points"], a["surface_normals"]], axis=1)
        for row in item["surface"].numpy():
            hit = np.flatnonzero((table == row[:6]).all(axis=1))
            assert len(hit) and a["surface_sharp"][hit[0]] == bool(row[6])
        for p, v, g in zip(item["points"].numpy(), item["sdf"].numpy(), item["groups"].numpy()):
            hit = np.flatnonzero((a["sdf_points"] == p).all(axis=1))
            assert len(hit) and a["sdf_values"][hit[0]] == v and a["sdf_group"][hit[0]] == g


def test_splits_are_disjoint_and_cover(prepared):
    tr = VecSetDataset(prepared, split="train", val_fraction=0.4, **COUNTS)
    va = VecSetDataset(prepared, split="val", val_fraction=0.4, **COUNTS)
    ids_tr = {r["id"] for r in tr.records}
    ids_va = {r["id"] for r in va.records}
    assert not ids_tr & ids_va and len(ids_tr | ids_va) == 5
    assert all(is_val(i, 0.4) for i in ids_va)
    assert len(VecSetDataset(prepared, split="val", val_fraction=0.0, **COUNTS)) == 0
    assert len(VecSetDataset(prepared, split="train", val_fraction=0.0, **COUNTS)) == 5
    with pytest.raises(ValueError):
        VecSetDataset(prepared, split="test", **COUNTS)


def test_subsamples_differ_between_items_calls_and_workers(prepared):
    ds = VecSetDataset(prepared, surface_points=32, sharp_points=8, n_queries=32, split="all")
    torch.manual_seed(0)
    a, b = ds[0], ds[0]
    assert not torch.equal(a["points"], b["points"])  # the main process advances its generator
    # Re-seeding torch reproduces a draw exactly (what the training loop does per item).
    torch.manual_seed(123)
    c = ds[0]
    torch.manual_seed(123)
    d = ds[0]
    assert torch.equal(c["points"], d["points"]) and torch.equal(c["surface"], d["surface"])
    # Two DataLoader workers reading the same object draw different subsamples.
    same = torch.utils.data.Subset(ds, [0, 0, 0, 0])
    loader = DataLoader(same, batch_size=1, num_workers=2, shuffle=False,
                        generator=torch.Generator().manual_seed(0))
    batches = [b["points"][0] for b in loader]
    assert len(batches) == 4
    assert not torch.equal(batches[0], batches[1])  # worker 0 vs worker 1
    assert not torch.equal(batches[0], batches[2])  # worker 0, next item


def test_grid_dataset(prepared):
    occ = GridDataset(prepared, source="occ64", split="all", classes={"ball": 3, "cube": 7})
    item = occ[0]
    assert item["grid"].shape == (1, 64, 64, 64) and item["grid"].dtype == torch.float32
    assert set(torch.unique(item["grid"]).tolist()) == {0.0, 1.0}
    assert item["label"] in (3, 7)
    ts = GridDataset(prepared, source="tsdf", split="all")
    ball = next(i for i, r in enumerate(ts.records) if "ball" in r["source"])
    g = ts[ball]["grid"]
    assert g.shape == (1, 9, 9, 9)
    # Normalised by the truncation (2 voxels = 0.5): the ball's centre is deep inside, corners outside.
    assert g.min() >= -1 and g.max() <= 1 and g[0, 4, 4, 4] == -1 and g[0, 0, 0, 0] == 1
    with pytest.raises(ValueError):
        GridDataset(prepared, source="voxels")


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        VecSetDataset(tmp_path, **COUNTS)


SPARSE_RES = 32


@pytest.fixture(scope="module")
def prepared_sparse(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    meshes = {"ball": trimesh.creation.icosphere(2, radius=0.7), "cube": trimesh.creation.box(extents=(1, 2, 1))}
    for cls, m in meshes.items():
        p = root / "in" / cls / f"{cls}_0000.obj"
        p.parent.mkdir(parents=True, exist_ok=True)
        m.export(p)
    cfg = pp.PreprocessConfig(resolution=32, surface_points=200, sharp_points=50, sdf_points=300,
                              sparse_res=SPARSE_RES)
    assert pp.preprocess_dataset(root / "in", root / "out", cfg, workers=0, progress=False).ok == 2
    return root / "out"


def test_sparse_items_are_the_stored_band(prepared_sparse):
    from shapeflow.data import format as fmt

    ds = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all", classes=["ball", "cube"])
    assert len(ds) == 2
    for i in range(len(ds)):
        item = ds[i]
        a = fmt.read_sample_file(ds.object_dir(i) / fmt.SAMPLES_FILE)
        assert item["coords"].dtype == torch.int32 and item["coords"].shape == (len(a["sparse_sdf"]), 3)
        assert item["sdf"].dtype == torch.float32
        assert np.array_equal(item["coords"].numpy(), a["sparse_coords"])
        assert np.array_equal(item["sdf"].numpy(), a["sparse_sdf"])
        assert item["id"] == ds.records[i]["id"] and item["label"] in (0, 1)


def test_collate_sparse_batches_by_concatenation(prepared_sparse):
    ds = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all")
    items = [ds[0], ds[1]]
    batch = collate_sparse(items)
    n = [len(it["sdf"]) for it in items]
    assert batch["batch_size"] == 2 and batch["id"] == [it["id"] for it in items]
    c = batch["coords"]
    assert c.dtype == torch.int32 and c.shape == (sum(n), 4) and batch["sdf"].shape == (sum(n),)
    assert c[:, 0].tolist() == [0] * n[0] + [1] * n[1]
    key = ((c[:, 0].long() * 33 + c[:, 1]) * 33 + c[:, 2]) * 33 + c[:, 3]
    assert bool((key[1:] > key[:-1]).all())  # sorted by (b, i, j, k)
    assert torch.equal(batch["sdf"], torch.cat([it["sdf"] for it in items]))
    # an unsorted item is sorted with its values
    shuffled = dict(items[0])
    perm = torch.randperm(n[0], generator=torch.Generator().manual_seed(0))
    shuffled["coords"], shuffled["sdf"] = items[0]["coords"][perm], items[0]["sdf"][perm]
    again = collate_sparse([shuffled])
    assert torch.equal(again["coords"][:, 1:], items[0]["coords"]) and torch.equal(again["sdf"], items[0]["sdf"])
    # through a DataLoader, with labels
    labelled = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all", classes={"ball": 4, "cube": 9})
    (b,) = list(DataLoader(labelled, batch_size=2, collate_fn=collate_sparse))
    assert b["label"].tolist() == [labelled[0]["label"], labelled[1]["label"]] and b["label"].dtype == torch.int64
    assert torch.equal(b["coords"], collate_sparse([labelled[0], labelled[1]])["coords"])
    with pytest.raises(ValueError):
        collate_sparse([])


def test_sparse_max_nodes_is_a_sorted_seeded_subset(prepared_sparse):
    full = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all")[0]
    ds = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all", max_nodes=100)
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    assert torch.equal(a["coords"], b["coords"]) and len(a["sdf"]) == 100
    assert not torch.equal(a["coords"], ds[0]["coords"])  # the next draw differs
    rows = {tuple(r): v for r, v in zip(full["coords"].tolist(), full["sdf"].tolist())}
    assert all(rows[tuple(r)] == v for r, v in zip(a["coords"].tolist(), a["sdf"].tolist()))
    key = (a["coords"][:, 0].long() * 33 + a["coords"][:, 1]) * 33 + a["coords"][:, 2]
    assert bool((key[1:] > key[:-1]).all())
    with pytest.raises(ValueError):
        SparseSDFDataset(prepared_sparse, res=SPARSE_RES, max_nodes=0)


def test_sparse_dataset_refuses_other_resolutions(prepared_sparse, prepared):
    with pytest.raises(ValueError, match="sparse_res=32, not 64") as err:
        SparseSDFDataset(prepared_sparse, res=64)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sparse_res=None"):  # a folder made without --sparse-res
        SparseSDFDataset(prepared, res=SPARSE_RES)
    # an object that does not match (e.g. copied in from another folder) is named when it is read
    ds = SparseSDFDataset(prepared_sparse, res=SPARSE_RES, split="all")
    ds.res = 64
    with pytest.raises(ValueError, match=ds.records[0]["id"]) as err:
        ds[0]
    assert "\n" not in str(err.value) and "sparse_res 32, not 64" in str(err.value)
    ds.res, ds.root, ds.records = SPARSE_RES, prepared, GridDataset(prepared, split="all").records
    with pytest.raises(ValueError, match=f"{ds.records[0]['id']}.*no sparse SDF band"):
        ds[0]
