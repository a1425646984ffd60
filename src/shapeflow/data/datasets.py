"""PyTorch datasets over a preprocessed folder (``shapeflow preprocess`` output).

Design choices
--------------
* **Objects** = the ``ok`` records of ``OUT_DIR/manifest.jsonl`` (latest record per id,
  :func:`shapeflow.data.preprocess.read_manifest`) whose ``meta.json`` exists, sorted by id.
* **Split** by id hash: an object is in ``val`` iff ``sha256(f"{split_seed}:{id}")`` read as a number
  in [0, 1) is below ``val_fraction``. Deterministic, independent of the folder's size and order, and
  an object never changes side when more objects are added.
* **Labels**: the class of an object is the name of its source file's parent folder (the layout of
  ``shapeflow synth``: ``OUT/<class>/<class>_0001.obj``). With ``classes`` given (a list of names,
  index = label, or a ``{name: label}`` dict) items carry ``"label"`` and objects of other classes are
  left out; :func:`class_names` lists the classes present.
* **Worker-safe random subsampling**: each item draws its own ``numpy`` generator from
  ``(a 63-bit draw of torch's default generator, index)``. DataLoader workers get distinct torch
  seeds (``base_seed + worker_id``, a new base every epoch), the main process advances its generator
  on every item, and shapeflow's training loop re-seeds torch from ``(seed, epoch, index)`` around each
  item, where the draw is then exactly reproducible (``--resume``). The numpy global RNG is never used.
* Subsampling is without replacement when a group has enough points, with replacement otherwise. An
  object without sharp samples fills the sharp slots with uniform points whose sharp flag is 0.
* **Sparse SDF band** (:class:`SparseSDFDataset`, :func:`collate_sparse`): variable-size items (the band
  nodes of one object at the resolution R it was preprocessed with, ``--sparse-res R``), batched by
  concatenation with the batch index as a leading coordinate column (the layout of sparse-convolution
  engines), not by stacking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shapeflow.data import format as fmt
from shapeflow.data.preprocess import CONFIG_FILE, read_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")


def is_val(oid: str, val_fraction: float, split_seed: int = 0) -> bool:
    """Whether object ``oid`` belongs to the validation split (see module docstring)."""
    digest = hashlib.sha256(f"{split_seed}:{oid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def class_of(record: Mapping) -> str:
    """Class name of a manifest record: its source file's parent folder name."""
    return Path(str(record["source"])).parent.name


def class_names(root: str | os.PathLike) -> list[str]:
    """Sorted class names (source parent folders) of the ``ok`` objects of a preprocessed folder."""
    return sorted({class_of(r) for r in read_manifest(root, status="ok")})


class ObjectFolder(Dataset):
    """Base class: the list of usable objects of a preprocessed folder, split and labelled.

    Parameters
    ----------
    root : path
      The ``OUT_DIR`` of ``shapeflow preprocess``.
    split : "train", "val" or "all"
    val_fraction : float
      Share of objects in ``val`` (by id hash).
    split_seed : int
    classes : sequence of str, mapping str -> int, or None
      Class names (index = label) or a name -> label map. None: no labels.

    Raises
    ------
    FileNotFoundError
      If ``root`` has no manifest.
    ValueError
      For an unknown split or a fraction outside [0, 1].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str = "train",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        classes: Sequence[str] | Mapping[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        if not (self.root / "manifest.jsonl").is_file():
            raise FileNotFoundError(f"{self.root}: no manifest.jsonl (not a preprocessed folder)")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        if classes is None:
            self.class_to_label = None
        elif isinstance(classes, Mapping):
            self.class_to_label = {str(k): int(v) for k, v in classes.items()}
        else:
            self.class_to_label = {str(c): i for i, c in enumerate(classes)}
        records = []
        dropped = 0
        for rec in read_manifest(self.root, status="ok"):
            oid = rec.get("id")
            if not oid or not (self.root / oid / fmt.META_FILE).is_file():
                continue
            if split != "all" and is_val(oid, val_fraction, split_seed) != (split == "val"):
                continue
            if self.class_to_label is not None and class_of(rec) not in self.class_to_label:
                dropped += 1
                continue
            records.append(rec)
        if dropped:
            log.info("%s: left out %d object(s) whose class is not in the class list", self.root, dropped)
        self.records = sorted(records, key=lambda r: r["id"])

    def __len__(self) -> int:
        return len(self.records)

    def object_dir(self, index: int) -> Path:
        return self.root / self.records[index]["id"]

    def meta(self, index: int) -> dict:
        """The object's ``meta.json``."""
        return json.loads((self.object_dir(index) / fmt.META_FILE).read_text(encoding="utf-8"))

    def _base_item(self, index: int) -> dict:
        rec = self.records[index]
        item: dict = {"id": rec["id"]}
        if self.class_to_label is not None:
            item["label"] = self.class_to_label[class_of(rec)]
        return item

    @staticmethod
    def _rng(index: int) -> np.random.Generator:
        draw = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        return np.random.default_rng([draw, int(index)])


