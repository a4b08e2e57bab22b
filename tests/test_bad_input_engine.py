"""Bad input to the hooked model, one row per case: the call, the exception type, a phrase of its message.

A regression in any message shows here. The rows cover what issue 11 listed for the engine (hooks that
return the wrong tensor, masks, return types, token tensors of the wrong kind, empty name filters) and the
clear errors the engine already gave.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

IOI = "When Mary and John went to the store, John gave a drink to"


def tokens(m):
    return m.to_tokens(IOI)


def hooked(name, fn):
    return lambda m: m.run_with_hooks(tokens(m), fwd_hooks=[(name, fn)])


def transposed_z(z, hook):
    return z.transpose(2, 3).contiguous().reshape(z.shape[0], z.shape[1], z.shape[3], z.shape[2])


ROWS = [
    # hooks that return something other than the activation's layout
    (
        "hook-transposed-z",
        hooked("blocks.0.attn.hook_z", lambda z, hook: z.transpose(1, 2)),
        ValueError,
        "expected shape",
    ),
    ("hook-int64", hooked("blocks.1.hook_resid_post", lambda x, hook: x.long()), ValueError, "torch.int64"),
    (
        "hook-float64",
        hooked("blocks.1.mlp.hook_post", lambda x, hook: x.double()),
        ValueError,
        "expected shape",
    ),
    (
        "hook-wrong-length",
        hooked("blocks.0.hook_resid_pre", lambda x, hook: x[:, :-1]),
        ValueError,
        "returned a tensor of shape",
    ),
    (
        "hook-returns-list",
        hooked("blocks.0.hook_resid_pre", lambda x, hook: x.tolist()),
        TypeError,
        "returned a list",
    ),
    ("hook-returns-number", hooked("hook_embed", lambda x, hook: 0.0), TypeError, "returns None"),
    ("hook-raises", hooked("hook_embed", lambda x, hook: 1 / 0), ZeroDivisionError, "division by zero"),
    (
        "hook-unknown-name",
        hooked("blocks.0.hook_resid_pr", lambda x, hook: None),
        KeyError,
        "Closest valid names",
    ),
    (
        "hook-layer-out-of-range",
        hooked("blocks.9.hook_resid_pre", lambda x, hook: None),
        KeyError,
        "out of range",
    ),
    (
        "hook-result-off",
        hooked("blocks.0.attn.hook_result", lambda x, hook: None),
        ValueError,
        "set_use_attn_result",
    ),
    # attention masks
    (
        "mask-wrong-shape-all-ones",
        lambda m: m(tokens(m), attention_mask=torch.ones(1, 3)),
        ValueError,
        "has shape (1, 3)",
    ),
    (
        "mask-all-zero-row",
        lambda m: m(tokens(m), attention_mask=torch.zeros_like(tokens(m))),
        ValueError,
        "all zero",
    ),
    (
        "mask-values-not-0-1",
        lambda m: m(tokens(m), attention_mask=torch.full_like(tokens(m), 2)),
        ValueError,
        "other than 0 and 1",
    ),
    (
        "mask-fractional",
        lambda m: m(tokens(m), attention_mask=torch.full(tokens(m).shape, 0.5)),
        ValueError,
        "not a weighting",
    ),
    ("mask-with-text", lambda m: m(IOI, attention_mask=torch.ones(1, 15)), ValueError, "passed with text"),
    ("mask-not-tensor", lambda m: m(tokens(m), attention_mask=[[1] * 15]), TypeError, "torch tensor of 0/1"),
    # return types and token tensors
    ("return-type-unknown", lambda m: m(IOI, return_type="probs"), ValueError, "return_type must be one of"),
    ("tokens-bool", lambda m: m(torch.ones(1, 4, dtype=torch.bool)), TypeError, "integer tensor"),
    ("tokens-uint8", lambda m: m(torch.ones(1, 4, dtype=torch.uint8)), TypeError, "integer tensor"),
    ("tokens-float", lambda m: m(torch.ones(1, 4)), TypeError, "integer tensor"),
    ("tokens-none", lambda m: m(None), TypeError, "No input"),
    ("tokens-numpy", lambda m: m(np.array([[1, 2, 3]])), TypeError, "torch.as_tensor"),
    ("tokens-3d", lambda m: m(torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "[batch, pos]"),
    ("tokens-out-of-vocab", lambda m: m(torch.tensor([[1, 99999]])), ValueError, "outside the vocabulary"),
    ("tokens-negative", lambda m: m(torch.tensor([[1, -3]])), ValueError, "outside the vocabulary"),
    ("tokens-empty", lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, "Empty prompt"),
    ("tokens-too-long", lambda m: m(torch.ones(1, 5000, dtype=torch.long)), ValueError, "context"),
    ("text-empty", lambda m: m(""), ValueError, "is empty"),
    ("text-list-empty", lambda m: m([]), ValueError, "No prompt given"),
    ("text-list-of-ints", lambda m: m(["a", 3]), TypeError, "not a str"),
    (
        "padding-side-unknown",
        lambda m: m.to_tokens(["a b", "a"], padding_side="middle"),
        ValueError,
        "padding_side",
    ),
    # mid-network starts
    (
        "start-layer-out-of-range",
        lambda m: m(torch.zeros(1, 2, 128), start_at_layer=7),
        IndexError,
        "start_at_layer 7",
    ),
    ("start-with-tokens", lambda m: m(tokens(m), start_at_layer=1), ValueError, "residual stream"),
    ("stop-layer-out-of-range", lambda m: m(IOI, stop_at_layer=9), IndexError, "stop_at_layer"),
    (
        "start-loss-without-tokens",
        lambda m: m(torch.zeros(1, 2, 128), start_at_layer=1, return_type="loss"),
        ValueError,
        "tokens=",
    ),
    # answers and names
    (
        "answer-unknown-word",
        lambda m: m.to_single_token(" Zebra"),
        ValueError,
        "not in the tokenizer's vocabulary",
    ),
    ("answer-two-tokens", lambda m: m.to_single_token(" Mary John"), ValueError, "not a single token"),
    ("check-layer-bool", lambda m: m.check_layer(True), IndexError, "out of range"),
    ("check-head", lambda m: m.check_head(4), IndexError, "0..3"),
    (
        "remove-batch-dim-batch",
        lambda m: m.run_with_cache(["a", "b"], remove_batch_dim=True),
        ValueError,
        "single prompt",
    ),
    (
        "str-tokens-batch",
        lambda m: m.to_str_tokens(torch.ones(2, 3, dtype=torch.long)),
        ValueError,
        "one prompt",
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_gets_a_clear_error(model, case):
    _, call, exception, phrase = case
    with pytest.raises(exception) as info:
        call(model)
    assert phrase in str(info.value)
    assert all(not point.fwd_hooks for point in model.hook_dict.values())  # nothing left attached


def test_a_hook_introducing_nan_is_caught_when_asked(model):
    def nan(x, hook):
        x[0, 0, 0] = float("nan")
        return x.clone()

    model.run_with_hooks(tokens(model), fwd_hooks=[("blocks.0.hook_resid_mid", nan)])  # off by default
    model.set_check_finite(True)
    try:
        with pytest.raises(FloatingPointError, match="blocks.0.hook_resid_mid"):
            model.run_with_hooks(tokens(model), fwd_hooks=[("blocks.0.hook_resid_mid", nan)])
    finally:
        model.set_check_finite(False)


def test_a_names_filter_that_matches_nothing_warns(model):
    with pytest.warns(UserWarning, match="matches no hook point"):
        _, cache = model.run_with_cache(IOI, names_filter=lambda name: name.endswith("hook_nothing"))
    assert len(cache) == 0
