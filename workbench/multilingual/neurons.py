"""Language-specific xIELU neurons: activation probability per language, its entropy (LAPE), ablation.

Tang et al. (2024, "Language-Specific Neurons") call a SiLU neuron active on a token when its activation is
positive, estimate per language the probability that it is active, normalise those probabilities over the
languages and take their entropy, the *language activation probability entropy* (LAPE). A low LAPE means
the neuron fires for few languages.

**Which xIELU regime counts as active.** xIELU (see :mod:`workbench.xielu`) has three regimes: *positive*
(pre-activation x > 0, output alpha_p x^2 + beta x > 0, growing), *negative falling* (x* < x <= 0, a small
negative output, like SiLU's dip) and *negative rising* (x <= x*, the output grows again as x goes down).
We count a neuron as active in the **positive** regime: it is the regime whose outputs are positive and
grow with the input, as SiLU's positive part that Tang et al. threshold on, so LAPE keeps its meaning. The
negative-rising regime is a second way to send a large signal (a neuron answering to strongly negative
inputs), with the opposite sign of pre-activation: it is counted separately (``regime="negative rising"``)
with its own probabilities and LAPE rather than merged, so a neuron that is language-specific through its
rising branch is visible as such and is not confused with one that fires positively. The regimes come
from ``workbench.xielu.classify_regimes`` with each layer's boundary x* from ``workbench.xielu.curve_table``.

Selection follows Tang et al.: keep neurons whose activation probability reaches a threshold (by default
the 95th percentile of all probabilities) in at least one language, take the ``fraction`` of all neurons
with the lowest LAPE among them, and assign each to the languages where it reaches the threshold.
Ablation sets the selected neurons' xIELU outputs (``mlp.hook_post``) to 0, which is xIELU(0): the neuron
is silenced, and measures the next-token loss on every language.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.inputs import batches
from workbench.multilingual.engine import act_name, tokenize
from workbench.xielu import REGIMES, classify_regimes, curve_table

__all__ = [
    "ACTIVE_REGIME",
    "LanguageActivation",
    "NeuronAblation",
    "ablate_neurons",
    "lape",
    "language_activation",
    "language_losses",
    "neurons_by_language",
    "random_neurons",
    "select_language_neurons",
]

#: The regime counted as "active" for LAPE (see the module docstring).
ACTIVE_REGIME = "positive"
Neuron = tuple[int, int]  # (layer, neuron)


# ------------------------------------------------------------------------------------- pure functions
def lape(probabilities: pd.DataFrame) -> pd.Series:
    """Language activation probability entropy per row (neuron) of a neurons x languages table.

    Probabilities are normalised over languages first; a neuron never active in any language has no
    distribution and gets NaN."""
    p = probabilities.to_numpy(dtype=float)
    total = p.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / total
        terms = np.where(q > 0, -q * np.log(q), 0.0)
    out = terms.sum(1)
    out[total[:, 0] == 0] = np.nan
    return pd.Series(out, index=probabilities.index, name="lape")


def select_language_neurons(
    probabilities: pd.DataFrame,
    *,
    fraction: float = 0.01,
    threshold: float | None = None,
    quantile: float = 0.95,
) -> pd.DataFrame:
    """Tang et al.'s selection: the ``fraction`` of all neurons with the lowest LAPE among those whose
    probability reaches ``threshold`` (default: the ``quantile`` of all probabilities) in some language.

    Returns one row per selected neuron (index as ``probabilities``) with its LAPE, its probabilities and
    ``languages``: the languages where it reaches the threshold (a tuple), sorted by LAPE."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}.")
    if threshold is None:
        threshold = float(np.quantile(probabilities.to_numpy(), quantile))
    entropy = lape(probabilities)
    candidates = probabilities.max(axis=1) >= threshold
    k = max(1, math.ceil(fraction * len(probabilities)))
    chosen = entropy[candidates & entropy.notna()].sort_values(kind="stable").index[:k]
    out = probabilities.loc[chosen].copy()
    out.insert(0, "lape", entropy.loc[chosen])
    out["languages"] = [
        tuple(c for c in probabilities.columns if row[c] >= threshold) for _, row in out.iterrows()
    ]
    out.attrs["threshold"] = threshold
    return out


def neurons_by_language(selection: pd.DataFrame) -> dict[str, list[Neuron]]:
    """``{language: [(layer, neuron), ...]}`` from :func:`select_language_neurons` (a neuron may be in
    several)."""
    out: dict[str, list[Neuron]] = {}
    for (layer, neuron), languages in selection["languages"].items():
        for language in languages:
            out.setdefault(language, []).append((int(layer), int(neuron)))
    return out


