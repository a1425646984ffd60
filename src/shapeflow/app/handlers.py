"""What each request of ``shapeflow app`` does, in plain Python (no gradio): testable without a browser.

* :class:`Catalog`: the generators, VAEs and preprocessed folders the app offers. The shipped tiny
  checkpoints, and every checkpoint (:func:`shapeflow.models.model_kind` decides, so new families and
  public releases appear without changes here) and preprocessed folder found under the ``--runs`` /
  ``--data`` roots. A checkpoint typed as a path must lie under one of those roots after symlinks are
  resolved, so a visitor cannot make the app read an arbitrary file.
* :class:`ModelCache`: one model in memory per checkpoint, loaded once (a lock per checkpoint), used by
  one request at a time (a lock per model, taken in a fixed order), least recently used ones dropped.
* :class:`App`: the handlers. Every request writes into its own folder under its visitor's folder,
  ``OUT/sessions/<hash of the session id>/<request>/``; nothing is ever looked up across visitors.
  Uploads are size-limited and their content is checked against their extension before the mesh reader
  sees them (:func:`check_upload`).

Errors a visitor can cause (a bad upload, an unknown checkpoint, a generation with no surface) are
:class:`AppError`: one line naming the file or input and the problem, shown in the page.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shapeflow import fileio
from shapeflow.checkpoint import CheckpointError
from shapeflow.data import format as fmt
from shapeflow.data.preprocess import MANIFEST, PreprocessConfig, process_object, read_manifest
from shapeflow.evaluate import reconstruct_object
from shapeflow.generate import PIPELINES, SHIPPED_VAES, check_token_pair, generate, open_image, sampler_defaults
from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.frame import BOUND
from shapeflow.geometry.io import load_mesh, save_mesh
from shapeflow.models import DIT_KINDS, TOKEN_DIT_KINDS, VAE_KINDS, load_dit, load_vae, model_kind
from shapeflow.models.conditioning import ImageConditioner
from shapeflow.models.pretrained.hunyuan_dit import is_release, release_conditioner
from shapeflow.render import image_grid, render_mesh, save_png

log = logging.getLogger(__name__)

UPLOAD_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb")
"""Mesh uploads the app accepts (``.gltf`` is refused: its buffers may name other files on the server)."""
DEFAULT_MAX_UPLOAD_MB = 100
MESH_FORMATS = ("glb", "obj", "ply")
"""Every generated or reconstructed mesh is written in these formats (GLB is what the 3D view shows)."""
SHIPPED_ASSETS = Path(SHIPPED_VAES["vecset"]).resolve().parent
SCAN_DEPTH = 4
"""How deep below a root the catalogue looks for checkpoints and preprocessed folders."""
_SKIP_DIRS = {"checkpoints", "final", "tb", "sessions", "gradio", "__pycache__", ".git"}
ProgressFn = Callable[[float, str], None]


class AppError(ValueError):
    """A request the app cannot serve, for a reason the visitor can fix; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Catalogue: what the app offers, and the roots it may read from
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generator:
    """A generator the page offers: a DiT, the VAE that decodes it (None: pick one), a stage-1 structure."""

    label: str
    dit: Path
    vae: Path | None
    structure: tuple[Path, ...] | None = None


