"""The lens explorer: type a prompt, see the logit lens, a target token's path, and who wrote the answer.

`LensExplorer(model, prompt, answer=..., wrong=...)` shows the logit-lens heatmap (top token per layer and
position), the rank and probability of `answer` at the last position through the layers, and the direct
logit attribution of every head and MLP to logit(answer) - logit(wrong) (or to logit(answer) alone).
"""

from __future__ import annotations

import ipywidgets as widgets

from workbench import figures
from workbench.hooked_model import HookedApertus
from workbench.lens import (
    direct_logit_attribution,
    dla_figure,
    logit_lens_figure,
    target_trajectory,
    trajectory_figure,
)
from workbench.widgets.controls import TextArea, TextBox


class LensExplorer:
    """Controls: `prompt_box`, `answer_box`, `wrong_box` (may be empty), `run_button`. Figures: `lens`,
    `trajectory`, `attribution` (`workbench.figures.FigureView`s: cell outputs below the controls, replaced on
    each run). `status` reports
    errors and the check that the attributions sum to the model's logit difference.
    Display `explorer.widget`."""

    def __init__(
        self, model: HookedApertus, prompt: str = "", *, answer: str = "", wrong: str = "", k: int = 5
    ):
        self.model, self.k = model, k
        self.prompt_box = TextArea(
            what="prompt_box", value=prompt, layout=widgets.Layout(width="100%", height="3.5em")
        )
        # Boxes take any text (they sync at every keystroke): run() checks the tokens and reports in status.
        self.answer_box = TextBox(
            what="answer_box", hint=" (one token, e.g. ' Paris')", value=answer, description="answer"
        )
        self.wrong_box = TextBox(
            what="wrong_box", hint=" (one token, or '' for none)", value=wrong, description="vs"
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.lens = figures.FigureView()
        self.trajectory = figures.FigureView()
        self.attribution = figures.FigureView()
        self.run_button.on_click(lambda _: self.run())
        self.widget = figures.ViewLayout(
            [
                widgets.HBox([self.prompt_box, self.run_button]),
                widgets.HBox([self.answer_box, self.wrong_box]),
                self.status,
                self.lens,
                self.trajectory,
                self.attribution,
            ],
            "wb-lens-explorer",
        )
        if prompt:
            self.run()

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()

    def run(self, prompt: str | None = None, answer: str | None = None, wrong: str | None = None) -> None:
        """Recompute every view for the prompt and tokens in the boxes (or the ones given here)."""
        for box, value in ((self.prompt_box, prompt), (self.answer_box, answer), (self.wrong_box, wrong)):
            if value is not None:
                box.value = value
        text, answer, wrong = self.prompt_box.value, self.answer_box.value, self.wrong_box.value or None
        try:
            self.lens.show(logit_lens_figure(self.model, text, self.k))
            if not answer:
                self.status.value = "Type an answer token to follow it through the layers and attribute it."
                return
            self.trajectory.show(trajectory_figure(target_trajectory(self.model, text, answer), answer))
            table = direct_logit_attribution(self.model, text, answer, wrong)
        except (ValueError, IndexError, KeyError) as error:
            self.status.value = figures.error_html(error)
            return
        what = f"logit({answer!r}) - logit({wrong!r})" if wrong else f"logit({answer!r})"
        self.attribution.show(dla_figure(table, f"Direct logit attribution to {what}"))
        self.status.value = (
            f"{what} = {table.attrs['total']:+.4f}; the parts sum to {table.attrs['sum']:+.4f} "
            "(embedding + heads + MLPs, final-norm scale from this run)."
        )
        self.table = table
