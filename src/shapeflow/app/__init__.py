"""``shapeflow app``: a local web app (gradio) to generate, reconstruct and browse preprocessed data.

Two halves, so that the request handling is tested without a browser or gradio:

* :mod:`shapeflow.app.handlers`: everything a request does, in plain Python (the model cache, the
  catalogue of checkpoints and data folders, per-visitor output folders, upload checks, generation,
  reconstruction and data pictures). Errors a visitor can cause are :class:`~shapeflow.app.handlers.AppError`
  with a one-line message.
* :mod:`shapeflow.app.ui`: the gradio page built on those handlers (``pip install -e ".[app]"``), the
  queue, the file-serving limits and ``launch``.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_environment(out: str | os.PathLike) -> None:
    """Point gradio's upload / cache folder at the app's output folder and turn its telemetry off.

    Call before gradio is first imported (``shapeflow app`` does): gradio reads these variables at import.
    """
    out = Path(out).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(out)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(out / "examples")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
