"""Two datasets in one contrastive run: one dataset per batch against mixed batches, same budget and seed.

    python -m benchmarks.mixtures --work runs/mixtures                 # both arms, one after the other
    python -m benchmarks.mixtures --work runs/mixtures --arms same     # one arm (run two at once) ...
    python -m benchmarks.mixtures --work runs/mixtures --arms mixed
    python -m benchmarks.mixtures --work runs/mixtures                 # ... then the table (trained arms are kept)

Datasets (both from the quickstart's Debian train rows, ``--train``):
  debian: synopsis -> long description (the quickstart pairs as they are);
  sections: synopsis -> the synopsis of another package of the same Debian ``section`` (a second,
    coarser task: "what kind of package is this"), one pair per row whose section holds another.
Arms: the same config (all-MiniLM-L6-v2, 64 tokens, batch 32, 1 epoch, proportional sampling, seed),
except ``data.same_dataset_batches``: true (every batch from one dataset) or false (shuffled together).
Measured: nDCG@10 on the quickstart dev pairs (``--dev``: synopsis -> long description), and a
section metric: for each dev synopsis, the share of its 10 nearest other dev synopses of its section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks.common import MODEL, REPO, markdown_table, read_jsonl, write_jsonl

ARMS = {"same": True, "mixed": False}  # arm -> data.same_dataset_batches


def section_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Per row, its synopsis -> the synopsis of another row of the same section (a different text)."""
    rng = random.Random(seed)
    by_section: dict[str, list[str]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row["query"])
    pairs = []
    for row in rows:
        others = [q for q in by_section[row["section"]] if q != row["query"]]
        if others:
            pairs.append({"query": row["query"], "pos": rng.choice(others), "section": row["section"]})
    return pairs


def arm_config(
    arm: str, train: Path, sections: Path, dev: Path, work: Path, args: argparse.Namespace
) -> Path:
    config = {
        "task": "contrastive",
        "output_dir": str(work / arm),
        "seed": args.seed,
        "model": {"name_or_path": MODEL, "pooling": "mean", "normalize": True, "max_seq_length": 64},
        "data": {
            "train": [{"path": str(train), "name": "debian"}, {"path": str(sections), "name": "sections"}],
            "sampling": "proportional",
            "same_dataset_batches": ARMS[arm],
        },
        "loss": {"temperature": 0.05},
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "learning_rate": 5e-5,
            "warmup_ratio": 0.1,
            "weight_decay": 0.01,
            "log_every": 10,
            "checkpoint_every": 0,
            "resume": "none",
            "cpu_threads": args.threads,
        },
        "eval": {"data": str(dev), "before_training": False, "batch_size": 64},
    }
    path = work / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def section_precision(model: str, dev_rows: list[dict], k: int = 10) -> float:
    """Mean share of each dev synopsis's ``k`` nearest other synopses that share its section."""
    from ember_train.models import Encoder

    encoder = Encoder.from_pretrained(model, normalize=True, max_seq_length=64)
    embeddings = encoder.encode([r["query"] for r in dev_rows], batch_size=64)
    scores = embeddings @ embeddings.T
    scores.fill_diagonal_(float("-inf"))
    top = scores.topk(k, dim=1).indices.tolist()
    sections = [r["section"] for r in dev_rows]
    return sum(sum(sections[j] == sections[i] for j in row) / k for i, row in enumerate(top)) / len(top)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("runs/mixtures"))
    parser.add_argument("--train", type=Path, default=REPO / "data/quickstart/train.jsonl")
    parser.add_argument("--dev", type=Path, default=REPO / "data/quickstart/dev.jsonl")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seed", type=int, default=42, help="the runs' seed")
    parser.add_argument("--data-seed", type=int, default=42, help="the seed that picks the section pairs")
    parser.add_argument("--threads", type=int, default=1, help="train.cpu_threads of each run")
    args = parser.parse_args()

    work = args.work.resolve()
    rows = read_jsonl(args.train)
    sections = write_jsonl(work / "sections.jsonl", section_pairs(rows, args.data_seed))
    print(f"datasets: debian {len(rows)} pairs ({args.train}), sections {len(read_jsonl(sections))} pairs")
    for arm in args.arms:
        if (work / arm / "results.json").is_file():
            print(f"{arm}: already trained ({work / arm / 'results.json'})")
            continue
        config = arm_config(arm, args.train.resolve(), sections, args.dev.resolve(), work, args)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config)], check=True, env=env)

    if not all((work / arm / "results.json").is_file() for arm in ARMS):
        print("the table needs both arms; run again once the other arm has finished")
        return
    dev_rows = read_jsonl(args.dev)
    table = [["all-MiniLM-L6-v2, untuned", "-", "-", "-", f"{section_precision(MODEL, dev_rows):.4f}"]]
    table[0][3] = f"{_untuned_ndcg(args.dev):.2f}"
    for arm in ARMS:
        results = json.loads((work / arm / "results.json").read_text(encoding="utf-8"))
        ndcg = next(r["main_score"] for r in results["eval_after"])
        trained = ", ".join(f"{k} {v['trained_examples']}" for k, v in results["datasets"].items())
        label = "one dataset per batch" if ARMS[arm] else "mixed batches"
        section = section_precision(str(work / arm / "final"), dev_rows)
        table.append([label, str(results["steps"]), trained, f"{ndcg:.2f}", f"{section:.4f}"])
    header = ["arm", "steps", "trained examples", "nDCG@10 (dev)", "section P@10 (dev)"]
    print(markdown_table(header, table, "lrlrr"))


def _untuned_ndcg(dev: Path) -> float:
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import EvalConfig, build_evaluators

    encoder = Encoder.from_pretrained(MODEL, normalize=True, max_seq_length=64)
    (evaluator,) = build_evaluators(EvalConfig(data=str(dev)))
    return evaluator(encoder).main_score


if __name__ == "__main__":
    main()
