"""Reproduce all-MiniLM-L6-v2's published MTEB scores with ember-train's offline evaluators.

Runs the shipped descriptors in ``configs/eval/`` against a local copy of the evaluation sets
and prints ours vs published (and whether each is within the tolerance). Published numbers are
the all-MiniLM-L6-v2 MTEB results (×100).

    python -m benchmarks.validate_mteb_scores --evalsets /path/to/evalsets [--model DIR] [--tasks STS12,SciFact]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, markdown_table, packaged_minilm_dir
from ember_train.evaluation.loading import load_encoder
from ember_train.evaluation.tasks import load_task

PUBLISHED = {
    "STSBenchmark": 82.03,
    "SICK-R": 77.58,
    "BIOSSES": 81.64,
    "STS12": 72.37,
    "STS13": 80.60,
    "STS14": 75.59,
    "STS15": 85.39,
    "STS16": 78.99,
    "Banking77Classification": 80.04,
    "SciFact": 64.51,
}


def _fmt(value: float | None, *, signed: bool = False) -> str:
    """Two decimals; ``-0.00`` prints as ``+0.00``; None prints as an empty cell."""
    if value is None:
        return ""
    value = round(value, 2) + 0.0
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--evalsets", required=True, help="root folder holding STSBenchmark/, SciFact/, ...")
    parser.add_argument(
        "--model", default=None, help="model dir or name (default: the packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument("--tasks", default=",".join(PUBLISHED), help="comma-separated task names")
    parser.add_argument(
        "--descriptors", default=str(REPO / "configs" / "eval"), help="folder of task descriptors"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-seq-length", type=int, default=None, help="override the model's own (MiniLM: 256)"
    )
    parser.add_argument("--tolerance", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = args.model or packaged_minilm_dir()
    encoder = load_encoder(model, max_seq_length=args.max_seq_length)
    print(
        f"model: {model}\npooling={encoder.pooling} normalize={encoder.normalize} "
        f"max_seq_length={encoder.max_seq_length} threads={torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        evaluator = load_task(
            Path(args.descriptors) / f"{name}.yaml", data_root=args.evalsets, batch_size=args.batch_size
        )
        start = time.perf_counter()
        result = evaluator(encoder)
        seconds = time.perf_counter() - start
        published = PUBLISHED.get(name)
        diff = None if published is None else result.main_score - published
        ok = None if diff is None else abs(diff) <= args.tolerance
        rows.append(
            {
                **result.to_dict(),
                "published": published,
                "diff": diff,
                "within_tolerance": ok,
                "seconds": seconds,
            }
        )
        verdict = "" if ok is None else ("OK" if ok else "MISS")
        print(
            f"{name:<26} {result.main_metric:<16} ours {result.main_score:6.2f}  published {_fmt(published)}  "
            f"diff {_fmt(diff, signed=True)}  {verdict}  ({seconds:.0f}s)",
            flush=True,
        )

    table = []
    for r in rows:
        ok = "" if r["within_tolerance"] is None else ("yes" if r["within_tolerance"] else "**no**")
        pub, diff = _fmt(r["published"]), _fmt(r["diff"], signed=True)
        table.append(
            [r["dataset"], r["task_type"], r["main_metric"], f"{r['main_score']:.2f}", pub, diff, ok]
        )
    header = ["Task", "Type", "Metric", "ember-train", "Published", "Diff", f"Within ±{args.tolerance:.1f}"]
    print("\n" + markdown_table(header, table, align="lllrrrl"))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0 if all(r["within_tolerance"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
