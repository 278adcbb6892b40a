"""Run under ``accelerate launch`` with 2 processes: the contrastive CLI run, with a fault on rank 1.

Usage: rank_fails.py raise|nan CONFIG PID_DIR. Each process writes its pid to PID_DIR/rank_N.pid
first, so a test can check that no process outlives the launcher. In its second loss step rank 1
either raises (while rank 0 is inside, or about to enter, a collective and would wait forever
alone) or returns a NaN loss (which both processes must skip, for the same reason).
"""

import os
import sys
from pathlib import Path

from ember_train import cli
from ember_train.pipelines import contrastive

fault, config, pid_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank = int(os.environ["RANK"])
(pid_dir / f"rank_{rank}.pid").write_text(str(os.getpid()))

real = contrastive.make_loss_step
calls = [0]


def faulty_make_loss_step(*args, **kwargs):
    step = real(*args, **kwargs)

    def loss_step(model, batch):
        calls[0] += 1
        faulty = rank == 1 and calls[0] == 2
        if faulty and fault == "raise":
            raise RuntimeError("injected failure on rank 1")
        loss, metrics = step(model, batch)
        return (loss * float("nan") if faulty else loss), metrics

    return loss_step


contrastive.make_loss_step = faulty_make_loss_step
sys.exit(cli.main(["train", "--config", config]))