def _choose_range(rng: np.random.Generator, start: int, stop: int, k: int) -> np.ndarray:
    """``k`` indices drawn from ``range(start, stop)``, without replacement when possible."""
    n = stop - start
    if k <= 0:
        return np.zeros(0, np.int64)
    if n <= 0:
        raise ValueError("cannot draw from an empty set")
    return start + rng.choice(n, size=k, replace=n < k)


class VecSetDataset(ObjectFolder):
    """Items for VecSet VAEs: a surface subsample with its sharp subset, and SDF-labelled queries.

    Parameters
    ----------
    root, split, val_fraction, split_seed, classes
      See :class:`ObjectFolder`.
    surface_points : int
      Uniform surface points per item (the VAE's encoder input, ``VecSetVAEConfig.surface_points``).
    sharp_points : int
      Sharp-edge surface points per item, appended after the uniform ones (``VecSetVAEConfig.sharp_points``).
    n_queries : int
      SDF query points per item.
    query_fractions : (float, float, float)
      Shares of query groups 0 (uniform), 1 (near fine), 2 (near coarse); a group the file lacks gives
      its share to the others.

    Item
    ----
    ``surface``: (surface_points + sharp_points, 7) float32 ``[x, y, z, nx, ny, nz, sharp]`` (uniform first);
    ``points``: (n_queries, 3) float32; ``sdf``: (n_queries,) float32 signed distance, negative inside;
    ``id``: str; ``label``: int when ``classes`` is given.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        surface_points: int,
        sharp_points: int,
        n_queries: int,
        query_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3),
        split: str = "train",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        classes: Sequence[str] | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(root, split=split, val_fraction=val_fraction, split_seed=split_seed, classes=classes)
        if min(surface_points, sharp_points, n_queries) < 0 or surface_points + sharp_points < 1:
            raise ValueError("point counts must be >= 0 with at least one surface point")
        if len(query_fractions) != 3 or min(query_fractions) < 0 or not sum(query_fractions) > 0:
            raise ValueError(f"query_fractions must be 3 non-negative numbers, got {query_fractions}")
        self.surface_points, self.sharp_points = int(surface_points), int(sharp_points)
        self.n_queries = int(n_queries)
        self.query_fractions = tuple(float(x) for x in query_fractions)

    def __getitem__(self, index: int) -> dict:
        # memory maps: only the drawn rows are read. The format keeps the sharp points as the tail of
        # the surface arrays and the SDF groups sorted (validated at write time), so each pool is a
        # range found by binary search.
        a = fmt.read_sample_file(
            self.object_dir(index) / fmt.SAMPLES_FILE,
            ["surface_points", "surface_normals", "surface_sharp", "sdf_points", "sdf_values", "sdf_group"],
            mmap=True,
        )
        rng = self._rng(index)
        sharp = a["surface_sharp"]
        ns = len(sharp)
        n_uni = int(np.searchsorted(sharp.view(np.uint8), 1))  # first sharp point
        # no uniform points: draw them from the sharp ones; no sharp points: fill with uniform ones
        iu = _choose_range(rng, 0, n_uni or ns, self.surface_points)
        isharp = _choose_range(rng, n_uni if n_uni < ns else 0, ns, self.sharp_points)
        idx = np.concatenate([iu, isharp])
        flag = np.concatenate([np.zeros(len(iu)), isharp >= n_uni]).astype(np.float32)
        surface = np.concatenate(
            [a["surface_points"][idx], a["surface_normals"][idx], flag[:, None]], axis=1
        )  # (n + k, 7)

        group = a["sdf_group"]
        bounds = [0, *np.searchsorted(group, [1, 2]).tolist(), len(group)]
        sizes = [bounds[g + 1] - bounds[g] for g in range(3)]
        w = np.array([f if n else 0.0 for f, n in zip(self.query_fractions, sizes)])
        if not w.sum() > 0:
            raise ValueError(f"{self.object_dir(index)}: no SDF samples in the requested groups")
        counts = np.floor(w / w.sum() * self.n_queries).astype(int)
        counts[np.argmax(w)] += self.n_queries - int(counts.sum())
        qi = np.concatenate([_choose_range(rng, bounds[g], bounds[g + 1], c) for g, c in enumerate(counts)])
        item = self._base_item(index)
        item["surface"] = torch.from_numpy(np.ascontiguousarray(surface, dtype=np.float32))
        item["points"] = torch.from_numpy(np.ascontiguousarray(a["sdf_points"][qi], dtype=np.float32))
        item["sdf"] = torch.from_numpy(np.ascontiguousarray(a["sdf_values"][qi], dtype=np.float32))
        item["groups"] = torch.from_numpy(np.ascontiguousarray(group[qi], dtype=np.uint8))
        return item


class GridDataset(ObjectFolder):
    """Items for voxel-grid VAEs: the 64^3 shell occupancy or the dense truncated SDF.

    Parameters
    ----------
    root, split, val_fraction, split_seed, classes
      See :class:`ObjectFolder`.
    source : "occ64" or "tsdf"
      ``occ64``: the (64, 64, 64) cell-grid shell occupancy as 0/1. ``tsdf``: the (R+1)^3 node-grid
      truncated SDF (objects preprocessed with ``--tsdf-res``), negative inside.
    normalize_tsdf : bool
      Divide the TSDF by its truncation so values lie in [-1, 1] (Dora's convention).

    Item
    ----
    ``grid``: (1, 64, 64, 64) or (1, R+1, R+1, R+1) float32; ``id``; ``label`` when ``classes`` is given.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        source: str = "occ64",
        normalize_tsdf: bool = True,
        split: str = "train",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        classes: Sequence[str] | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(root, split=split, val_fraction=val_fraction, split_seed=split_seed, classes=classes)
        if source not in ("occ64", "tsdf"):
            raise ValueError(f"source must be 'occ64' or 'tsdf', got {source!r}")
        self.source = source
        self.normalize_tsdf = normalize_tsdf

    def __getitem__(self, index: int) -> dict:
        path = self.object_dir(index) / fmt.SAMPLES_FILE
        if self.source == "occ64":
            g = fmt.read_sample_file(path, ["occ64"])["occ64"].astype(np.float32)
        else:
            try:
                g = fmt.read_sample_file(path, ["tsdf"])["tsdf"].astype(np.float32)
            except KeyError:
                raise ValueError(f"{path}: no tsdf array (preprocess with --tsdf-res)") from None
            if self.normalize_tsdf:
                g = g / np.float32(self.meta(index)["tsdf"]["trunc"])
        item = self._base_item(index)
        item["grid"] = torch.from_numpy(np.ascontiguousarray(g)[None])  # (1, r, r, r)
        return item


class SparseSDFDataset(ObjectFolder):
    """Items for sparse SDF VAEs (Direct3D-S2 / TRELLIS.2 family): the SDF band of an object.

    The band (:mod:`shapeflow.geometry.sparse_band`, :mod:`shapeflow.data.format`) is every node of the
    node grid with ``R`` cells whose exact signed distance satisfies ``|sdf| <= sqrt(3) h``
    (``h = 2 * BOUND / R``), stored sorted by ``(i, j, k)``.

    Parameters
    ----------
    root, split, val_fraction, split_seed, classes
      See :class:`ObjectFolder`.
    res : int
      The band's resolution ``R``; the folder must have been preprocessed with ``--sparse-res R``.
    max_nodes : int or None
      At most this many band nodes per item: a random subset without replacement, kept in sorted order,
      drawn from the worker-safe per-item generator of the other datasets (module docstring). Default
      None, the full band, which is what the sparse VAEs need: the band *is* the sparse structure (the
      active sites and, by parent = index >> 1, the coarser levels' existence masks), so a subset punches
      holes in it. A cap only bounds memory for experiments (or losses that need values, not structure).

    Item
    ----
    ``coords``: (N, 3) int32 node indices ``[i, j, k]`` in ``0 .. R``, sorted lexicographically;
    ``sdf``: (N,) float32 exact signed distance in canonical units, negative inside; ``id``: str;
    ``label``: int when ``classes`` is given. ``N`` varies per object; batch with :func:`collate_sparse`.

    Raises
    ------
    ValueError
      If the folder was preprocessed with another ``sparse_res`` (or none) or ``max_nodes < 1``; when an
      item is read, if its object has no band or one at another resolution (one line naming the object).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        res: int,
        split: str = "train",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        classes: Sequence[str] | Mapping[str, int] | None = None,
        max_nodes: int | None = None,
    ) -> None:
        super().__init__(root, split=split, val_fraction=val_fraction, split_seed=split_seed, classes=classes)
        if isinstance(res, bool) or int(res) != res or res < 1:
            raise ValueError(f"res must be a positive integer, got {res!r}")
        if max_nodes is not None and max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1 or None, got {max_nodes}")
        self.res = int(res)
        self.max_nodes = None if max_nodes is None else int(max_nodes)
        config = self.root / CONFIG_FILE
        if config.is_file():  # every object of a folder shares its config: refuse a wrong folder up front
            made = json.loads(config.read_text(encoding="utf-8")).get("sparse_res")
            if made != self.res:
                raise ValueError(f"{self.root} was preprocessed with sparse_res={made}, not {self.res} "
                                 f"(preprocess with --sparse-res {self.res})")

    def __getitem__(self, index: int) -> dict:
        oid = self.records[index]["id"]
        path = self.object_dir(index) / fmt.SAMPLES_FILE
        try:
            a = fmt.read_sample_file(path, list(fmt.SPARSE_ARRAYS), mmap=True)
        except KeyError:
            raise ValueError(f"object {oid} ({path}): no sparse SDF band (preprocess with --sparse-res "
                             f"{self.res})") from None
        made = int(a["sparse_res"])
        if made != self.res:
            raise ValueError(f"object {oid} ({path}) was preprocessed at sparse_res {made}, not {self.res}")
        coords, sdf = a["sparse_coords"], a["sparse_sdf"]
        if self.max_nodes is not None and len(sdf) > self.max_nodes:
            keep = np.sort(self._rng(index).choice(len(sdf), size=self.max_nodes, replace=False))
            coords, sdf = coords[keep], sdf[keep]
        item = self._base_item(index)
        item["coords"] = torch.from_numpy(np.array(coords, dtype=np.int32))  # (N, 3) copies off the map
        item["sdf"] = torch.from_numpy(np.array(sdf, dtype=np.float32))  # (N,)
        return item


def collate_sparse(items: Sequence[Mapping]) -> dict:
    """Batch sparse band items by concatenation (the DataLoader ``collate_fn`` of :class:`SparseSDFDataset`).

    Parameters
    ----------
    items : sequence of dict
      Each with ``coords`` (N_b, 3) int, ``sdf`` (N_b,) float, ``id`` and optionally ``label`` and
      ``shape`` (nodes per axis of a cropped grid; all items then share it). An item whose coordinates are
      not sorted by ``(i, j, k)`` is sorted here.

    Returns
    -------
    batch : dict
      ``coords``: (N_total, 4) int32 ``[b, i, j, k]`` sorted by ``(b, i, j, k)``; ``sdf``: (N_total,)
      float32 in the same order; ``batch_size``: int; ``id``: list of str; ``label``: (B,) int64 when
      the items have labels; ``shape``: int when the items have one.
    """
    if len(items) == 0:
        raise ValueError("collate_sparse needs at least one item")
    coords, sdf = [], []
    for b, it in enumerate(items):
        c = torch.as_tensor(it["coords"]).to(torch.int32)  # (n, 3)
        v = torch.as_tensor(it["sdf"]).to(torch.float32)  # (n,)
        if c.ndim != 2 or c.shape[1] != 3 or v.shape != (len(c),):
            raise ValueError(f"item {b}: expected coords (N, 3) and sdf (N,), got {tuple(c.shape)} and "
                             f"{tuple(v.shape)}")
        key = (c[:, 0].long() << 32) | (c[:, 1].long() << 16) | c[:, 2].long()  # indices < 2^15
        if len(key) > 1 and not bool((key[1:] > key[:-1]).all()):
            order = torch.argsort(key, stable=True)
            c, v = c[order], v[order]
        coords.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c], dim=1))  # (n, 4)
        sdf.append(v)
    batch = {"coords": torch.cat(coords), "sdf": torch.cat(sdf), "batch_size": len(items),
             "id": [it["id"] for it in items]}
    if "label" in items[0]:
        batch["label"] = torch.as_tensor([int(it["label"]) for it in items], dtype=torch.int64)
    if "shape" in items[0]:
        shapes = {int(it["shape"]) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"collate_sparse: items on grids of different shapes {sorted(shapes)}")
        batch["shape"] = shapes.pop()
    return batch
