import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from angle_rt.batching import pad_batch, plan_batches, round_up

lengths_st = st.lists(st.integers(1, 300), min_size=0, max_size=200)


@given(lengths_st, st.integers(1, 64), st.integers(1, 8192), st.sampled_from([1, 8]))
@settings(max_examples=300, deadline=None)
def test_plan_is_a_permutation_within_caps(lengths, max_batch, max_tokens, multiple):
    batches = plan_batches(lengths, max_batch, max_tokens, multiple)
    flat = np.concatenate(batches) if batches else np.array([], dtype=int)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= max_batch
        width = round_up(max(lengths[i] for i in b), multiple)
        assert len(b) == 1 or len(b) * width <= max_tokens
    # longest first: a batch's items are never longer than the previous batch's shortest
    for prev, cur in itertools.pairwise(batches):
        assert max(lengths[i] for i in cur) <= min(lengths[i] for i in prev)


@pytest.mark.parametrize(("max_batch", "max_tokens"), [(0, 10), (4, 0)])
def test_plan_rejects_bad_caps(max_batch, max_tokens):
    with pytest.raises(ValueError, match="≥ 1"):
        plan_batches([3], max_batch, max_tokens)


@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=20), min_size=1,
                max_size=10), st.sampled_from(["left", "right"]), st.sampled_from([1, 8]))
def test_pad_batch_keeps_rows(rows, side, multiple):
    ids, mask = pad_batch(rows, pad_id=0, padding_side=side, pad_multiple=multiple)
    assert ids.shape == mask.shape and ids.shape[1] % multiple == 0
    for i, row in enumerate(rows):
        assert ids[i][mask[i] == 1].tolist() == row
        assert mask[i].sum() == len(row)
        real = np.flatnonzero(mask[i])
        assert (real[0] == 0) if side == "right" else (real[-1] == ids.shape[1] - 1)


def _cost(batches, lengths, batch_cost):
    return sum(len(b) * max(lengths[i] for i in b) + batch_cost for b in batches)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=80),
       max_batch=st.integers(1, 40), batch_cost=st.integers(1, 128))
def test_split_plan_is_a_permutation_and_never_costs_more(lengths, max_batch, batch_cost):
    """With a per-run cost the planner splits mixed-length batches: still a permutation
    within the caps, longest first, and never more padded tokens + runs than without."""
    plain = plan_batches(lengths, max_batch, 4096)
    split = plan_batches(lengths, max_batch, 4096, batch_cost=batch_cost)
    flat = np.concatenate(split)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= max_batch for b in split)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert _cost(split, lengths, batch_cost) <= _cost(plain, lengths, batch_cost)


def test_split_plan_separates_outliers_and_keeps_uniform_batches():
    mixed = [12, 60, 9, 14, 11, 10, 13, 8]  # one long row among short ones
    assert [len(b) for b in plan_batches(mixed, 32, 16384, batch_cost=32)] == [1, 7]
    uniform = [15] * 20 + [14] * 12  # sorted input of near-equal lengths: one batch
    assert [len(b) for b in plan_batches(uniform, 32, 16384, batch_cost=32)] == [32]


@settings(max_examples=300, deadline=None)
@given(widths=st.lists(st.integers(1, 64), min_size=1, max_size=9).map(
           lambda w: sorted(w, reverse=True)),
       batch_cost=st.integers(1, 64))
def test_cheapest_split_is_the_cheapest(widths, batch_cost):
    """Against every way to cut a longest-first batch (2^(m-1) of them)."""
    from angle_rt.batching import _cheapest_split

    def cost(spans):
        return sum((b - a) * widths[a] + batch_cost for a, b in spans)

    m = len(widths)
    spans = _cheapest_split(widths, batch_cost)
    assert spans[0][0] == 0 and spans[-1][1] == m
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(spans))
    every = (list(itertools.pairwise((0, *cuts, m)))
             for k in range(m) for cuts in itertools.combinations(range(1, m), k))
    assert cost(spans) == min(cost(s) for s in every)
