"""Generation with hooks: a KV-cached decoding loop over the hooked forward; every hook fires at every step.

`generate(model, input, ...)` (also `model.generate(...)`) runs the prompt once, then one position per step,
each through `model(...)` with a transformers `DynamicCache`. Hooks attached with `model.hooks(...)`, passed
as `fwd_hooks=`, or made by an intervention (`workbench.interventions`) therefore see every step, and see the
NEW positions only (TransformerLens's semantics): the prompt at step 0, then one column per step.

Which positions a hook is looking at: `current_step()` returns a `Step` while a generation runs (None
otherwise): `step.index` (0 for the prompt), `step.positions` (the columns of the padded sequence the
activation holds, [new]), `step.prompt_length` (the padded prompt's width: columns below it are prompt,
columns from it on are generated) and `step.position_ids` (rotary positions [batch, new], which skip left
padding). Batches are padded on the left, as transformers pads for generation, so all rows generate into
the same column.

This module is engine-side: it needs only the model's public forward and tokenizer, and analyses may use it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workbench import inputs


@dataclass(frozen=True)
class Step:
    """Where a generation is: what the activations a hook receives right now hold."""

    index: int  # 0: the prompt; k: the k-th generated position
    positions: torch.Tensor  # [new] columns of the (left-padded) sequence held by the activation
    prompt_length: int  # the padded prompt's width: columns >= prompt_length were generated
    position_ids: torch.Tensor  # [batch, new] rotary positions (left padding skipped)

    @property
    def generated(self) -> torch.Tensor:
        """[new] bool: which of the activation's positions are generated tokens (not prompt)."""
        return self.positions >= self.prompt_length


_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("workbench_generation_step", default=None)


def current_step() -> Step | None:
    """The generation step the running forward belongs to (None outside `generate`): read it in a hook."""
    return _STEP.get()


def current_positions() -> torch.Tensor | None:
    """The sequence columns [new] of the activation a hook sees during `generate` (None outside it)."""
    step = _STEP.get()
    return None if step is None else step.positions


@contextmanager
def _at(step: Step) -> Iterator[None]:
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def generate(
    model: Any,
    input: str | Sequence[str] | torch.Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    fwd_hooks: Sequence = (),
    return_type: Literal["str", "tokens"] = "str",
    streamer: Any = None,
    progress: bool = True,
) -> str | list[str] | torch.Tensor:
    """Continue `input` by up to `max_new_tokens` tokens, every hook firing at every step.

    input: a text, a list of texts (padded on the left for you) or token ids [batch, pos] (with
    `attention_mask` when padded; pad on the left). Greedy by default; `do_sample=True` samples with
    `temperature`, `top_k`, `top_p` (transformers' warpers) from a generator seeded by `seed`.
    A row stops at an end token (`eos_token_id`; default: the checkpoint's generation config) or once its
    continuation contains one of the `stop` strings; finished rows are filled with the pad token, as
    transformers does. fwd_hooks: `[(name, fn)]` attached for the whole generation (or use `model.hooks`).
    return_type "str": the continuations' text (the prompt not repeated), one string for one text input;
    "tokens": the whole sequences [batch, prompt + new] as transformers' `generate` returns them.
    streamer: anything with transformers' streamer methods (`put(ids)`, `end()`), e.g. `TextStreamer` or
    `workbench.generation.WidgetStreamer`; progress: a tqdm bar over the steps.
    """
    if return_type not in ("str", "tokens"):
        raise ValueError(f"return_type must be 'str' or 'tokens', not {return_type!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, not {max_new_tokens!r}.")
    tokens, mask = _prompt(model, input, attention_mask)
    choose = _chooser(do_sample, temperature, top_k, top_p, seed, tokens.device)
    ends = _end_tokens(model, eos_token_id)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    prompt_length, pad = tokens.shape[1], model.pad_token_id
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    cache = DynamicCache()
    if streamer is not None:
        streamer.put(tokens.cpu())
    new, hooks = tokens, model.hooks(fwd_hooks) if fwd_hooks else nullcontext()
    bar = tqdm(total=max_new_tokens, desc="generate", leave=False, disable=not progress)
    with torch.no_grad(), hooks, bar:
        for index in range(max_new_tokens):
            columns = torch.arange(tokens.shape[1] - new.shape[1], tokens.shape[1], device=tokens.device)
            ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, columns]
            with _at(Step(index, columns, prompt_length, ids)):
                logits = model(new, attention_mask=mask, past_key_values=cache)
            chosen = choose(tokens, logits[:, -1].float())
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            new = chosen[:, None]
            if streamer is not None:
                streamer.put(chosen.cpu())
            bar.update(1)
            done |= torch.isin(chosen, ends) if ends.numel() else torch.zeros_like(done)
            if stops:
                done |= _stopped(model, tokens[:, prompt_length:], stops, done)
            if bool(done.all()):
                break
    if streamer is not None:
        streamer.end()
    if return_type == "tokens":
        return tokens
    texts = [_continuation(model, row, ends, stops) for row in tokens[:, prompt_length:]]
    return texts[0] if isinstance(input, str) else texts


