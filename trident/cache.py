"""Where trident keeps what it builds or measures once per machine: ``$TRIDENT_CACHE_DIR`` (default
``~/.cache/trident``), one folder per kind (``native/`` libraries, ``advise/`` measurements)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRIDENT_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cached thing (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trident") / kind
