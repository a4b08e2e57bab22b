"""Results saved as two small JSON files: the per-pair values, and the metadata that says what they are.

`save_result(path, kind, meta, values)` writes `path` (the values: columns and rows, floats exact)
and `path` with ".meta.json" (model identity, prompts, answers, metric, component, direction, versions).
No pickle and no model: a result is kilobytes and loads without the model.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import pandas as pd


def meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def versions() -> dict[str, str]:
    import torch
    import transformers

    import workbench

    return {
        "workbench": getattr(workbench, "__version__", "unknown"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def save_result(path: str | Path, kind: str, meta: dict[str, Any], values: pd.DataFrame) -> Path:
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"Save to a .json path (got {path.name!r}); the metadata goes next to it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # json (not pandas' to_json, which keeps 15 digits): Python floats round-trip exactly.
    split = values.to_dict(orient="split", index=False)
    path.write_text(json.dumps({"columns": split["columns"], "data": split["data"]}))
    meta = {"kind": kind, **meta, "versions": versions(), "values_file": path.name}
    meta_path(path).write_text(json.dumps(meta, indent=1))
    return path


def load_result(path: str | Path) -> tuple[str, dict[str, Any], pd.DataFrame]:
    path = Path(path)
    if not path.exists() or not meta_path(path).exists():
        raise FileNotFoundError(
            f"{path} and {meta_path(path).name} must both exist (a result is saved as those two files)."
        )
    meta = json.loads(meta_path(path).read_text())
    values = pd.DataFrame(**json.loads(path.read_text()))
    return meta.pop("kind"), meta, values
