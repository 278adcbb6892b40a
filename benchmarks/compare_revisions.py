"""Throughput of two git revisions, side by side: the same contrastive run through ``train.py`` of
each, alternating, so that a restructuring can show it changed nothing (or what it changed).

    python -m benchmarks.compare_revisions 9e4d933 HEAD --steps 16 --warmup-steps 2 --repeats 3

Each revision is checked out into a temporary git worktree and run with its own code on its
``PYTHONPATH`` (``python WORKTREE/train.py``), one process with every core, the quickstart's model
and settings on Debian short -> long pairs. Runs alternate A, B, B, A, ... so the machine's drift
hits both; each run's first ``--warmup-steps`` steps are not timed. Prints samples/s per run and the
ratio B/A per repeat.

On a busy machine use ``--threads 1 --clock cpu``: each step is then timed by the CPU time the
training process spent on it (``/proc/PID/stat``, read as each step's log line appears), which other
processes on the machine do not inflate the way they inflate wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEBIAN_TRAIN, MODEL, REPO, load_debian_pairs, markdown_table, write_jsonl


def checkout(revision: str, root: Path) -> Path:
    """A detached worktree of ``revision`` under ``root``."""
    path = root / revision.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=REPO, check=True)
    return path


def run_once(tree: Path, pairs: Path, out: Path, args: argparse.Namespace) -> float:
    """One training run with ``tree``'s code; samples/s over the timed steps."""
    cfg = out / "bench.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        f"task: contrastive\noutput_dir: {out / 'run'}\nseed: 0\n"
        f"model: {{name_or_path: '{args.model}', max_seq_length: {args.max_length}, normalize: true}}\n"
        f"data: {{train: '{pairs}'}}\nloss: {{temperature: 0.05}}\n"
        f"train: {{batch_size: {args.batch_size}, max_steps: {args.steps}, log_every: 1, resume: none,"
        " keep_checkpoints: 1}\neval: {before_training: false}\nexport: {enabled: false}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # both revisions keep an explicit OMP_NUM_THREADS
    command = [sys.executable, str(tree / "train.py"), "--config", str(cfg)]
    log = out / "run" / "metrics.jsonl"
    if args.clock == "cpu":
        step_seconds = _cpu_seconds_per_step(subprocess.Popen(command, env=env, cwd=tree), log)
    else:
        subprocess.run(command, check=True, env=env, cwd=tree)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        step_seconds = [args.batch_size / r["samples_per_s"] for r in records if "samples_per_s" in r]
    timed = step_seconds[args.warmup_steps :]
    return args.batch_size * len(timed) / sum(timed)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds_per_step(process: subprocess.Popen, log: Path) -> list[float]:
    """CPU seconds between consecutive training-step log lines (``log_every: 1``) of a running process."""
    marks: list[float] = []
    seen = 0
    while process.poll() is None:
        steps = (
            sum(1 for line in log.read_text().splitlines() if "samples_per_s" in line) if log.exists() else 0
        )
        if steps > seen:
            cpu = _process_cpu_seconds(process.pid)
            marks += [cpu] * (steps - seen)  # a missed step shares the reading; it only blurs one pair
            seen = steps
        time.sleep(0.02)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--pairs", type=Path, default=DEBIAN_TRAIN)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per run (0: every core)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by wall clock (the loop's samples/s) or by the process's CPU time",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ember-revisions-") as tmp:
        root = Path(tmp)
        pairs = write_jsonl(
            root / "pairs.jsonl", load_debian_pairs(args.pairs, args.batch_size * args.steps, 0)
        )
        trees = {rev: checkout(rev, root) for rev in (args.before, args.after)}
        speeds: dict[str, list[float]] = {rev: [] for rev in trees}
        try:
            for repeat in range(args.repeats):
                order = [args.before, args.after] if repeat % 2 == 0 else [args.after, args.before]
                for rev in order:
                    speed = run_once(trees[rev], pairs, root / f"{repeat}_{rev}", args)
                    speeds[rev].append(speed)
                    print(f"repeat {repeat}: {rev} {speed:.2f} samples/s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    ratios = [b / a for a, b in zip(speeds[args.before], speeds[args.after], strict=True)]
    rows = [
        [rev, " / ".join(f"{s:.2f}" for s in speeds[rev]), f"{statistics.mean(speeds[rev]):.2f}"]
        for rev in trees
    ]
    print(markdown_table(["revision", "samples/s per repeat", "mean"], rows))
    print(f"\n{args.after} / {args.before}: " + ", ".join(f"{r:.3f}x" for r in ratios))


if __name__ == "__main__":
    main()
