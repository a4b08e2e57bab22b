"""The engine's batching helper and its rule for each row's last real token (workbench.inputs)."""

import pytest
import torch

from workbench.inputs import batches, last_token_index, pad


def test_batches_cover_the_items_in_order_with_a_shorter_last_batch():
    items = [f"text {i}" for i in range(7)]
    assert batches(items, 3) == [items[0:3], items[3:6], items[6:7]]
    assert batches(range(5), 2) == [range(0, 2), range(2, 4), range(4, 5)]
    tokens = torch.arange(14).view(7, 2)
    parts = batches(tokens, 4)
    assert [tuple(p.shape) for p in parts] == [(4, 2), (3, 2)]
    assert torch.equal(torch.cat(parts), tokens)
    assert batches([], 4) == []


@pytest.mark.parametrize("size", [0, -1, 2.5, True, None])
def test_batches_refuse_a_size_that_is_not_a_positive_integer(size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        batches([1, 2, 3], size)


@pytest.mark.parametrize("left", [False, True])
def test_last_token_index_is_the_last_real_position_on_either_side(left):
    rows = [[5, 6, 7], [5], [5, 6, 7, 8, 9], [5, 6]]
    tokens, mask = pad(rows, pad_id=0, left=left)
    width = tokens.shape[1]
    # Reference: where each row's final id sits after padding, read off the unpadded lengths.
    expected = [width - 1 if left else len(r) - 1 for r in rows]
    assert last_token_index(mask).tolist() == expected
    assert last_token_index(mask.bool()).tolist() == expected
    assert tokens[torch.arange(len(rows)), last_token_index(mask)].tolist() == [r[-1] for r in rows]