def _prompt(model, input, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and a 0/1 mask [batch, pos] on the embedding's device, padded on the left."""
    if isinstance(input, (str, list, tuple)) and (isinstance(input, str) or isinstance(input[0], str)):
        if attention_mask is not None:
            raise ValueError("attention_mask was passed with text: texts are padded for you. Pass token ids.")
        tokens, mask = model.tokenize(input, padding_side="left")
    else:
        tokens = inputs.as_token_tensor(input)
        model.check_tokens(tokens)
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        inputs.check_attention_mask(mask, tuple(tokens.shape))
        if bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "The prompts are padded on the right: generation appends to the last column, so pad on the "
                "left (model.tokenize(texts, padding_side='left'))."
            )
    device = model.W_E.device
    return tokens.to(device), mask.to(device)


def _chooser(do_sample, temperature, top_k, top_p, seed, device) -> Callable:
    if not do_sample:
        if seed is not None or top_k is not None or top_p is not None or temperature != 1.0:
            raise ValueError("temperature, top_k, top_p and seed apply to sampling: pass do_sample=True.")
        return lambda tokens, logits: logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy decoding is do_sample=False), not {temperature}.")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())

    def sample(tokens, logits):
        probs = torch.softmax(warpers(tokens, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return sample


def _end_tokens(model, eos_token_id) -> torch.Tensor:
    if eos_token_id is None:
        config = getattr(model.hf_model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = model.tokenizer.eos_token_id
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    return torch.tensor(list(ids), dtype=torch.long, device=model.W_E.device)


def _stopped(model, generated: torch.Tensor, stops: list[str], done: torch.Tensor) -> torch.Tensor:
    texts = [model.to_string(row) if not d else "" for row, d in zip(generated, done.tolist())]
    return torch.tensor([any(s in t for s in stops) for t in texts], device=done.device)


def _continuation(model, row: torch.Tensor, ends: torch.Tensor, stops: list[str]) -> str:
    """The generated text up to and including the first end token or stop string (transformers keeps them)."""
    ids = row.tolist()
    for i, token in enumerate(ids):
        if token in ends.tolist():
            ids = ids[: i + 1]
            break
    text = model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for s in stops:
        if s in text:
            text = text[: text.index(s) + len(s)]
    return text


class WidgetStreamer:
    """Shows each row's continuation in the notebook as it is generated (one ipywidgets HTML per row).

    Pass it as `generate(..., streamer=WidgetStreamer(model))` and display it (`display(streamer)` or as a
    cell's last value) before or while generating. `texts` holds the continuations so far.
    """

    def __init__(self, model: Any) -> None:
        import ipywidgets as widgets

        self.model, self.widgets = model, widgets
        self.box = widgets.VBox([])
        self.ids: list[list[int]] = []

    @property
    def texts(self) -> list[str]:
        decode = self.model.tokenizer.decode
        return [decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) for ids in self.ids]

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2:  # the prompt: start one line per row
            self.ids = [[] for _ in range(value.shape[0])]
            self.box.children = [self.widgets.HTML() for _ in self.ids]
            return
        for ids, token in zip(self.ids, value.tolist()):
            ids.append(token)
        self._draw()

    def end(self) -> None:
        self._draw()

    def _draw(self) -> None:
        import html

        for label, text in zip(self.box.children, self.texts):
            label.value = f"<pre style='margin:0;white-space:pre-wrap'>{html.escape(text)}</pre>"

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)
