"""The probe view: a sentence with each token coloured by what a layer's probe reads there.

`ProbeView(model, result, data)` shows one sentence of an encoded dataset at a time. Each labelled token is
written ``token/PREDICTION`` and shaded by the probe's confidence: blue when the prediction is right, red
(and struck through) when it is wrong; special tokens and the later sub-tokens of a word are left plain. The
model runs once per sentence for every probed hook, so switching layers only re-applies a probe.
"""

from __future__ import annotations

import html
from collections import OrderedDict

import ipywidgets as widgets
import torch

from workbench import figures
from workbench.data.alignment import IGNORE, EncodedDataset, TokenLabelledDataset
from workbench.probing.probes import ProbeResult
from workbench.widgets.controls import Choice, IndexText
from workbench.widgets.tokens import colored_tokens_html


def sentence_predictions(
    model, result: ProbeResult, data: EncodedDataset, sentence: int
) -> dict[str, torch.Tensor]:
    """Probabilities ``[pos, classes]`` of every probe of ``result`` on one sentence, keyed by hook (one
    forward)."""
    if not 0 <= sentence < len(data):
        raise IndexError(
            f"sentence {sentence} is out of range: the dataset "
            f"has {len(data)} sentences (0..{len(data) - 1})."
        )
    ids = torch.tensor(data.input_ids[sentence])[None]
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, names_filter=result.hooks)
    out = {}
    for hook in result.hooks:
        act = cache[hook][0]
        out[hook] = result.logits(act.reshape(act.shape[0], -1).cpu(), hook).softmax(-1)
    return out


def probe_sentence_html(
    model,
    result: ProbeResult,
    data: EncodedDataset,
    sentence: int,
    layer: int | str,
    probabilities: torch.Tensor | None = None,
) -> str:
    """The coloured sentence for the probe at ``layer`` (see the module docstring), with a one-line
    summary."""
    hook = result.hooks[result.index(layer)]
    probs = (
        sentence_predictions(model, result, data, sentence)[hook] if probabilities is None else probabilities
    )
    confidence, predicted = probs.max(-1)
    tokens = model.token_labels(data.input_ids[sentence])
    labels = data.labels[sentence]
    shown, values, marked, titles = [], [], [], []
    right = total = 0
    for token, gold, pred, conf in zip(tokens, labels, predicted.tolist(), confidence.tolist()):
        name = result.label_names[pred]
        if gold == IGNORE:
            shown.append(token)
            values.append(0.0)
            marked.append(False)
            titles.append(f"{token!r}: not labelled (probe would say {name}, {conf:.0%})")
            continue
        ok = gold == pred
        right, total = right + ok, total + 1
        shown.append(f"{token}/{name}")
        values.append(conf if ok else -conf)
        marked.append(not ok)
        gold_name = result.label_names[gold]
        titles.append(
            f"{token!r}: predicted {name} ({conf:.0%}), gold {gold_name}" + ("" if ok else " - wrong")
        )
    summary = (
        f"<div style='margin:4px 0'>sentence {sentence}, probe at <code>{html.escape(hook)}</code>: "
        f"<b>{right}/{total}</b> labelled tokens right. Shade = confidence; "
        "<span style='color:#2166ac'>blue: right</span>, <span "
        "style='color:#b2182b'>red, struck: wrong</span>.</div>"
    )
    return summary + colored_tokens_html(shown, values, vmax=1.0, titles=titles, marked=marked)


class ProbeView:
    """Choose a layer and a sentence; see the probe's prediction and confidence on every token.

    ``data``: a TokenLabelledDataset (encoded with the model's tokenizer, as harvest does) or an
    EncodedDataset. Controls: `layer` (a dropdown over the probed hooks) and `sentence` (an index into
    ``data``; a value outside it raises, naming the range); `html` holds
    the view. `model_runs` counts forwards (one per sentence shown, cached for the last few). Display it as
    any widget.
    """

    def __init__(
        self,
        model,
        result: ProbeResult,
        data: EncodedDataset | TokenLabelledDataset,
        *,
        sentence: int = 0,
        layer: int | str | None = None,
        cached_sentences: int = 16,
    ) -> None:
        if isinstance(data, TokenLabelledDataset):  # the same inputs as harvest(), encoded the same way
            data = data.encode(model.tokenizer)
        elif not isinstance(data, EncodedDataset):
            raise TypeError(
                f"ProbeView needs a TokenLabelledDataset or an EncodedDataset (as harvest), not "
                f"{type(data).__name__}."
            )
        if list(data.label_names) != list(result.label_names):
            raise ValueError(
                f"The dataset's labels {list(data.label_names)} "
                f"differ from the probes' {result.label_names}: "
                "show the dataset the probes were trained on."
            )
        self.model, self.result, self.data = model, result, data
        self.model_runs = 0
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cached = max(1, cached_sentences)
        start = (
            result.index(layer) if layer is not None else int(result.table["accuracy"].to_numpy().argmax())
        )
        self.layer = Choice(
            what="layer",
            options=[(f"layer {lay}  ({hook})", hook) for lay, hook in zip(result.layers, result.hooks)],
            value=result.hooks[start],
            description="probe",
            layout=widgets.Layout(width="420px"),
        )
        self.sentence = IndexText(
            len(data),
            what="sentence",
            value=sentence,
            description="sentence",
            layout=widgets.Layout(width="200px"),
        )
        self.html = figures.HTMLView()
        self.layer.observe(lambda _: self.refresh(), names="value")
        self.sentence.observe(lambda _: self.refresh(), names="value")
        self.widget = figures.ViewLayout(
            [widgets.HBox([self.layer, self.sentence]), self.html], "wb-probe-view"
        )
        self.refresh()

    def refresh(self) -> None:
        index = self.sentence.value
        if index not in self._cache:
            self._cache[index] = sentence_predictions(self.model, self.result, self.data, index)
            self.model_runs += 1
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        hook = self.layer.value
        self.html.value = probe_sentence_html(
            self.model, self.result, self.data, index, hook, self._cache[index][hook]
        )

    def _ipython_display_(self) -> None:
        self.widget._ipython_display_()