@dataclass
class Catalog:
    """The checkpoints and preprocessed folders under ``runs`` and ``data`` roots (plus the shipped ones)."""

    runs: list[Path] = field(default_factory=list)
    data: list[Path] = field(default_factory=list)
    generators: dict[str, Generator] = field(default_factory=dict)
    vaes: dict[str, Path] = field(default_factory=dict)
    datasets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.runs = [Path(p).resolve() for p in self.runs]
        self.data = [Path(p).resolve() for p in self.data]
        self.scan()

    @property
    def roots(self) -> list[Path]:
        """Folders a checkpoint path may point into: the shipped assets and the ``runs`` roots."""
        return [SHIPPED_ASSETS, *self.runs]

    def scan(self) -> None:
        """(Re)build the lists: the shipped pipelines first, then what the roots hold, sorted by path."""
        gens = {f"shipped: {name}": Generator(f"shipped: {name}", Path(p["dit"]), Path(p["vae"]),
                                              tuple(Path(s) for s in p["structure"]) if "structure" in p else None)
                for name, p in PIPELINES.items()}
        vaes = {f"shipped: {name}": Path(p) for name, p in SHIPPED_VAES.items()}
        datasets: dict[str, Path] = {}
        for root in self.runs + self.data:
            for d in _walk(root):
                label = _label(d, root)
                if (d / MANIFEST).is_file():
                    datasets[label] = d
                    continue
                kind = _kind_or_none(d)
                if kind in VAE_KINDS:
                    vaes[label] = d
                elif kind in DIT_KINDS or (kind is not None and kind.endswith("dit")):
                    gens[f"{label} ({kind})"] = Generator(f"{label} ({kind})", d, self._paired_vae(d))
        self.generators, self.vaes, self.datasets = gens, vaes, datasets

    def _paired_vae(self, dit_dir: Path) -> Path | None:
        """The VAE a shapeflow DiT run was trained for: its latent folder's ``latents.json`` names it."""
        try:
            cfg = json.loads((dit_dir / "config.json").read_text(encoding="utf-8"))
            latents = Path(cfg["data"]["root"])
            vae = Path(json.loads((latents / "latents.json").read_text(encoding="utf-8"))["vae"])
        except (OSError, KeyError, TypeError, ValueError):
            return None
        vae = vae.resolve()
        return vae if self.is_allowed(vae) and vae.exists() else None

    def is_allowed(self, path: Path) -> bool:
        return any(path.resolve().is_relative_to(root) for root in self.roots)

    def checkpoint(self, text: str, roles: tuple[str, ...]) -> tuple[Path, str]:
        """A checkpoint typed by a visitor: ``(resolved path, kind)``; one-line :class:`AppError` when it lies
        outside the roots (checked before anything on disk is looked at), is missing, or is no model of
        ``roles``."""
        text = text.strip()
        if not text:
            raise AppError("no checkpoint path given")
        p = Path(text).expanduser()
        candidates = [p] if p.is_absolute() else [root / p for root in self.roots]
        for c in candidates:
            c = c.resolve()
            if not self.is_allowed(c):
                raise AppError(f"{text}: not under the app's checkpoint folders (--runs); the app reads nothing "
                               "else")
            if c.exists():
                try:
                    kind = model_kind(c, roles)
                except (CheckpointError, FileNotFoundError, ValueError) as e:
                    raise AppError(f"{text}: not a checkpoint the app can load ({_one_line(e)})") from None
                if kind not in roles and not (roles == DIT_KINDS and kind.endswith("dit")):
                    raise AppError(f"{text}: is a {kind} checkpoint, not one of {', '.join(roles)}")
                return c, kind
        raise AppError(f"{text}: no such checkpoint under the app's checkpoint folders")

    def dataset(self, label: str) -> Path:
        if label not in self.datasets:
            raise AppError(f"unknown data folder {label!r}")
        return self.datasets[label]


def _walk(root: Path, depth: int = SCAN_DEPTH):
    """Folders below ``root`` (itself included), breadth first, not entering run internals."""
    if not root.is_dir():
        return
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            yield d
            if (d / MANIFEST).is_file() or (d / "config.json").is_file() and d != root:
                continue  # a data folder or a model / run: its subfolders are its own internals
            try:
                nxt += sorted(c for c in d.iterdir() if c.is_dir() and c.name not in _SKIP_DIRS
                              and not c.name.startswith("."))
            except OSError:
                continue
        level = nxt


def _label(d: Path, root: Path) -> str:
    rel = d.relative_to(root).as_posix()
    return f"{root.name}/{rel}" if rel != "." else root.name


def _kind_or_none(d: Path) -> str | None:
    try:
        return model_kind(d, DIT_KINDS)  # a Hunyuan3D DiT folder (which also bundles a VAE) is a generator
    except (CheckpointError, FileNotFoundError, ValueError, OSError, KeyError):
        return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Models: one per checkpoint, loaded once, one user at a time
# ---------------------------------------------------------------------------------------------