def random_neurons(n_layers: int, d_mlp: int, k: int, seed: int = 0) -> list[Neuron]:
    """``k`` distinct random (layer, neuron) pairs: the control group for an ablation."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(n_layers * d_mlp, size=k, replace=False)
    return [(int(i // d_mlp), int(i % d_mlp)) for i in flat]


# ---------------------------------------------------------------------------------- activation counts
@dataclass
class LanguageActivation:
    """How often each xIELU neuron is in each regime, per language.

    ``counts[regime, language, layer, neuron]`` over ``n_tokens[language]`` tokens (BOS and padding
    excluded); ``layers`` are the model layers counted."""

    languages: list[str]
    layers: list[int]
    counts: np.ndarray
    n_tokens: dict[str, int]

    def probabilities(self, regime: str = ACTIVE_REGIME) -> pd.DataFrame:
        """Neurons (index: layer, neuron) x languages: probability of being in ``regime`` on a token."""
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, not {regime!r}.")
        c = self.counts[REGIMES.index(regime)]  # [language, layer, neuron]
        per_token = c / np.array([self.n_tokens[k] for k in self.languages])[:, None, None]
        d_mlp = c.shape[-1]
        index = pd.MultiIndex.from_product([self.layers, range(d_mlp)], names=["layer", "neuron"])
        return pd.DataFrame(per_token.reshape(len(self.languages), -1).T, index=index, columns=self.languages)

    def lape(self, regime: str = ACTIVE_REGIME) -> pd.Series:
        return lape(self.probabilities(regime))

    def select(self, regime: str = ACTIVE_REGIME, **kwargs) -> pd.DataFrame:
        """:func:`select_language_neurons` on this regime's probabilities."""
        return select_language_neurons(self.probabilities(regime), **kwargs)

    def top_neurons(self, language: str, k: int = 10, regime: str = ACTIVE_REGIME) -> pd.DataFrame:
        """The ``k`` neurons most specific to ``language``: highest probability there minus the highest
        elsewhere, with their LAPE."""
        if language not in self.languages:
            raise KeyError(f"No language {language!r}; these are {self.languages}.")
        p = self.probabilities(regime)
        others = p.drop(columns=[language]).max(axis=1) if len(self.languages) > 1 else 0.0
        out = p.assign(lape=lape(p), specificity=p[language] - others)
        return out.sort_values("specificity", ascending=False, kind="stable").head(k)

    def regime_table(self) -> pd.DataFrame:
        """Per language: the share of (token, neuron) pairs in each regime, and how many neurons have a LAPE
        below 0.5 for the positive and the negative-rising regime."""
        rows = []
        for i, language in enumerate(self.languages):
            total = self.counts[:, i].sum()
            row = {"language": language, "tokens": self.n_tokens[language]}
            row |= {f"share {r}": float(self.counts[j, i].sum() / total) for j, r in enumerate(REGIMES)}
            rows.append(row)
        out = pd.DataFrame(rows)
        for regime in (ACTIVE_REGIME, "negative rising"):
            out[f"neurons with LAPE<0.5 ({regime})"] = int((self.lape(regime) < 0.5).sum())
        return out

    def figure(self, regime: str = ACTIVE_REGIME, k: int = 8) -> go.Figure:
        """Heatmap: each language's top-k neurons (rows) x languages, coloured by activation probability."""
        p = self.probabilities(regime)
        picked = []
        for language in self.languages:
            picked += [i for i in self.top_neurons(language, k, regime).index if i not in picked]
        table = p.loc[picked]
        fig = go.Figure(
            go.Heatmap(
                z=table.to_numpy(),
                x=self.languages,
                y=[f"L{la}.N{n}" for la, n in table.index],
                colorscale="Viridis",
                zmin=0,
                zmax=1,
                colorbar={"title": "P(active)"},
            )
        )
        fig.update_layout(
            title=f"Most language-specific neurons ({regime} regime)",
            yaxis={"autorange": "reversed"},
            template="plotly_white",
            height=max(300, 18 * len(picked) + 120),
        )
        return fig


