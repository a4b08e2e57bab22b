"""The latent-language lens (Wendler et al. 2024, "Do Llamas Work in English?").

For a translation prompt ("Deutsch: Blume - Français:") the next token should be the word in the target
language. Reading every layer's residual stream at the last position through the logit lens (the final
RMSNorm with the layer's own scale, then the unembedding) gives, per layer, the probability and the rank of
the concept's word in the **target** language, in the **source** language and in a **pivot** language
(English by default): a model that "thinks in English" shows the pivot word rising in the middle layers
before the target word takes over at the end.

Words that are several tokens long are represented by their first token (as Wendler et al. do), always
with the leading space a word has after ":". Stream index ``i`` is the residual stream entering layer ``i``
(``i = 0`` is the embedding) and ``i = n_layers`` the final one, labelled as TransformerLens's
``accumulated_resid`` ("0_pre", ..., "final_post").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.data.multilingual import PIVOT, TranslationPrompt
from workbench.inputs import batches, last_token_index
from workbench.multilingual.engine import ln_final, resid_labels, resid_names, tokenize, unembed

__all__ = ["ROLES", "LatentLens", "answer_token", "bootstrap_interval", "latent_language_lens", "lens_rows"]

#: The words read at each layer: the answer, the word given in the prompt, and the pivot language's word.
ROLES: tuple[str, ...] = ("target", "source", "pivot")
ROLE_COLORS = {"target": "#1b9e77", "source": "#7570b3", "pivot": "#d95f02"}


def answer_token(tokenizer, word: str) -> int:
    """The first token of ``" " + word`` (the word as it follows "Français:")."""
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{word!r} tokenizes to nothing; give a non-empty word.")
    return int(ids[0])


def lens_rows(prompts: Sequence[TranslationPrompt | Mapping], pivot: str = PIVOT) -> list[dict]:
    """Normalise prompts to ``{"prompt", "target", "source", "pivot"}`` dicts (the last three are words).

    A :class:`~workbench.data.multilingual.TranslationPrompt` gives its words in the target, source and
    ``pivot`` language; a mapping (e.g. for Apertus-8B: ``{"prompt": "Deutsch: Blume - Français:",
    "target": "fleur", "source": "Blume", "pivot": "flower"}``) is taken as it is.
    """
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, TranslationPrompt):
            if pivot not in p.words:
                raise KeyError(f"Prompt {i} has no word in pivot language {pivot!r}; it has {list(p.words)}.")
            out.append(
                {
                    "prompt": p.prompt,
                    "source_language": p.source,
                    "target_language": p.target,
                    "target": p.words[p.target],
                    "source": p.words[p.source],
                    "pivot": p.words[pivot],
                }
            )
        elif isinstance(p, Mapping):
            missing = [k for k in ("prompt", *ROLES) if k not in p]
            if missing:
                raise KeyError(f"Prompt {i} lacks {missing}: give 'prompt', 'target', 'source' and 'pivot'.")
            out.append(dict(p))
        else:
            raise TypeError(f"Prompt {i} is a {type(p).__name__}: give TranslationPrompts or dicts.")
    if not out:
        raise ValueError("No prompts given.")
    return out


def bootstrap_interval(values: np.ndarray, level: float = 0.95, n: int = 1000, seed: int = 0):
    """Percentile bootstrap interval of the mean of ``values`` (fixed seed: the same table every run)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass
class LatentLens:
    """``table``: one row per prompt x stream x role with the word's token, ``prob``, ``rank`` (0 = top)
    and ``logit`` under the logit lens at the prompt's last position."""

    table: pd.DataFrame
    labels: list[str]

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per stream and role: mean probability with a bootstrap interval over prompts, the median rank
        and the share of prompts where the word is the top token."""
        rows = []
        for (stream, role), group in self.table.groupby(["stream", "role"], sort=True):
            low, high = bootstrap_interval(group["prob"].to_numpy(), level)
            rows.append(
                {
                    "stream": stream,
                    "label": self.labels[stream],
                    "role": role,
                    "mean_prob": group["prob"].mean(),
                    "ci_low": low,
                    "ci_high": high,
                    "median_rank": group["rank"].median(),
                    "top1": (group["rank"] == 0).mean(),
                    "n_prompts": len(group),
                }
            )
        out = pd.DataFrame(rows)
        out["role"] = pd.Categorical(out["role"], ROLES)
        return out.sort_values(["role", "stream"]).reset_index(drop=True)

    def figure(self, title: str = "Latent-language lens") -> go.Figure:
        """Mean probability per layer of the target, source and pivot word, with 95% bootstrap bands."""
        summary = self.summary()
        fig = go.Figure()
        for role in ROLES:
            part = summary[summary["role"] == role]
            if part.empty:
                continue
            color = ROLE_COLORS[role]
            fig.add_trace(
                go.Scatter(
                    x=list(part["label"]) + list(part["label"])[::-1],
                    y=list(part["ci_high"]) + list(part["ci_low"])[::-1],
                    fill="toself",
                    fillcolor=color,
                    opacity=0.2,
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=part["label"],
                    y=part["mean_prob"],
                    mode="lines+markers",
                    name=role,
                    line={"color": color},
                    customdata=np.stack([part["median_rank"], part["top1"]], axis=1),
                    hovertemplate="%{x}: p=%{y:.3f}<br>median rank %{customdata[0]:.0f}, "
                    "top-1 %{customdata[1]:.2f}",
                )
            )
        fig.update_layout(
            title=title,
            xaxis_title="residual stream (logit lens)",
            yaxis_title="probability of the word's first token",
            yaxis_range=[0, 1],
            template="plotly_white",
        )
        return fig


def latent_language_lens(
    model,
    prompts: Sequence[TranslationPrompt | Mapping],
    *,
    pivot: str = PIVOT,
    batch_size: int = 64,
    progress: bool = True,
) -> LatentLens:
    """Run the latent-language lens over translation prompts (see the module docstring)."""
    items = lens_rows(prompts, pivot)
    n_layers = model.cfg.n_layers
    names, labels = resid_names(n_layers), resid_labels(n_layers)
    ids = {role: [answer_token(model.tokenizer, it[role]) for it in items] for role in ROLES}
    rows = []
    for chunk in tqdm(batches(range(len(items)), batch_size), desc="latent lens", disable=not progress):
        tokens, mask = tokenize(model, [items[i]["prompt"] for i in chunk])
        last = last_token_index(mask)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names, return_type=None)
            for stream, name in enumerate(names):
                device = cache[name].device
                resid = cache[name][torch.arange(len(chunk), device=device), last.to(device)]
                logits = unembed(model, ln_final(model, resid)).float()
                logprobs = logits.log_softmax(-1)
                for role in ROLES:
                    token = torch.tensor([ids[role][i] for i in chunk], device=logits.device)
                    logit = logits.gather(1, token[:, None])[:, 0]
                    rank = (logits > logit[:, None]).sum(-1)
                    prob = logprobs.gather(1, token[:, None])[:, 0].exp()
                    for j, i in enumerate(chunk):
                        rows.append(
                            {
                                "prompt_index": i,
                                "prompt": items[i]["prompt"],
                                "source_language": items[i].get("source_language"),
                                "target_language": items[i].get("target_language"),
                                "stream": stream,
                                "label": labels[stream],
                                "role": role,
                                "word": items[i][role],
                                "token_id": int(token[j]),
                                "prob": float(prob[j]),
                                "rank": int(rank[j]),
                                "logit": float(logit[j]),
                            }
                        )
    return LatentLens(pd.DataFrame(rows), labels)
