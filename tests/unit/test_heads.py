"""The pure math of scores (siglip_cli/heads.py), on hand-made arrays."""

import math

import numpy as np
import pytest
import torch

from siglip_cli.heads import ensemble, normalize, probability, select, sigmoid_scores


def test_sigmoid_scores_is_the_models_formula_not_softmax():
    img = normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    txt = normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    got = sigmoid_scores(img, txt, logit_scale=10.0, logit_bias=-5.0)
    cos = [[1, 0, -1], [0.6, 0.8, -0.6]]
    want = [[1 / (1 + math.exp(-(10 * c - 5))) for c in row] for row in cos]
    torch.testing.assert_close(got, torch.tensor(want))
    assert not torch.allclose(got.sum(dim=1), torch.ones(2))  # independent per pair


def test_numpy_and_torch_give_the_same_probability():
    """search and serve score in numpy (no torch in a search process); tag in torch: one formula."""
    cos = np.array([[-1.0, -0.1, 0.0, 0.12, 1.0]], np.float32)
    np.testing.assert_allclose(
        probability(cos, 112.0, -16.5), probability(torch.from_numpy(cos), 112.0, -16.5).numpy(), rtol=1e-6
    )
    assert probability(np.float32(0.12), 112.0, -16.5) == pytest.approx(
        1 / (1 + math.exp(-(112 * 0.12 - 16.5))), rel=1e-5
    )


def test_ensemble_averages_then_renormalizes():
    per = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two templates, one text
    torch.testing.assert_close(ensemble(per), torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)]]))


def test_select_thresholds_topk_and_order():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.2, 0.01, 0.02, 0.6]], np.float32)
    thresholds = np.array([0.0, 0.95, 0.25, 0.25], np.float32)  # text 1 needs 0.95
    (i0, v0), (i1, v1) = select(scores, thresholds)
    assert i0.tolist() == [2, 3, 0] and i1.tolist() == [3, 0]
    np.testing.assert_allclose(v0, [0.5, 0.3, 0.1])
    (i0, _), (i1, _) = select(scores, thresholds, top_k=2)  # the top 2 first, then the thresholds
    assert i0.tolist() == [2] and i1.tolist() == [3, 0]
    assert [len(i) for i, _ in select(scores, np.ones(4, np.float32), top_k=10)] == [0, 0]
    (i0, _), _ = select(scores, np.zeros(4, np.float32), top_k=4)
    assert i0.tolist() == [1, 2, 3, 0]


def test_normalize_gives_unit_float32_rows_whatever_the_input_dtype():
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.bfloat16)
    got = normalize(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_a_cosine_at_the_bias_crossing_is_even_odds_and_scores_rise_with_the_cosine():
    """sigmoid(scale * cos + bias): 0.5 where scale * cos = -bias, and higher for every higher cosine."""
    scale, bias = 112.0, -16.5
    assert probability(np.float64(-bias / scale), scale, bias) == pytest.approx(0.5)
    cos = np.linspace(-1, 1, 201)
    scores = probability(cos, scale, bias)
    assert (np.diff(scores) >= 0).all() and scores[0] < 1e-6 and scores[-1] > 1 - 1e-6


def test_select_with_no_threshold_reached_keeps_nothing_and_ties_keep_their_order():
    scores = np.array([[0.4, 0.4, 0.4]], np.float32)
    ((i, v),) = select(scores, np.full(3, 0.5, np.float32))
    assert i.tolist() == [] and v.tolist() == []
    ((i, _),) = select(scores, np.zeros(3, np.float32))
    assert i.tolist() == [0, 1, 2]  # equal scores: in the vocabulary's order, run after run


def test_linked_rows_form_groups_through_their_members_and_singletons_are_dropped():
    from siglip_cli.heads import linked

    assert linked([(5, 2), (2, 9), (7, 8), (3, 3)]) == [[2, 5, 9], [7, 8]]
    assert linked([]) == []
