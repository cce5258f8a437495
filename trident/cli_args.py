"""Argument conventions shared by the commands that read a model and write a new folder (quantize, prune,
upcycle): the model name ``default`` for the embedded SmolLM2, and an output folder that must be new or empty."""

from __future__ import annotations

import os

from trident.errors import TridentError

DEFAULT_MODEL = "default"
"""The MODEL argument that names the embedded SmolLM2-135M-Instruct GGUF."""


def model_path(name: str) -> str | None:
    """The path ``load_checkpoint`` takes for a MODEL argument (None: the default model)."""
    return None if name == DEFAULT_MODEL else name


def new_output_folder(path: str) -> str:
    """``path`` with ``~`` expanded, after checking that it does not exist or is an empty folder."""
    out = os.path.expanduser(path)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise TridentError(f"--out {out} exists and is not an empty folder; pick a new folder")
    return out
