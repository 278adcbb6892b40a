"""Run under ``accelerate launch`` with 2 processes: the contrastive CLI run, where rank 1's loss is NaN once.

Usage: rank_nan.py CONFIG. Rank 1's second loss step returns NaN; rank 0's stays finite. Both
processes must skip that optimizer step for the same reason (a non-finite *loss*, agreed across
processes), then train on.
"""

import os
import sys

from ember_train import cli
from ember_train.pipelines import contrastive

rank = int(os.environ["RANK"])
real = contrastive.make_loss_step
calls = [0]


def nan_once_make_loss_step(*args, **kwargs):
    step = real(*args, **kwargs)

    def loss_step(model, batch):
        calls[0] += 1
        loss, metrics = step(model, batch)
        return (loss * float("nan") if rank == 1 and calls[0] == 2 else loss), metrics

    return loss_step


contrastive.make_loss_step = nan_once_make_loss_step
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
