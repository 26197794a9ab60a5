"""Pooling against values computed by hand (angle_emb 0.6.1 semantics)."""

import pytest
import torch

from angle_torch.pooling import STRATEGIES, check_strategy, pool

# batch of 2, length 3, dim 2; row 1 has one pad (its state is junk that must not leak)
H = torch.tensor([[[1.0, -2.0], [3.0, -4.0], [5.0, -6.0]],
                  [[2.0, -1.0], [-4.0, -3.0], [99.0, 99.0]]])
M = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(("strategy", "expected"), [
    ("cls", [[1.0, -2.0], [2.0, -1.0]]),
    ("mean", [[3.0, -4.0], [-1.0, -2.0]]),
    ("avg", [[3.0, -4.0], [-1.0, -2.0]]),
    ("cls_avg", [[2.0, -3.0], [0.5, -1.5]]),
    ("max", [[5.0, -2.0], [2.0, -1.0]]),
    ("cls_max", [[3.0, -2.0], [2.0, -1.0]]),
    ("last", [[5.0, -6.0], [-4.0, -3.0]]),
    (1, [[3.0, -4.0], [-4.0, -3.0]]),
    ("1", [[3.0, -4.0], [-4.0, -3.0]]),
    (-1, [[5.0, -6.0], [-4.0, -3.0]]),  # each row's last real token, not the pad column
    (-2, [[3.0, -4.0], [2.0, -1.0]]),
])
def test_right_padding(strategy, expected):
    assert torch.equal(pool(H, M, strategy, "right"), torch.tensor(expected))


def test_max_ignores_pads_even_when_all_values_are_negative():
    h = torch.tensor([[[-3.0], [-1.0], [0.0]]])
    m = torch.tensor([[1, 1, 0]])
    # angle_emb multiplies by the mask first and would return 0 here (the pad)
    assert pool(h, m, "max").item() == -1.0


def test_last_with_left_padding_takes_the_final_column():
    h = torch.tensor([[[9.0], [1.0], [2.0]], [[7.0], [8.0], [3.0]]])
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(h, m, "last", "left").flatten().tolist() == [2.0, 3.0]


def test_strategy_names_are_checked():
    assert set(STRATEGIES) == {"cls", "cls_avg", "cls_max", "mean", "avg", "max", "last"}
    assert check_strategy("-1") == -1
    for bad in ("first_last_avg", "all", True, ""):
        with pytest.raises(ValueError):
            check_strategy(bad)


@pytest.mark.parametrize(("strategy", "expected"), [
    ("cls", [[9.0], [7.0]]),  # the first real token, not the pad column 0
    (0, [[9.0], [7.0]]),
    (1, [[2.0], [8.0]]),
    (-1, [[2.0], [3.0]]),
    ("cls_avg", [[7.25], [6.5]]),
    ("cls_max", [[9.0], [7.5]]),
])
def test_token_indices_count_real_tokens_under_left_padding(strategy, expected):
    h = torch.tensor([[[0.0], [9.0], [2.0]], [[7.0], [8.0], [3.0]]])
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(h, m, strategy, "left").tolist() == expected
