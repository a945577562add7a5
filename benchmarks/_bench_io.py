"""Shared by the benchmark scripts: writing their JSON results."""
from __future__ import annotations

import json
import os


def write_json(path: str, out: dict, announce: bool = True) -> None:
    """Write ``out`` to ``path`` atomically (a killed run leaves the previous complete file),
    creating its folder; prints ``wrote PATH`` unless ``announce`` is False."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")
