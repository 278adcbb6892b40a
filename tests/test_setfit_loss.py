"""Cosine pair losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ember_train.losses.cosine import CoSENTLoss, CosineMSELoss, build_pair_loss

# Three pairs whose cosines are easy to compute by hand:
#   pair 0: (1, 0) vs (1, 0)   -> cos = 1
#   pair 1: (1, 0) vs (0, 2)   -> cos = 0
#   pair 2: (3, 4) vs (4, 3)   -> cos = (12 + 12) / (5 * 5) = 0.96
A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
B = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 3.0]])
COS = [1.0, 0.0, 0.96]


def test_cosine_mse_against_hand_computation():
    target = torch.tensor([1.0, 1.0, 0.0])
    # ((1-1)^2 + (0-1)^2 + (0.96-0)^2) / 3
    expected = (0.0 + 1.0 + 0.96**2) / 3
    assert CosineMSELoss()(A, B, target).item() == pytest.approx(expected, abs=1e-6)


def test_cosine_mse_with_normalised_scores():
    # STS scores 5, 0, 4.8 on a 0-5 scale -> targets 1, 0, 0.96: a perfect fit.
    target = torch.tensor([5.0, 0.0, 4.8]) / 5.0
    assert CosineMSELoss()(A, B, target).item() == pytest.approx(0.0, abs=1e-6)


def test_cosent_against_hand_computation():
    scale = 20.0
    target = torch.tensor([0.2, 1.0, 0.5])
    # Ordered (i more similar than j): (1, 0), (1, 2), (2, 0). Terms exp(scale * (cos_j - cos_i)).
    terms = [
        math.exp(scale * (COS[0] - COS[1])),
        math.exp(scale * (COS[2] - COS[1])),
        math.exp(scale * (COS[0] - COS[2])),
    ]
    expected = math.log(1.0 + sum(terms))
    assert CoSENTLoss(scale)(A, B, target).item() == pytest.approx(expected, rel=1e-5)


def test_cosent_is_zero_when_all_targets_tie_and_small_when_order_is_right():
    tie = torch.tensor([1.0, 1.0, 1.0])
    assert CoSENTLoss()(A, B, tie).item() == pytest.approx(0.0, abs=1e-7)
    right = torch.tensor([1.0, 0.0, 0.9])  # same order as the cosines
    wrong = torch.tensor([0.0, 1.0, 0.5])
    # right: log(1 + e^{-0.8} + e^{-19.2} + e^{-20}) ~ 0.37; wrong: dominated by e^{20} -> ~20
    assert CoSENTLoss()(A, B, right).item() < 0.4 < 19 < CoSENTLoss()(A, B, wrong).item()


def test_losses_backpropagate_in_fp32_from_half_inputs():
    a = A.clone().bfloat16().requires_grad_(True)
    loss = build_pair_loss("cosine_mse")(a, B.bfloat16(), torch.tensor([1.0, 1.0, 0.0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad.float()).all()
    with pytest.raises(ValueError, match="unknown pair loss"):
        build_pair_loss("triplet")
