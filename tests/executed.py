"""Execute a notebook as a user saves it: outputs and widget state in the file (nbclient, a real kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MAX_BYTES = 2 * 1024 * 1024


def execute(path: Path, folder: Path) -> Path:
    """Run `path` top to bottom and save it, with its outputs and widget state, as folder/<name>."""
    notebook = nbformat.read(path, as_version=4)
    folder.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
        store_widget_state=True,
    )
    client.execute()
    saved = folder / path.name
    nbformat.write(notebook, saved)
    return saved


def widget_state(notebook: dict) -> dict[str, dict]:
    """model id -> {model_name, state, ...} as saved in the notebook's metadata."""
    return notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def figures_in(notebook: dict) -> tuple[list[dict], list[dict]]:
    """The plotly figures a saved notebook holds: (in cell outputs, inside Output widgets' saved state)."""
    cells = [
        output["data"][PLOTLY]
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
        if PLOTLY in output.get("data", {})
    ]
    widgets = [
        output["data"][PLOTLY]
        for model in widget_state(notebook).values()
        if model.get("model_name") == "OutputModel"
        for output in model["state"].get("outputs", [])
        if PLOTLY in output.get("data", {})
    ]
    return cells, widgets


def load(path: Path) -> dict:
    return json.loads(path.read_text())
