"""Generation: greedy equals transformers' generate token for token, a cached step's hooks see what the
uncached forward on the whole sequence computes, and the step accessor, sampling, stops and streamers."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.generation import WidgetStreamer, current_step, generate
from workbench.names import act_name

IOI = "When Mary and John went to the store, John gave a drink to"
PROMPTS = [IOI, "The cat", "Anna and Omar walked to the park, and Omar gave a book"]


@pytest.fixture(scope="module")
def tiny():
    return workbench.load()


@pytest.fixture(scope="module")
def random_model(random_checkpoint):
    return workbench.load(random_checkpoint)


def hf_greedy(model, tokens, mask, n):
    return model.hf_model.generate(
        input_ids=tokens,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=model.pad_token_id,
    )


@pytest.mark.parametrize("which", ["tiny", "random_model"])
def test_greedy_generation_equals_transformers_generate(which, request):
    model = request.getfixturevalue(which)
    texts = PROMPTS if which == "tiny" else ["a b c", "d e f g h", "b"]
    for text in texts:  # one prompt at a time
        tokens, mask = model.tokenize(text)
        ours = model.generate(tokens, 16, return_type="tokens", progress=False)
        assert torch.equal(ours, hf_greedy(model, tokens, mask, 16))
    tokens, mask = model.tokenize(texts, padding_side="left")  # a padded batch
    assert bool((mask == 0).any())
    ours = model.generate(tokens, 16, attention_mask=mask, return_type="tokens", progress=False)
    assert torch.equal(ours, hf_greedy(model, tokens, mask, 16))
    # Texts are padded on the left for you.
    assert torch.equal(model.generate(texts, 16, return_type="tokens", progress=False), ours)


def test_the_tiny_model_completes_the_indirect_object_and_stops_at_its_end_token(tiny):
    assert tiny.generate(IOI, 10, progress=False) == " Mary."
    tokens = tiny.generate(IOI, 10, return_type="tokens", progress=False)
    assert tokens[0, -1].item() == tiny.hf_model.generation_config.eos_token_id
    assert tokens.shape[1] < tiny.to_tokens(IOI).shape[1] + 10  # stopped early


HOOKS = [
    "hook_embed",
    act_name("resid_pre", 1),
    act_name("z", 2),
    act_name("pattern", 1),
    act_name("post", 0),
    act_name("scale", 2, "ln2"),
    act_name("scale"),
]


@pytest.mark.parametrize("which", ["tiny", "random_model"])
def test_a_cached_step_hooks_see_what_the_uncached_forward_on_the_whole_sequence_computes(which, request):
    model = request.getfixturevalue(which)
    texts = PROMPTS if which == "tiny" else ["a b c", "d e f g h", "b"]
    seen = {name: [] for name in HOOKS}
    columns = []

    def record(act, hook):
        seen[hook.name].append(act.clone())
        if hook.name == "hook_embed":
            columns.append(current_step().positions.clone())

    tokens, mask = model.tokenize(texts, padding_side="left")
    out = model.generate(
        tokens,
        12,
        attention_mask=mask,
        fwd_hooks=[(n, record) for n in HOOKS],
        return_type="tokens",
        progress=False,
        eos_token_id=[],
    )
    assert out.shape[1] == tokens.shape[1] + 12 and len(columns) == 12
    full_mask = torch.cat([mask, torch.ones(len(texts), 12, dtype=mask.dtype)], dim=1)
    _, full = model.run_with_cache(out[:, :-1], attention_mask=full_mask[:, :-1], names_filter=HOOKS)
    real = full_mask[:, :-1].bool()
    for name in HOOKS:
        for step, cols in enumerate(columns):
            got, want = seen[name][step], full[name]
            if name.endswith("hook_pattern"):
                want = want[:, :, cols, : int(cols[-1]) + 1]
                rows = real[:, cols]
                torch.testing.assert_close(
                    got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=1e-5, rtol=1e-4
                )
            else:
                rows = real[:, cols]
                torch.testing.assert_close(got[rows], want[:, cols][rows], atol=1e-5, rtol=1e-4)


def test_hooks_see_the_new_positions_only_with_their_columns(tiny):
    steps = []

    def note(act, hook):
        step = current_step()
        steps.append((step.index, act.shape[1], step.positions.tolist(), step.generated.tolist()))

    n = tiny.to_tokens(IOI).shape[1]
    with tiny.hooks([(act_name("resid_pre", 0), note)]):  # hooks attached around generate fire too
        tiny.generate(IOI, 3, progress=False, eos_token_id=[])
    assert steps[0] == (0, n, list(range(n)), [False] * n)
    assert steps[1:] == [(1, 1, [n], [True]), (2, 1, [n + 1], [True])]
    assert current_step() is None


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(tiny):
    a = tiny.generate(PROMPTS, 12, do_sample=True, seed=3, temperature=1.5, progress=False, eos_token_id=[])
    b = tiny.generate(PROMPTS, 12, do_sample=True, seed=3, temperature=1.5, progress=False, eos_token_id=[])
    c = tiny.generate(PROMPTS, 12, do_sample=True, seed=4, temperature=1.5, progress=False, eos_token_id=[])
    assert a == b and a != c
    greedy = tiny.generate(PROMPTS, 12, progress=False, eos_token_id=[])
    assert (
        tiny.generate(PROMPTS, 12, do_sample=True, top_k=1, seed=0, progress=False, eos_token_id=[]) == greedy
    )


def test_stop_strings_end_a_row_and_finished_rows_are_padded(tiny):
    text = tiny.generate("The cat", 30, stop=" box", progress=False, eos_token_id=[])
    free = tiny.generate("The cat", 30, progress=False, eos_token_id=[])
    assert " box" in free and text == free[: free.index(" box") + 4]
    tokens = tiny.generate([IOI, "The cat"], 10, return_type="tokens", progress=False)
    eos = tiny.hf_model.generation_config.eos_token_id
    row = tokens[0].tolist()
    assert row[row.index(eos) + 1 :] == [tiny.pad_token_id] * (len(row) - row.index(eos) - 1)


def test_streamers_receive_every_token(tiny):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.clone())

        def end(self):
            self.calls.append("end")

    recorder, widget = Recorder(), WidgetStreamer(tiny)
    tokens = tiny.generate(
        PROMPTS[:2], 6, return_type="tokens", streamer=recorder, progress=False, eos_token_id=[]
    )
    texts = generate(tiny, PROMPTS[:2], 6, streamer=widget, progress=False, eos_token_id=[])
    assert recorder.calls[-1] == "end" and len(recorder.calls) == 8
    assert torch.equal(torch.stack(recorder.calls[1:-1], 1), tokens[:, -6:])
    assert widget.texts == texts and texts[1] in widget.box.children[1].value


def test_bad_generation_arguments_are_refused_with_the_fix(tiny):
    tokens, mask = tiny.tokenize(PROMPTS[:2], padding_side="right")
    with pytest.raises(ValueError, match="pad on the"):
        tiny.generate(tokens, 3, attention_mask=mask)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny.generate(IOI, 3, temperature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate(IOI, 0)
    with pytest.raises(ValueError, match="return_type"):
        tiny.generate(IOI, 3, return_type="logits")