class ModelCache:
    """``(role, path) -> (model, kind)``, loaded once, with a lock per model for its users.

    ``get`` loads under a per-key lock, so two requests for the same checkpoint share one load and one
    model. Requests hold the model's lock while they use it (:meth:`using` takes several in key order, so
    two requests never wait on each other crosswise). At most ``capacity`` models stay; the least recently
    used one is dropped (a request that still holds it keeps its reference).
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._load_locks: dict[tuple, threading.Lock] = {}
        self._models: OrderedDict[tuple, tuple[object, str, threading.Lock]] = OrderedDict()
        self.loads = 0  # how many loads happened (tests: one per checkpoint)

    def get(self, key: tuple, loader: Callable[[], tuple[object, str]]) -> tuple[object, str, threading.Lock]:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model, kind = loader()
            entry = (model, kind, threading.Lock())
            with self._lock:
                self._models[key] = entry
                self.loads += 1
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return entry

    @staticmethod
    def using(*entries: tuple[tuple, threading.Lock]) -> ExitStack:
        """Hold the locks of ``(key, lock)`` pairs, taken in key order."""
        stack = ExitStack()
        for _, lock in sorted(entries, key=lambda e: str(e[0])):
            stack.enter_context(lock)
        return stack

    def __len__(self) -> int:
        return len(self._models)


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def check_upload(path: str | os.PathLike, max_bytes: int, name: str | None = None) -> str:
    """Check an uploaded mesh file before any mesh reader opens it; returns its lower-case extension.

    Refused with a one-line :class:`AppError` naming the file: a missing or empty file, a file over
    ``max_bytes``, an extension outside :data:`UPLOAD_EXTENSIONS`, content that does not look like its
    extension (GLB magic, PLY / OFF headers, binary STL size or ASCII ``solid``, OBJ vertex lines in text),
    and GLB buffers or images that refer to files instead of embedding them.
    """
    path = Path(path)
    name = name or path.name
    ext = path.suffix.lower()
    if ext not in UPLOAD_EXTENSIONS:
        raise AppError(f"{name}: unsupported mesh format {ext or '(no extension)'!r} (upload one of "
                       f"{', '.join(UPLOAD_EXTENSIONS)})")
    if not path.is_file():
        raise AppError(f"{name}: the upload did not arrive")
    size = path.stat().st_size
    if size == 0:
        raise AppError(f"{name}: empty file")
    if size > max_bytes:
        raise AppError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:.0f} MB")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    problem = _sniff(ext, head, size, path)
    if problem:
        raise AppError(f"{name}: {problem}")
    return ext


def _sniff(ext: str, head: bytes, size: int, path: Path) -> str | None:
    if ext == ".glb":
        if len(head) < 20 or head[:4] != b"glTF":
            return "not a binary glTF (GLB) file (no 'glTF' magic)"
        version, length = struct.unpack("<II", head[4:12])
        chunk_len, chunk_type = struct.unpack("<II", head[12:20])
        if version != 2 or length != size or chunk_type != 0x4E4F534A:
            return "corrupt GLB header (version, length or first chunk)"
        with open(path, "rb") as fh:
            fh.seek(20)
            try:
                doc = json.loads(fh.read(chunk_len))
            except ValueError:
                return "corrupt GLB (its JSON chunk does not parse)"
        for key in ("buffers", "images"):
            for item in doc.get(key, []) if isinstance(doc, dict) else []:
                uri = item.get("uri") if isinstance(item, dict) else None
                if uri is not None and not str(uri).startswith("data:"):
                    return f"GLB {key} refer to outside files ({str(uri)[:60]!r}); upload a self-contained GLB"
        return None
    if ext == ".ply":
        return None if head.startswith(b"ply") else "not a PLY file (no 'ply' header)"
    if ext == ".off":
        first = head.lstrip().split(maxsplit=1)[0] if head.strip() else b""
        return None if first.endswith(b"OFF") else "not an OFF file (no 'OFF' header)"
    if ext == ".stl":
        if size >= 84 and 84 + 50 * struct.unpack("<I", head[80:84])[0] == size:
            return None  # binary STL: 80-byte header, count, 50 bytes per triangle
        if head.lstrip().lower().startswith(b"solid") and b"\0" not in head:
            return None
        return "not an STL file (neither a binary STL of consistent size nor ASCII 'solid')"
    # .obj: text with vertex lines
    if b"\0" in head:
        return "not an OBJ file (binary content)"
    if not any(line.lstrip().startswith(b"v ") for line in head.splitlines()):
        return "not an OBJ file (no vertex 'v' lines in its first 64 KB)"
    return None


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One generated shape: its files (``{"glb": path, "obj": ..., "ply": ...}``) and preview picture."""

    index: int
    label: str
    files: dict[str, Path]
    preview: Path
    faces: int


