"""Hard negatives mined once before training against re-mined with the current model, same budget.

    python -m benchmarks.bench_remining --work runs/bench_remining --every-steps 0 21
    python -m benchmarks.bench_remining --work runs/bench_remining --max-examples 1024 --max-seq-length 32 --every-steps 0 8
    python -m benchmarks.bench_remining --work runs/bench_remining --table   # the table of finished arms

Each arm is the quickstart (all-MiniLM-L6-v2, data/quickstart/train.jsonl, 1 epoch of batch 32 =
63 steps, seed 42; ``--max-examples``/``--max-seq-length`` shrink it for a loaded machine) with one hard negative per query (``loss.num_negatives=1``) mined with the
model being trained, before step 0 (``mining.before_training``) and, for ``--every-steps N > 0``,
again after every N steps. Same steps, same seed, same data order; only when negatives are
mined differs. Measured: nDCG@10 on data/quickstart/dev.jsonl after training, and the time spent
mining as a fraction of the training loop's time. Arms run one after another, each as
``train.py`` in its own process; ``--table`` reads their ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, markdown_table


def command(work: Path, every_steps: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        f"output_dir={work / f'every_{every_steps}'}",
        f"seed={args.seed}",
        f"model.max_seq_length={args.max_seq_length}",
        f"data.max_examples={args.max_examples}",
        "loss.num_negatives=1",
        "mining.before_training=true",
        f"mining.every_steps={every_steps}",
        f"train.cpu_threads={args.cpu_threads}",
        "train.checkpoint_every=0",
        "eval.before_training=false",
        "export.enabled=false",
    ]


def table(work: Path) -> str:
    rows = []
    for run in sorted(work.glob("every_*"), key=lambda p: int(p.name.split("_")[1])):
        results_file = run / "results.json"
        if not results_file.is_file():
            continue
        results = json.loads(results_file.read_text())
        mining = results["mining"]
        ndcg = next(r["metrics"]["ndcg@10"] for r in results["eval_after"] if r["dataset"] == "dev")
        every = mining["cadence_steps"]
        rows.append(
            [
                "once, before step 0" if every == 0 else f"before step 0 + every {every} steps",
                results["steps"],
                mining["passes"],
                f"{ndcg:.2f}",
                f"{mining['seconds']:.0f}",
                f"{results['train_seconds']:.0f}",
                f"{100 * mining['seconds'] / results['train_seconds']:.1f}%",
            ]
        )
    header = ["negatives mined", "steps", "mining passes", "nDCG@10", "mining s", "train s", "mining share"]
    return markdown_table(header, rows, align="lrrrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench_remining")
    parser.add_argument(
        "--every-steps", type=int, nargs="*", default=[0, 21], help="0: mine once, before training"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-examples", type=int, default=2000, help="training pairs (steps = this / 32)")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the table of finished arms")
    args = parser.parse_args()
    if not args.table:
        for every in args.every_steps:
            cmd = command(args.work, every, args)
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
    print(table(args.work))


if __name__ == "__main__":
    main()
