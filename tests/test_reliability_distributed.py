"""Distributed faults: when one process fails, every process stops within a bounded time (no
rank waits forever in a collective), the launcher exits non-zero, and the error says which rank."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, two_process_launch

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 120


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
def test_rank_1_raises_both_processes_exit_non_zero_in_bounded_time(tmp_path, tiny_bert_path):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 32}}\n"
        "train: {batch_size: 4, max_steps: 6}\neval: {before_training: false}\nexport: {enabled: false}\n"
    )
    cmd, env = two_process_launch(
        str(HERE / "reliability" / "rank_fails.py"), "raise", str(cfg), str(tmp_path)
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the launcher did not exit within {TIMEOUT_S} s (a rank hangs):\n{output[-4000:]}")
    elapsed = time.monotonic() - start

    assert proc.returncode != 0, output[-4000:]
    pids = {p.stem: int(p.read_text()) for p in tmp_path.glob("rank_*.pid")}
    assert sorted(pids) == ["rank_0", "rank_1"], output[-4000:]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if _alive(pid)], "a worker outlived the launcher"
    # What the user sees: our one-line error naming the rank, and the launcher's summary.
    assert "ember-train: error (rank 1 of 2): RuntimeError: injected failure on rank 1" in output, output[
        -4000:
    ]
    # torchrun's summary names the first failure (rank 0 was stopped by the launcher after it).
    root_cause = output[output.index("Root Cause (first observed failure)") :]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), output[-4000:]
    assert elapsed < TIMEOUT_S


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_both(tmp_path, tiny_bert_path):
    """The loop's one read per step includes a cross-process count of non-finite losses: rank 0,
    whose own loss was finite (but whose all-reduced gradients are not), must skip for the same
    reason as rank 1, and both train on."""
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 32}}\n"
        "train: {batch_size: 4, max_steps: 4, log_every: 1}\neval: {before_training: false}\n"
        "export: {enabled: false}\n"
    )
    cmd, env = two_process_launch(str(HERE / "reliability" / "rank_fails.py"), "nan", str(cfg), str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert output.count("step 2: non-finite loss; skipping the update (1 in a row)") == 2, output[-4000:]
    assert "non-finite gradient" not in output
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