@dataclass
class Generation:
    folder: Path
    samples: list[Sample]
    empty: dict[int, str]
    seconds: dict[str, float]
    settings: dict

    @property
    def message(self) -> str:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        lines = [f"{len(self.samples)} shape(s) from **{self.settings['generator']}** ({stages})."]
        lines += [f"Sample {k}: no surface decoded ({why})." for k, why in sorted(self.empty.items())]
        return "\n\n".join(lines)


@dataclass
class Reconstruction:
    folder: Path
    watertight: Path  # GLB, canonical frame
    reconstruction: Path  # GLB, canonical frame
    files: list[Path]
    metrics: dict[str, float]
    seconds: dict[str, float]
    vae: str


# ---------------------------------------------------------------------------------------------
# The handlers
# ---------------------------------------------------------------------------------------------


class App:
    """The app's state (catalogue, model cache, output root) and its request handlers.

    Parameters
    ----------
    out : the app's output folder: visitors' folders go to ``out/sessions``, data pictures to ``out/data``.
    runs, data : roots searched for checkpoints / preprocessed folders (see :class:`Catalog`).
    max_upload_mb : upload size limit.
    image_encoder : DINOv2 hub name or folder for image-conditional DiTs.
    """

    def __init__(self, out: str | os.PathLike, *, runs=(), data=(), max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 image_encoder: str = "facebook/dinov2-large", device: str = "cpu") -> None:
        self.out = Path(out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(runs=list(runs), data=list(data))
        self.models = ModelCache()
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.image_encoder = image_encoder
        self.device = device
        self._data_lock = threading.Lock()

    # -- per-visitor folders ------------------------------------------------------------------

    def session_dir(self, session: str) -> Path:
        """The visitor's own folder: ``out/sessions/<sha256(session id)[:16]>`` (the id itself stays private)."""
        if not session:
            raise AppError("no session: reload the page")
        return self.out / "sessions" / hashlib.sha256(session.encode()).hexdigest()[:16]

    def request_dir(self, session: str, what: str) -> Path:
        """A new folder for one request of a visitor: ``<session dir>/<what>_<time>_<random>``."""
        d = self.session_dir(session) / f"{what}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def owns(self, session: str, path: str | os.PathLike) -> bool:
        """Whether ``path`` lies in this visitor's folder."""
        return Path(path).resolve().is_relative_to(self.session_dir(session).resolve())

    # -- models ---------------------------------------------------------------------------------

    def _model(self, role: str, path: Path):
        loader = load_dit if role == "dit" else load_vae
        key = (role, str(Path(path).resolve()))

        def load():
            model, kind = loader(path)
            return model.to(self.device).eval(), kind

        try:
            model, kind, lock = self.models.get(key, load)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise AppError(f"{path}: cannot load ({_one_line(e)})") from None
        return model, kind, (key, lock)

    def generator(self, choice: str, dit_path: str = "", vae_choice: str = "") -> Generator:
        """The generator of a request: a listed one, or a DiT typed as a path; ``vae_choice`` (a listed VAE)
        replaces its paired VAE."""
        if dit_path.strip():
            dit, _ = self.catalog.checkpoint(dit_path, DIT_KINDS)
            gen = Generator(dit_path.strip(), dit, self.catalog._paired_vae(dit))
        elif choice in self.catalog.generators:
            gen = self.catalog.generators[choice]
        else:
            raise AppError(f"unknown generator {choice!r} (refresh the page for the current list)")
        if vae_choice and vae_choice != "paired":
            if vae_choice not in self.catalog.vaes:
                raise AppError(f"unknown VAE {vae_choice!r}")
            gen = Generator(gen.label, gen.dit, self.catalog.vaes[vae_choice], gen.structure)
        return gen

    def generator_info(self, choice: str, dit_path: str = "") -> dict:
        """What the page needs to show for a generator: its condition (``class`` / ``image`` / none), class
        names, and for a released Hunyuan3D DiT the reference pipeline's sampler settings (else None)."""
        gen = self.generator(choice, dit_path)
        dit, kind, _ = self._model("dit", gen.dit)
        sampler = None
        if is_release(gen.dit):
            d = sampler_defaults(gen.dit)
            sampler = {"steps": d["steps"], "method": d["method"], "cfg": d["cfg_scale"]}
        return {"cond": dit.config.cond, "classes": list(getattr(dit.config, "classes", ()) or ()), "kind": kind,
                "sampler": sampler}

    # -- generation -----------------------------------------------------------------------------

    def generate(self, session: str, generator: str, *, dit_path: str = "", vae: str = "paired",
                 class_name: str | None = None, image: str | None = None, num: int = 1, seed: int = 0,
                 steps: int = 25, method: str = "heun", cfg: float = 1.0, resolution: int = 128,
                 num_tokens: int | None = None, progress: ProgressFn | None = None) -> Generation:
        """Sample ``num`` shapes into a new folder of the visitor's; :class:`AppError` when none has a surface."""
        report = progress or (lambda f, s: None)
        if not 1 <= int(num) <= 8:
            raise AppError(f"shapes per request must be 1 to 8, got {num}")
        if not 1 <= int(steps) <= 500:
            raise AppError(f"steps must be 1 to 500, got {steps}")
        if not 16 <= int(resolution) <= 512:
            raise AppError(f"decoding resolution must be 16 to 512, got {resolution}")
        if num_tokens is not None and not 1 <= int(num_tokens) <= 8192:
            raise AppError(f"latent tokens must be 1 to 8192, got {num_tokens}")
        if method not in ("euler", "heun", "midpoint"):
            raise AppError(f"unknown sampler {method!r}")
        gen = self.generator(generator, dit_path, vae)
        if gen.vae is None:
            raise AppError(f"{gen.label}: no VAE is paired with this DiT; pick one under 'VAE'")
        report(0.0, "loading models")
        dit, dit_kind, dit_lock = self._model("dit", gen.dit)
        vae_model, vae_kind, vae_lock = self._model("vae", gen.vae)
        locks = [dit_lock, vae_lock]
        structure = None
        if dit_kind == "sparse_dit":
            parts = gen.structure or tuple(Path(p) for p in PIPELINES["sparse"]["structure"])
            s_dit, _, s_lock = self._model("dit", parts[0])
            s_vae, _, s_vae_lock = self._model("vae", parts[1])
            structure, locks = (s_dit, s_vae), locks + [s_lock, s_vae_lock]
        if dit_kind in TOKEN_DIT_KINDS and vae_kind == "vecset_vae":
            try:
                check_token_pair(dit, gen.dit, vae_model, gen.vae)
            except ValueError as e:
                raise AppError(_one_line(e)) from None
            if num_tokens is None and is_release(gen.dit):
                num_tokens = vae_model.config.num_tokens  # the reference samples the VAE's latent shape
        cond, labels = self._condition(dit, gen, class_name, image, int(num))
        folder = self.request_dir(session, "generate")
        t0 = time.perf_counter()
        report(0.05, "sampling")
        with self.models.using(*locks):
            try:
                result = generate(dit, vae_model, dit_kind=dit_kind, vae_kind=vae_kind, num=int(num), cond=cond,
                                  labels=labels, steps=int(steps), method=method, cfg_scale=float(cfg),
                                  seed=int(seed), resolution=int(resolution), device=self.device,
                                  num_tokens=int(num_tokens) if num_tokens else None, progress=progress is not None,
                                  structure=structure)
            except (ValueError, RuntimeError) as e:  # misfitting models or settings: the visitor's to fix
                raise AppError(f"{gen.label}: {_one_line(e)}") from None
        seconds = {"generation": time.perf_counter() - t0}
        report(0.9, "writing files")
        t0 = time.perf_counter()
        samples = []
        for k, mesh in enumerate(result.meshes):
            if mesh is None:
                continue
            files = {f: folder / f"sample_{k:02d}.{f}" for f in MESH_FORMATS}
            for path in files.values():
                save_mesh(path, *mesh)
            preview = folder / f"sample_{k:02d}.png"
            save_png(preview, render_mesh(*mesh, size=256, background=(255, 255, 255)))
            samples.append(Sample(k, result.labels[k], files, preview, int(len(mesh[1]))))
        seconds["files"] = time.perf_counter() - t0
        settings = {"generator": gen.label, "dit": str(gen.dit), "vae": str(gen.vae), "class": class_name,
                    "num": int(num), "seed": int(seed), "steps": int(steps), "method": method, "cfg": float(cfg),
                    "resolution": int(resolution), "num_tokens": num_tokens}
        fileio.write_json(folder / "generate.json", {
            **settings, "labels": result.labels, "nfe": result.nfe,
            "files": {s.index: {f: p.name for f, p in s.files.items()} for s in samples},
            "empty": {str(k): v for k, v in result.empty.items()},
            "seconds": {k: round(v, 3) for k, v in {**result.seconds, **seconds}.items()}})
        report(1.0, "done")
        if not samples:
            why = next(iter(result.empty.values()), "nothing decoded")
            raise AppError(f"no shape came out: no sample has a surface ({why}); try another seed, more steps or "
                           "the default latent tokens")
        return Generation(folder, samples, result.empty, seconds, settings)

    def _condition(self, dit, gen: Generator, class_name, image, num):
        c = dit.config
        if c.cond == "class":
            names = list(c.classes)
            if not class_name:
                raise AppError(f"{gen.label}: class-conditional; pick a class ({', '.join(names)})")
            if class_name not in names:
                raise AppError(f"unknown class {class_name!r} for {gen.label} (classes: {', '.join(names)})")
            return torch.full((num,), names.index(class_name), dtype=torch.long), [class_name] * num
        if c.cond == "image":
            if not image:
                raise AppError(f"{gen.label}: image-conditional; upload an image")
            try:
                img = np.asarray(open_image(image))
            except (OSError, ValueError) as e:
                raise AppError(_one_line(e).replace(str(image), Path(image).name)) from None
            released = is_release(gen.dit)  # a Hunyuan3D release brings its own DINOv2 and image recipe
            name = str(gen.dit) if released else self.image_encoder
            try:
                encoder, _, lock = self.models.get(("image", name), lambda: (
                    (release_conditioner(gen.dit) if released else
                     ImageConditioner.from_pretrained(self.image_encoder)).to(self.device), "image_encoder"))
            except (ImportError, OSError, ValueError) as e:  # no transformers, no such folder, offline hub
                raise AppError(f"image encoder {name}: cannot load ({_one_line(e)}); start the app "
                               "with --image-encoder DIR (a local DINOv2 folder) and the image extra") from None
            with lock:
                try:
                    pixels = encoder.preprocess([img], source=Path(image).name)
                    tokens = encoder(pixels.to(self.device))
                except (OSError, ValueError) as e:
                    raise AppError(_one_line(e)) from None
            return tokens.expand(num, -1, -1).contiguous(), ["image"] * num
        return None, [""] * num

    # -- reconstruction -------------------------------------------------------------------------

    def reconstruct(self, session: str, upload: str | os.PathLike, vae: str, *, resolution: int = 256,
                    prep_resolution: int = 256, n_points: int = 100_000,
                    progress: ProgressFn | None = None) -> Reconstruction:
        """An uploaded mesh -> watertight surface -> the VAE's reconstruction, with metrics and stage times."""
        report = progress or (lambda f, s: None)
        upload = Path(upload)
        name = upload.name
        t0 = time.perf_counter()
        ext = check_upload(upload, self.max_upload_bytes, name)
        if vae not in self.catalog.vaes:
            raise AppError(f"unknown VAE {vae!r} (refresh the page for the current list)")
        if not 32 <= int(resolution) <= 1024 or not 32 <= int(prep_resolution) <= 1024:
            raise AppError("resolutions must be 32 to 1024")
        folder = self.request_dir(session, "reconstruct")
        src = folder / f"input{ext}"
        shutil.copyfile(upload, src)
        seconds = {"upload check": time.perf_counter() - t0}
        report(0.05, "loading the VAE")
        model, kind, lock = self._model("vae", self.catalog.vaes[vae])
        extra = {}
        if kind == "grid_vae" and model.config.input == "sdf":
            extra = dict(tsdf_res=model.config.resolution, tsdf_trunc=model.config.sdf_truncation)
        if kind == "sparse_vae":
            if int(resolution) % model.config.factor:
                raise AppError(f"resolution {resolution}: the sparse VAE needs a multiple of {model.config.factor}")
            extra = dict(sparse_res=int(resolution))
        cfg = PreprocessConfig(resolution=int(prep_resolution), surface_points=20_000,
                               sharp_points=0 if kind == "sparse_vae" else 8_192, sdf_points=100_000, **extra)
        report(0.1, "watertight surface and samples")
        t0 = time.perf_counter()
        rec = process_object(src, folder / "prep", cfg)
        seconds["preprocess"] = time.perf_counter() - t0
        if rec["status"] != "ok":
            msg = str(rec["error"]).replace(str(src), name)
            raise AppError(msg if msg.startswith(name) else f"{name}: {msg}")
        obj = folder / "prep" / rec["id"]
        watertight = folder / "watertight.glb"
        save_mesh(watertight, *load_mesh(obj / fmt.MESH_FILE))
        report(0.5, "encode, decode, metrics")
        t0 = time.perf_counter()
        with self.models.using(lock):
            try:
                r = reconstruct_object(model, kind, obj, resolution=int(resolution), n_points=int(n_points))
            except (ValueError, RuntimeError) as e:
                raise AppError(f"{name} through {vae}: {_one_line(e)}") from None
        m = r["metrics"]
        seconds["encode"], seconds["decode"] = m["encode_s"], m["decode_s"]
        seconds["metrics"] = time.perf_counter() - t0 - m["encode_s"] - m["decode_s"]
        if r["mesh"] is None:
            raise AppError(f"{name}: the VAE decoded no surface ({r['empty']})")
        files = [folder / f"reconstruction.{f}" for f in MESH_FORMATS]
        for path in files:
            save_mesh(path, *r["mesh"])
        metrics = {k: float(m[k]) for k in ("iou", "chamfer_l1", "f_score@1%", "normal_consistency")}
        metrics["faces"] = float(len(r["mesh"][1]))
        fileio.write_json(folder / "metrics.json", {"source": name, "vae": vae, "metrics": metrics,
                                                    "seconds": {k: round(v, 3) for k, v in seconds.items()}})
        report(1.0, "done")
        return Reconstruction(folder, watertight, files[0], files, metrics, seconds, vae)

    # -- data browsing --------------------------------------------------------------------------

    def data_objects(self, dataset: str) -> list[dict]:
        """The manifest of a preprocessed folder: ``{"id", "source", "status", "error"}`` per object."""
        root = self.catalog.dataset(dataset)
        rows = []
        for r in read_manifest(root):
            source = Path(str(r.get("source", "")))
            error = str(r.get("error") or "").replace(str(source), source.name)  # the folder's paths stay private
            rows.append({"id": r.get("id") or "", "source": source.name, "class": source.parent.name,
                         "status": r.get("status", "?"), "error": error})
        return rows

    def _data_dir(self, dataset: str) -> Path:
        root = self.catalog.dataset(dataset)
        return self.out / "data" / hashlib.sha256(str(root).encode()).hexdigest()[:16]

    def data_thumbnails(self, dataset: str, limit: int = 48) -> list[tuple[Path, str]]:
        """A picture per ``ok`` object (its first stored view, else a render of its watertight surface), cached."""
        root = self.catalog.dataset(dataset)
        out = []
        for r in [r for r in self.data_objects(dataset) if r["status"] == "ok"][:limit]:
            obj = root / r["id"]
            thumb = self._data_dir(dataset) / f"{r['id']}_thumb.png"
            with self._data_lock:
                if not thumb.is_file():
                    view = obj / fmt.VIEWS_DIR / "00.png"
                    if view.is_file():
                        fileio.write_bytes(thumb, view.read_bytes())
                    elif (obj / fmt.MESH_FILE).is_file():
                        save_png(thumb, render_mesh(*load_mesh(obj / fmt.MESH_FILE), size=128,
                                                    background=(255, 255, 255)))
                    else:
                        continue
            out.append((thumb, f"{r['class']}/{r['source']}"))
        return out

    def data_pictures(self, dataset: str, oid: str) -> list[tuple[Path, str]]:
        """Pictures of one object's samples: surface points, SDF slices, occupancy (cached)."""
        root = self.catalog.dataset(dataset)
        ids = {r["id"]: r for r in self.data_objects(dataset)}
        if oid not in ids:
            raise AppError(f"{dataset}: no object {oid!r}")
        if ids[oid]["status"] != "ok":
            raise AppError(f"{oid}: failed in preprocessing: {ids[oid]['error']}")
        obj = root / oid
        names = ("surface points (coloured by normal)",
                 "SDF slices x = 0, y = 0, z = 0 (blue inside, red outside, black: the surface)",
                 "64^3 shell occupancy (projections along x, y, z)")
        paths = [self._data_dir(dataset) / f"{oid}_{k}.png" for k in ("surface", "sdf", "occupancy")]
        with self._data_lock:
            if not all(p.is_file() for p in paths):
                try:
                    a = fmt.read_sample_file(obj / fmt.SAMPLES_FILE, ["surface_points", "surface_normals", "occ64"])
                    mesh = load_mesh(obj / fmt.MESH_FILE)
                except (OSError, KeyError, ValueError) as e:
                    raise AppError(f"{oid}: cannot read its samples ({_one_line(e)})") from None
                save_png(paths[0], points_picture(a["surface_points"], a["surface_normals"]))
                save_png(paths[1], sdf_slices_picture(*mesh))
                save_png(paths[2], occupancy_picture(a["occ64"]))
        return list(zip(paths, names))


# ---------------------------------------------------------------------------------------------
# Pictures of an object's samples (numpy + PIL)
# ---------------------------------------------------------------------------------------------


def _to_pixels(xy: np.ndarray, size: int) -> np.ndarray:
    """Canonical-frame coordinates in [-1, 1]^2 -> pixel indices (x right, y up)."""
    ij = np.clip(((xy + 1.0) / 2.0 * (size - 1)).round().astype(np.int64), 0, size - 1)
    return np.stack([size - 1 - ij[:, 1], ij[:, 0]], axis=1)


def points_picture(points: np.ndarray, normals: np.ndarray, size: int = 256, max_points: int = 40_000) -> np.ndarray:
    """Surface points seen along -z, -x and -y (nearest point per pixel), coloured by normal: (H, W, 3)."""
    sel = np.linspace(0, len(points) - 1, min(len(points), max_points)).astype(np.int64)
    p, n = points[sel].astype(np.float64), normals[sel].astype(np.float64)
    tiles = []
    for a, b, depth in ((0, 1, 2), (2, 1, 0), (0, 2, 1)):
        img = np.full((size, size, 3), 255, np.uint8)
        order = np.argsort(p[:, depth])  # far first, near last wins
        px = _to_pixels(p[order][:, [a, b]], size)
        col = np.clip((n[order] + 1.0) * 127.5, 0, 255).astype(np.uint8)
        for di in (0, 1):
            for dj in (0, 1):
                img[np.minimum(px[:, 0] + di, size - 1), np.minimum(px[:, 1] + dj, size - 1)] = col
        tiles.append(img)
    return image_grid(tiles, ncols=3, labels=["x-y", "z-y", "x-z"])


def sdf_slices_picture(vertices: np.ndarray, faces: np.ndarray, size: int = 160) -> np.ndarray:
    """Exact signed distance of the watertight surface on the planes x = 0, y = 0, z = 0: blue inside, red
    outside, black on the surface (|sdf| under a pixel)."""
    dist = MeshDistance(vertices, faces)
    u = np.linspace(-BOUND, BOUND, size)
    uu, vv = np.meshgrid(u, u[::-1], indexing="xy")
    tiles = []
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        pts = np.zeros((size * size, 3))
        pts[:, a], pts[:, b] = uu.ravel(), vv.ravel()
        s = dist.signed_distance(pts).reshape(size, size)
        t = np.sqrt(np.clip(np.abs(s) / 0.5, 0, 1))[..., None]  # white at the surface, saturated far from it
        inside = 255 * (1 - t) + np.array([30, 80, 220.0]) * t
        outside = 255 * (1 - t) + np.array([220, 60, 40.0]) * t
        img = np.where((s < 0)[..., None], inside, outside)
        img[np.abs(s) < 2 * BOUND / size] = 0
        tiles.append(img.astype(np.uint8))
    return image_grid(tiles, ncols=3, labels=["x = 0", "y = 0", "z = 0"])


def occupancy_picture(occ: np.ndarray, scale: int = 3) -> np.ndarray:
    """The shell occupancy grid projected along each axis (darker: more occupied cells on the ray)."""
    occ = np.asarray(occ, bool)
    tiles = []
    for axis in range(3):
        count = occ.sum(axis=axis).astype(np.float64)  # the two other axes remain, in order
        shade = 255 - np.round(200 * count / max(count.max(), 1)) - 55 * (count > 0)
        img = np.rot90(shade).astype(np.uint8)  # first remaining axis to the right, second up
        img = np.kron(img, np.ones((scale, scale), np.uint8))
        tiles.append(np.repeat(img[..., None], 3, axis=2))
    return image_grid(tiles, ncols=3, labels=["along x", "along y", "along z"])
