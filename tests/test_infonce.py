import math

import pytest
import torch
import torch.nn.functional as F

from ember_train.losses.infonce import InfoNCELoss


def _by_hand(q, docs, temperature):
    """-log softmax of each query's own positive (row i -> doc i), averaged; plain Python loops."""
    total = 0.0
    for i, qi in enumerate(q):
        sims = [float(F.cosine_similarity(qi, d, dim=0)) / temperature for d in docs]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return total / len(q)


def test_matches_hand_computation():
    torch.manual_seed(0)
    q, p = torch.randn(3, 4), torch.randn(3, 4)
    loss = InfoNCELoss(temperature=0.1)(q, p)
    assert loss.item() == pytest.approx(_by_hand(q, p, 0.1), rel=1e-5)


def test_hard_negatives_are_candidates():
    torch.manual_seed(1)
    q, p, n = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 2, 4)
    loss = InfoNCELoss(temperature=0.05)(q, p, n)
    docs = torch.cat([p, n.flatten(0, 1)])
    assert loss.item() == pytest.approx(_by_hand(q, docs, 0.05), rel=1e-5)
    assert loss.item() > InfoNCELoss(temperature=0.05)(q, p).item()  # more candidates, higher loss


def test_temperature_scales_logits():
    torch.manual_seed(2)
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    sharp, soft = InfoNCELoss(0.01)(q, p).item(), InfoNCELoss(1.0)(q, p).item()
    assert soft == pytest.approx(_by_hand(q, p, 1.0), rel=1e-5)
    assert sharp == pytest.approx(_by_hand(q, p, 0.01), rel=1e-4)
    assert sharp != pytest.approx(soft)


def test_symmetric_adds_document_to_query_term():
    torch.manual_seed(3)
    q, p = torch.randn(3, 4), torch.randn(3, 4)
    expected = (_by_hand(q, p, 0.1) + _by_hand(p, q, 0.1)) / 2
    assert InfoNCELoss(0.1, symmetric=True)(q, p).item() == pytest.approx(expected, rel=1e-5)


def test_computes_in_fp32_under_bf16_inputs():
    torch.manual_seed(4)
    q, p = torch.randn(3, 4), torch.randn(3, 4)
    loss = InfoNCELoss(0.02)(q.bfloat16(), p.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_by_hand(q.bfloat16().float(), p.bfloat16().float(), 0.02), rel=1e-5)


def test_scale_like_temperature_warns():
    with pytest.warns(UserWarning, match="looks like a scale"):
        InfoNCELoss(temperature=20.0)
    with pytest.raises(ValueError):
        InfoNCELoss(temperature=0.0)
