"""Distillation from teacher scores against the same run without them (issue 29).

    python -m benchmarks.distillation --data /work/shared/data/debian-packages/train.jsonl.gz \\
        --work runs/distill-bench

Stages (each skipped when its output exists, so an interrupted run continues):

1. teacher pairs: ``--teacher-pairs`` unique ``short -> long`` pairs from the shared train split,
   none of whose texts is in ``data/quickstart/dev.jsonl`` (the split is by source package, and
   this also rules out a description shared across packages);
2. teacher: the quickstart config on them for ``--teacher-epochs`` epochs (exported); with
   ``--teacher-stop-step N`` the run is stopped once its step-N checkpoint is written (the
   machine was too loaded to finish) and that checkpoint is exported (``ember-train export``) and
   evaluated on the dev pairs;
3. the student's pairs (the first ``--student-pairs`` of ``data/quickstart/train.jsonl``) get
   ``--num-negatives`` hard negatives mined by the untuned student, then the teacher's scores
   (``ember-train mine --teacher``, scoring those negatives without re-mining);
4. two students from all-MiniLM-L6-v2 on that one file, same negatives, seed and steps:
   InfoNCE alone, and InfoNCE + ``--distill-weight`` x KL;
5. the table: nDCG@10 on ``data/quickstart/dev.jsonl`` (and the teacher's own).

Every training command is printed before it runs. ``--threads 1`` by default: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import MODEL, REPO, read_jsonl, unique_debian_pairs, write_jsonl

DEV = REPO / "data/quickstart/dev.jsonl"


def _run(cmd: list[str], threads: int) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def _train_command(output_dir: Path, threads: int, *overrides: str) -> list[str]:
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.yaml", f"output_dir={output_dir}"]
    return [*cmd, f"train.cpu_threads={threads}", "eval.before_training=false", *overrides]


def _train(output_dir: Path, threads: int, *overrides: str) -> None:
    if not (output_dir / "results.json").is_file():
        _run(_train_command(output_dir, threads, *overrides), threads)


def _stopped_teacher(output_dir: Path, step: int, threads: int, cmd: list[str]) -> None:
    """Train until the step-``step`` checkpoint exists (renamed into place only when complete),
    stop, export that checkpoint to ``final`` and evaluate it on the dev pairs (``results.json``)."""
    if (output_dir / "results.json").is_file():
        return
    checkpoint = output_dir / "checkpoints" / f"step_{step:07d}"
    if not checkpoint.is_dir():
        print("+ " + " ".join(shlex.quote(c) for c in cmd) + f"   # stopped at step {step}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(cmd, env=env, cwd=REPO)
        while not checkpoint.is_dir():
            if process.poll() is not None:
                raise SystemExit(f"the teacher run ended before step {step}")
            time.sleep(10)
        process.terminate()
        process.wait()
    final = output_dir / "final"
    if not final.is_dir():
        _run([sys.executable, "-m", "ember_train.cli", "export", str(checkpoint), str(final)], threads)
    from ember_train.evaluation.loading import load_encoder
    from ember_train.pipelines.contrastive import EvalConfig, build_evaluators

    encoder = load_encoder(str(final), max_seq_length=64)
    result = build_evaluators(EvalConfig(data=str(DEV)))[0](encoder)
    results = {"steps": step, "eval_after": [result.to_dict()], "stopped_at_checkpoint": str(checkpoint)}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def _ndcg(output_dir: Path) -> float:
    results = json.loads((output_dir / "results.json").read_text())
    return results["eval_after"][0]["main_score"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the shared Debian train.jsonl.gz")
    parser.add_argument("--work", type=Path, default=REPO / "runs/distill-bench")
    parser.add_argument("--teacher-pairs", type=int, default=3000)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--teacher-stop-step", type=int, help="stop the teacher at this checkpoint step")
    parser.add_argument("--student-pairs", type=int, default=1000)
    parser.add_argument("--num-negatives", type=int, default=3)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--distill-temperature", type=float, default=0.05)
    parser.add_argument("--teacher-temperature", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    # 1. Teacher pairs, disjoint from the dev texts.
    teacher_pairs = work / "teacher_train.jsonl"
    if not teacher_pairs.is_file():
        import random

        dev = read_jsonl(DEV)
        dev_texts = {r["query"].strip() for r in dev} | {r["pos"].strip() for r in dev}
        pairs = [
            p
            for p in unique_debian_pairs(read_jsonl(args.data))
            if p["query"] not in dev_texts and p["pos"] not in dev_texts
        ]
        random.Random(0).shuffle(pairs)
        write_jsonl(teacher_pairs, pairs[: args.teacher_pairs])

    # 2. The teacher: the quickstart recipe, longer and on more pairs.
    teacher = work / "teacher"
    teacher_overrides = (f"data.train={teacher_pairs}", f"train.epochs={args.teacher_epochs}")
    if args.teacher_stop_step:
        command = _train_command(teacher, args.threads, *teacher_overrides)
        _stopped_teacher(teacher, args.teacher_stop_step, args.threads, command)
    else:
        _train(teacher, args.threads, *teacher_overrides)

    # 3. The student's pairs: negatives mined by the untuned student, scored by the teacher.
    student_pairs = work / "student_pairs.jsonl"
    if not student_pairs.is_file():
        write_jsonl(student_pairs, read_jsonl(REPO / "data/quickstart/train.jsonl", limit=args.student_pairs))
    mined, scored = work / "student_mined.jsonl", work / "student_scored.jsonl"
    cli = [sys.executable, "-m", "ember_train.cli", "mine"]
    if not mined.is_file():
        _run([*cli, "--model", MODEL, "--pairs", str(student_pairs), "--output", str(mined),
              "--num-negatives", str(args.num_negatives)], args.threads)  # fmt: skip
    if not scored.is_file():
        _run(
            [*cli, "--teacher", str(teacher / "final"), "--pairs", str(mined), "--output", str(scored)],
            args.threads,
        )

    # 4. Two students: the mined file without and with the scores (same negatives, seed and steps).
    # A query the miner left without negatives cannot train with loss.num_negatives: skipped (counted), in both.
    negatives = (f"loss.num_negatives={args.num_negatives}", "data.on_bad_rows=skip")
    runs = {
        "InfoNCE (hard negatives)": work / "student_infonce",
        f"InfoNCE + {args.distill_weight:g} x KL": work / "student_distill",
    }
    _train(runs["InfoNCE (hard negatives)"], args.threads, f"data.train={mined}", *negatives)
    _train(
        runs[f"InfoNCE + {args.distill_weight:g} x KL"],
        args.threads,
        f"data.train={scored}",
        *negatives,
        f"loss.distill_weight={args.distill_weight}",
        f"loss.distill_temperature={args.distill_temperature}",
        f"loss.distill_teacher_temperature={args.teacher_temperature}",
    )

    # 5. The table.
    print("\n| model | steps | nDCG@10 (quickstart dev) |\n|---|---|---|")
    teacher_steps = json.loads((teacher / "results.json").read_text())["steps"]
    stopped = f", stopped at step {args.teacher_stop_step}" if args.teacher_stop_step else ""
    name = f"teacher ({args.teacher_pairs} pairs, {args.teacher_epochs}-epoch run{stopped})"
    print(f"| {name} | {teacher_steps} | {_ndcg(teacher):.2f} |")
    for name, path in runs.items():
        steps = json.loads((path / "results.json").read_text())["steps"]
        print(f"| student: {name} | {steps} | {_ndcg(path):.2f} |")


if __name__ == "__main__":
    main()
