"""Run under ``accelerate launch`` with 2 processes: the contrastive CLI run, where rank 1 raises.

Usage: rank_fails.py CONFIG PID_DIR. Each process writes its pid to PID_DIR/rank_N.pid first,
so the test can check that no process outlives the launcher. Rank 1 raises in its second loss
step, while rank 0 is inside (or about to enter) a collective and would wait forever alone.
"""

import os
import sys
from pathlib import Path

from ember_train import cli
from ember_train.pipelines import contrastive

config, pid_dir = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
(pid_dir / f"rank_{rank}.pid").write_text(str(os.getpid()))

real = contrastive.make_loss_step
calls = [0]


def failing_make_loss_step(*args, **kwargs):
    step = real(*args, **kwargs)

    def loss_step(model, batch):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise RuntimeError("injected failure on rank 1")
        return step(model, batch)

    return loss_step


contrastive.make_loss_step = failing_make_loss_step
sys.exit(cli.main(["train", "--config", config]))
