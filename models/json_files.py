"""Reading the small JSON files beside weights (sidecars, model_index.json, provenance.json) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], what: str = "") -> dict[str, Any]:
    """The JSON object in ``path``. Raises ``error`` with one line that names the file (``what`` before it, e.g.
    ``"the sidecar "``) and the fix, when the file cannot be read or parsed or holds something else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"cannot read {what}{path} ({type(err).__name__}: {err}); fix or delete it") from None
    if not isinstance(value, dict):
        raise error(f"{what}{path} is not a JSON object (it holds a {type(value).__name__}); fix or delete it")
    return value
