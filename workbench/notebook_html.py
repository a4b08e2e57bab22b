"""Export an executed notebook as one HTML file that shows every figure and widget with no network request.

nbconvert's own HTML export leaves plotly's mime outputs out, and loads require.js, MathJax and the widget
manager from a CDN. `OfflineHTMLExporter` instead inlines plotly.js once, draws every plotly figure (in cells
and inside widgets' saved state) with it, and draws each widget as a static snapshot of its saved state
(boxes, HTML, figures, the value of each control):

    python -m workbench.notebook_html executed.ipynb            # writes executed.html
    jupyter nbconvert --to workbench_html executed.ipynb       # registered in pyproject.toml

Save the notebook with its widget state first (JupyterLab: Settings > Save Widget State Automatically), or
widgets are exported as their text placeholder.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
from importlib.resources import files
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from plotly.offline import get_plotlyjs
from traitlets import default

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TEMPLATES = Path(str(files("workbench") / "templates"))
CHOICES = ("DropdownModel", "ToggleButtonsModel", "RadioButtonsModel", "SelectModel", "SelectionSliderModel")
BOXES = ("VBoxModel", "HBoxModel", "BoxModel", "GridBoxModel")


class OfflineHTMLExporter(HTMLExporter):
    """nbconvert's JupyterLab HTML with figures and widgets drawn offline (see the module docstring)."""

    export_from_notebook = "HTML (offline, with figures)"

    @default("extra_template_basedirs")
    def _default_extra_template_basedirs(self):
        return [str(TEMPLATES)]

    @default("template_name")
    def _template_name_default(self):
        return "offline_html"

    def from_notebook_node(self, nb, resources=None, **kw):
        nb = copy.deepcopy(nb)
        figures = _Figures()
        state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if WIDGET_VIEW in data:
                    model_id = data[WIDGET_VIEW].get("model_id")
                    if model_id in state:
                        output["data"] = {"text/html": _widget(model_id, state, figures)}
                elif PLOTLY in data:
                    output["data"] = {"text/html": figures.html(data[PLOTLY], _classes(output))}
        nb.get("metadata", {}).pop("widgets", None)  # drawn statically: no widget manager to load
        resources = dict(resources or {})
        resources["plotly_js"] = get_plotlyjs() if figures.count else ""
        return super().from_notebook_node(nb, resources, **kw)


class _Figures:
    """Plotly figures as a div and a call to the inlined plotly.js, numbered for unique ids."""

    def __init__(self) -> None:
        self.count = 0

    def html(self, figure: dict, classes: str = "") -> str:
        self.count += 1
        div = f"wb-figure-{self.count}"
        layout = figure.get("layout", {})
        height = layout.get("height") or 450
        spec = json.dumps(
            {"data": figure.get("data", []), "layout": layout, "config": {"responsive": True}}
        ).replace("</", "<\\/")  # a label holding "</script>" must not end the script
        css = f"wb-plotly {classes}".strip()
        return (
            f'<div id="{div}" class="{css}" style="height:{int(height)}px;width:100%"></div>'
            f'<script type="text/javascript">(function() {{ const f = {spec}; '
            f'Plotly.newPlot("{div}", f.data, f.layout, f.config); }})();</script>'
        )


def _widget(model_id: str, state: dict, figures: _Figures) -> str:
    """A static snapshot of a saved widget and its children."""
    model = state.get(model_id)
    if model is None:
        return ""
    name, values = model.get("model_name", ""), model.get("state", {})
    layout = state.get(str(values.get("layout", "")).removeprefix("IPY_MODEL_"), {}).get("state", {})
    if layout.get("display") == "none" or layout.get("visibility") == "hidden":
        return ""
    classes = " ".join(values.get("_dom_classes", []))
    if name in BOXES:
        children = "".join(
            _widget(str(child).removeprefix("IPY_MODEL_"), state, figures)
            for child in values.get("children", [])
        )
        kind = "wb-vbox" if name in ("VBoxModel", "GridBoxModel") else "wb-hbox"
        return f'<div class="wb-static-widget {kind} {classes}">{children}</div>'
    if name in ("HTMLModel", "HTMLMathModel"):
        return f'<div class="{classes}">{values.get("value", "")}</div>'
    if name == "LabelModel":
        return f'<span class="{classes}">{html.escape(str(values.get("value", "")))}</span>'
    if name == "OutputModel":
        return (
            f'<div class="{classes}">'
            + "".join(_output(o, figures) for o in values.get("outputs", []))
            + "</div>"
        )
    return _control(name, values, classes)


def _classes(output: dict) -> str:
    """The CSS classes a workbench view gave an output (`workbench.figures.OutputSlot.add_class`)."""
    names = output.get("metadata", {}).get("workbench", {}).get("classes", [])
    return " ".join(html.escape(str(n)) for n in names)


def _output(output: dict, figures: _Figures) -> str:
    data = output.get("data", {})
    if PLOTLY in data:
        return figures.html(data[PLOTLY], _classes(output))
    if "text/html" in data:
        return "".join(data["text/html"])
    if "image/png" in data:
        return f'<img src="data:image/png;base64,{data["image/png"]}">'
    text = output.get("text") or data.get("text/plain", "")
    return f"<pre>{html.escape(''.join(text))}</pre>" if text else ""


def _control(name: str, values: dict, classes: str) -> str:
    """A control as its description and current value (a snapshot cannot be operated)."""
    description = values.get("description", "")
    if name in CHOICES:
        labels, index = values.get("_options_labels", []), values.get("index")
        value = labels[index] if isinstance(index, int) and 0 <= index < len(labels) else ""
    elif name == "ButtonModel":
        return ""  # nothing to run without a kernel
    else:
        value = values.get("value", "")
    text = f"{description}: {value}" if description and value != "" else str(value or description)
    if not text:
        return ""
    return f'<span class="wb-static-control {classes}">{html.escape(text)}</span>'


def export_html(notebook: str | Path, out: str | Path | None = None) -> Path:
    """Write `notebook` (executed, saved with its widget state) as offline HTML; the HTML file's path."""
    notebook = Path(notebook)
    out = Path(out) if out is not None else notebook.with_suffix(".html")
    body, _ = OfflineHTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    out.write_text(body, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("-o", "--out", type=Path, default=None, help="the HTML file (default: beside it)")
    args = parser.parse_args(argv)
    print(export_html(args.notebook, args.out))


if __name__ == "__main__":
    main()
