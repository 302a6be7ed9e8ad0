"""The pure math, on hand-made arrays."""

import math

import torch

from siglip_cli.heads import ensemble, kept, normalize, rank, sigmoid_scores


def test_sigmoid_scores_is_the_models_formula_not_softmax():
    img = normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    txt = normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    got = sigmoid_scores(img, txt, logit_scale=10.0, logit_bias=-5.0)
    cos = [[1, 0, -1], [0.6, 0.8, -0.6]]
    want = [[1 / (1 + math.exp(-(10 * c - 5))) for c in row] for row in cos]
    torch.testing.assert_close(got, torch.tensor(want))
    assert not torch.allclose(got.sum(dim=1), torch.ones(2))  # independent per pair


def test_ensemble_averages_then_renormalizes():
    per = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two templates, one text
    torch.testing.assert_close(ensemble(per), torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)]]))


def test_rank_and_kept():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.01, 0.02, 0.6]])
    values, idx = rank(scores, None)
    assert idx.tolist() == [[1, 2, 3, 0], [3, 0, 2, 1]]
    thresholds = torch.tensor([0.0, 0.95, 0.25, 0.25])  # text 1 needs 0.95
    assert kept(values, idx, thresholds).tolist() == [[False, True, True, True], [True, True, False, False]]
    values, idx = rank(scores, 2)
    assert idx.tolist() == [[1, 2], [3, 0]] and values.shape == (2, 2)
    np_mask = kept(values.numpy(), idx.numpy(), thresholds.numpy())  # the same on host arrays
    assert np_mask.tolist() == [[False, True], [True, True]]
    assert rank(scores, 10)[0].shape == (2, 4)
