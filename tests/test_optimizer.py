"""The optimizer's groups and the schedule: the default equals transformers' linear schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from ember_train.config.schema import TrainConfig
from ember_train.training.optimizer import ParamGroup, build_optimizer, build_schedule


def _lrs(schedule, optimizer, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        seen.append([g["lr"] for g in optimizer.param_groups])
    return seen


def test_without_groups_the_schedule_is_transformers_linear_warmup():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    cfg = TrainConfig(learning_rate=1e-3)
    ours = build_optimizer(model, cfg)
    assert [len(g["params"]) for g in ours.param_groups] == [1, 3]  # weight | bias + norm
    assert [g["weight_decay"] for g in ours.param_groups] == [cfg.weight_decay, 0.0]
    reference = torch.optim.SGD(model.parameters(), lr=1e-3)
    expected = _lrs(get_linear_schedule_with_warmup(reference, 3, 17), reference, 17)
    got = _lrs(build_schedule(ours, 3, 17, [0, 0]), ours, 17)
    assert [row[0] for row in got] == pytest.approx([row[0] for row in expected], abs=0)


def test_a_group_learns_at_its_own_rate_after_its_frozen_steps():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    group = ParamGroup("body", model[0].parameters(), lr_scale=0.1, frozen_steps=4)
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1.0, weight_decay=0.5), [group])
    names = [g["group_name"] for g in optimizer.param_groups]
    assert names == ["", "", "body", "body"]
    schedule = build_schedule(optimizer, 2, 10, [g["frozen_steps"] for g in optimizer.param_groups])
    before = [p.detach().clone() for p in model[0].parameters()]
    for step in range(1, 11):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        schedule.step()
        if step == 4:  # weight decay is scaled by the learning rate: nothing moved at all
            assert all(torch.equal(a, b) for a, b in zip(before, model[0].parameters(), strict=True))
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates == pytest.approx([0.0, 0.0, 0.0, 0.0])  # both schedules end at 0 together
    # Steps 0..10: frozen through step 4, a 2-step warm-up, then down to 0 at step 10 with the rest.
    body = build_schedule(optimizer, 2, 10, [0, 0, 4, 4]).lr_lambdas[2]
    assert [body(s) for s in range(11)] == pytest.approx([0, 0, 0, 0, 0, 0.5, 1, 0.75, 0.5, 0.25, 0])
    with pytest.raises(RuntimeError, match="regrouped"):
        build_schedule(optimizer, 2, 10, [0, 0])
