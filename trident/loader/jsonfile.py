"""Reading the JSON files of a model folder, with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

from trident.errors import TridentError


def read_json(path: str, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when absent and ``missing_ok``); a TridentError when it is not valid."""
    if missing_ok and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TridentError(f"{path} is not valid JSON ({e}); fix or restore the file") from None
    if not isinstance(value, dict):
        raise TridentError(f"{path} should hold a JSON object")
    return value
