"""Shared test set-up: one torch thread, the real test meshes, and the tiny model configs.

* Every test runs with one torch thread: the models are tiny, so thread wake-ups would dominate, and the
  results do not depend on the machine's core count.
* ``../shared/meshes`` (or ``$SHAPEFLOW_TEST_MESHES``) holds real meshes made by others; tests that need
  them take the ``shared_meshes`` fixture and skip, with the reason, where the folder is absent.
* The ``TINY_*`` dicts are the model sizes the tests build (fields of the model configs, on top of the
  ``tiny`` preset where one is named); tests import them with ``from conftest import ...``.
* ``-m "not slow"`` (``make check``) leaves out the tests marked ``slow``: end-to-end runs through the CLI
  and the real-mesh sweeps. ``make test`` runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MESHES = Path(os.environ.get("SHAPEFLOW_TEST_MESHES", REPO.parent / "shared" / "meshes"))

#: VecSet VAE for unit tests (on the ``tiny`` preset): 16 tokens x 4 channels, width 32, 1 + 1 layers.
TINY_VECSET = dict(num_tokens=16, latent_channels=4, width=32, heads=2, encoder_layers=1, decoder_layers=1,
                   surface_points=256, sharp_points=64)
#: DiT trunk for unit tests (token and grid DiTs).
TINY_DIT = dict(width=32, depth=2, heads=2)
#: Grid VAE for unit tests (full config: 32^3 occupancy, two levels of 8 and 16 channels).
TINY_GRID_VAE = dict(resolution=32, channels=(8, 16), latent_channels=4, num_res_blocks=1,
                     num_res_blocks_middle=1)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_meshes() -> Path:
    """The folder of real test meshes; skips the test where it is absent."""
    if not MESHES.is_dir():
        pytest.skip(f"real test meshes not found at {MESHES} (set SHAPEFLOW_TEST_MESHES)")
    return MESHES
