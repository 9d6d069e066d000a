import math

import torch

from saebench.stats import ratio_and_se, sum_by_row


def test_ratio_and_se_plain_mean_matches_hand_computation():
    # three contexts with one token each: the cluster SE reduces to the ordinary SE of the mean
    a = torch.tensor([1.0, 2.0, 6.0])
    b = torch.ones(3)
    r, se = ratio_and_se(a, b)
    assert r == 3.0
    sample_sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert math.isclose(se, sample_sd / math.sqrt(3), rel_tol=1e-12)


def test_ratio_and_se_undefined_cases_are_none():
    assert ratio_and_se(torch.tensor([1.0]), torch.tensor([0.0])) == (None, None)
    assert ratio_and_se(torch.tensor([2.0]), torch.tensor([4.0])) == (0.5, None)


def test_ratio_of_sums_weights_contexts_by_size():
    r, _ = ratio_and_se(torch.tensor([10.0, 1.0]), torch.tensor([10.0, 1.0]))
    assert r == 1.0
    r, _ = ratio_and_se(torch.tensor([10.0, 0.0]), torch.tensor([10.0, 10.0]))
    assert r == 0.5


def test_sum_by_row_respects_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert sum_by_row(values, mask).tolist() == [4.0, 6.0]