def language_activation(
    model,
    texts: Mapping[str, Sequence[str]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> LanguageActivation:
    """Count, per language, how often each xIELU neuron's pre-activation falls in each regime.

    texts: ``{language: [text, ...]}``.
    One forward per batch with hooks on ``mlp.hook_pre``, stopped after the last layer counted; memory is one
    batch's activations."""
    if not texts:
        raise ValueError("Give at least one language: texts={'en': [...], ...}.")
    layers = list(range(model.cfg.n_layers)) if layers is None else [model.check_layer(la) for la in layers]
    boundary = curve_table(model)["boundary"]
    layer_of = {act_name("pre", la): la for la in layers}
    stop = max(layers) + 1
    counts = np.zeros((len(REGIMES), len(texts), len(layers), model.cfg.d_mlp), dtype=np.int64)
    n_tokens = {}
    for li, (language, items) in enumerate(texts.items()):
        items = list(items)
        if not items:
            raise ValueError(f"Language {language!r} has no texts.")
        n_tokens[language] = 0
        for batch in tqdm(batches(items, batch_size), desc=f"neurons {language}", disable=not progress):
            tokens, mask = tokenize(model, batch)
            valid = mask.bool()
            if model.tokenizer.bos_token_id is not None:
                valid[:, 0] = False  # BOS is the same in every language: it says nothing about language
            n_tokens[language] += int(valid.sum())

            def count(x, hook, li=li, valid=valid):
                layer = layer_of[hook.name]
                regimes = classify_regimes(x.float(), float(boundary.loc[layer]))
                keep = valid.to(x.device)[..., None]
                for r in range(len(REGIMES)):
                    hits = ((regimes == r) & keep).sum((0, 1)).cpu().numpy()
                    counts[r, li, layers.index(layer)] += hits

            hooks = [(name, count) for name in layer_of]
            with torch.no_grad():
                model.run_with_hooks(
                    tokens,
                    attention_mask=mask,
                    fwd_hooks=hooks,
                    return_type=None,
                    stop_at_layer=stop if stop < model.cfg.n_layers else None,
                )
    return LanguageActivation(list(texts), layers, counts, n_tokens)


# -------------------------------------------------------------------------------------------- ablation
def language_losses(
    model,
    texts: Mapping[str, Sequence[str]],
    *,
    fwd_hooks: Sequence = (),
    batch_size: int = 32,
) -> dict[str, float]:
    """Mean next-token cross-entropy per language over real tokens (BOS as context only, padding skipped)."""
    out = {}
    for language, items in texts.items():
        items = list(items)
        total, count = 0.0, 0
        for batch in batches(items, batch_size):
            tokens, mask = tokenize(model, batch)
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=list(fwd_hooks))
            logprobs = logits[:, :-1].float().log_softmax(-1)
            target = tokens[:, 1:].to(logprobs.device)
            nll = -logprobs.gather(-1, target[..., None])[..., 0]
            keep = mask[:, 1:].bool().to(nll.device)
            total += float(nll[keep].sum())
            count += int(keep.sum())
        out[language] = total / count
    return out


def _silence(neurons: Sequence[Neuron]) -> list:
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(int(layer), []).append(int(neuron))

    def silencer(index: torch.Tensor):
        def hook(post, hook):
            post[..., index.to(post.device)] = 0.0  # xIELU(0) = 0: the neuron says nothing
            return post

        return hook

    return [(act_name("post", layer), silencer(torch.tensor(idx))) for layer, idx in by_layer.items()]


@dataclass
class NeuronAblation:
    """``table``: one row per ablated group x evaluated language: ``base_loss``, ``loss``, ``delta``."""

    table: pd.DataFrame

    def matrix(self) -> pd.DataFrame:
        """Loss increase: ablated group (rows) x evaluated language (columns)."""
        return self.table.pivot(index="ablated", columns="language", values="delta")

    def ratios(self, floor: float = 1e-3) -> pd.Series:
        """For each group named after a language: its own loss increase over the mean increase of the other
        languages, that mean taken as at least ``floor`` nats (silencing can lower another language's loss
        slightly, which would make the ratio meaningless or infinite)."""
        m = self.matrix()
        out = {}
        for group in m.index:
            if group in m.columns and len(m.columns) > 1:
                others = float(m.loc[group].drop(group).mean())
                out[group] = float(m.loc[group, group]) / max(others, floor)
        return pd.Series(out, name="own / others' loss increase")

    def figure(self) -> go.Figure:
        m = self.matrix()
        fig = go.Figure(
            go.Heatmap(
                z=m.to_numpy(),
                x=list(m.columns),
                y=list(m.index),
                colorscale="Reds",
                text=np.round(m.to_numpy(), 3),
                texttemplate="%{text}",
                colorbar={"title": "Δ loss"},
            )
        )
        fig.update_layout(
            title="Loss increase when a language's neurons are silenced",
            xaxis_title="evaluated language",
            yaxis_title="neurons silenced",
            template="plotly_white",
        )
        return fig


def ablate_neurons(
    model,
    groups: Mapping[str, Sequence[Neuron]],
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> NeuronAblation:
    """Silence each group of (layer, neuron) in turn and measure every language's next-token loss."""
    for name, neurons in groups.items():
        for layer, neuron in neurons:
            model.check_layer(int(layer))
            if not 0 <= int(neuron) < model.cfg.d_mlp:
                raise ValueError(f"Group {name!r}: neuron {neuron} outside 0..{model.cfg.d_mlp - 1}.")
    base = language_losses(model, texts, batch_size=batch_size)
    rows = []
    for name, neurons in tqdm(groups.items(), desc="ablations", disable=not progress):
        losses = language_losses(model, texts, fwd_hooks=_silence(neurons), batch_size=batch_size)
        for language, loss in losses.items():
            rows.append(
                {
                    "ablated": name,
                    "n_neurons": len(neurons),
                    "language": language,
                    "base_loss": base[language],
                    "loss": loss,
                    "delta": loss - base[language],
                }
            )
    return NeuronAblation(pd.DataFrame(rows))
