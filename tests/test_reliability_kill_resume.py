"""Kill -9 at random moments, resume with ``resume: auto``, end with the uninterrupted run's weights.

Real processes (``python train.py``), the tiny BERT in fp32 with dropout on, one process,
gradient accumulation 2 and several epochs (so resumes land mid-epoch and across epoch ends),
a checkpoint every step. Each run is killed with SIGKILL a random delay after a randomly chosen
checkpoint appears, so the kill lands anywhere: mid-step, mid-save, mid-rename. Tolerance: the
final weights within 1e-6 absolute (fp32 on the same machine and thread count; in practice they
are bitwise equal), every step's logged loss within 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from ember_train.training.checkpoint import list_checkpoints, resolve_resume

MAX_STEPS = 12


def _config(tmp_path: Path, model: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / name}\nseed: 3\n"
        f"model: {{name_or_path: {model}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 24}}\n"
        "loss: {temperature: 0.05}\n"
        f"train: {{batch_size: 4, gradient_accumulation_steps: 2, max_steps: {MAX_STEPS}, learning_rate: 1.0e-3,\n"
        "  checkpoint_every: 1, keep_checkpoints: 2, log_every: 1, resume: auto}\n"
        "eval: {before_training: false}\n"
    )
    return path


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same math in every run
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", str(cfg)], stdout=out, stderr=out, env=env
        )


def _newest_step(run: Path) -> int:
    checkpoints = list_checkpoints(run)
    return int(checkpoints[-1].name.split("_")[-1]) if checkpoints else 0


def _losses(run: Path) -> dict[int, float]:
    """The last logged loss of every step (a step redone after a kill is logged again)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path, tiny_bert_path):
    seed = int(os.environ.get("EMBER_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    first = rng.randint(1, 4)
    kills = [first, rng.randint(first + 2, MAX_STEPS - 4)]
    delays = [rng.uniform(0.0, 0.3) for _ in kills]  # a step takes about 0.2 s here
    where = f"(EMBER_KILL_SEED={seed}: kill after checkpoints {kills} + {[round(d, 2) for d in delays]} s)"

    reference = _start(_config(tmp_path, tiny_bert_path, "reference"), tmp_path / "reference.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    run, log = tmp_path / "killed", tmp_path / "killed.log"
    cfg = _config(tmp_path, tiny_bert_path, "killed")
    for target, delay in zip(kills, delays, strict=True):
        proc = _start(cfg, log)
        deadline = time.monotonic() + 600
        while _newest_step(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it was killed {where}"
        resumable = resolve_resume("auto", run)
        assert resumable is not None and _newest_step(run) >= target, where
        # Whatever the kill interrupted is not taken for a checkpoint.
        assert all((p / "checkpoint.json").is_file() for p in list_checkpoints(run)), where

    final = _start(cfg, log)
    assert final.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text(), where

    a = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key} {where}: {m}"
        )
    expected, got = _losses(tmp_path / "reference"), _losses(run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), where
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), f"step {step} {where}"
    # Training changed the model (so equal weights mean something).
    start = load_file(str(tiny_bert_path / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(a["embeddings.word_embeddings.weight"], start)
