"""Does RetroMAE on in-domain text help contrastive tuning? Debian packages, same budgets, same seed.

    python -m benchmarks.domain_adaptation --data /work/shared/data/debian-packages --work runs/domain_adaptation

Arms (both end with the *same* contrastive run: config, steps, data order, seed):
  (a) all-MiniLM-L6-v2 -> contrastive tuning on Debian (short -> long) pairs
  (b) all-MiniLM-L6-v2 -> RetroMAE on Debian long descriptions -> the same contrastive tuning
Measured: nDCG@10 on held-out Debian dev pairs (queries = synopses, corpus = their long
descriptions), for the untuned model, each arm, and (b)'s RetroMAE stage alone. The RetroMAE
stage is extra compute for arm (b); its budget is printed next to the scores.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from benchmarks.common import MODEL, read_jsonl, resolve_model, unique_debian_pairs, write_jsonl


def contrastive_config(model: str, train: Path, dev: Path, out: Path, args: argparse.Namespace):
    from ember_train.config import from_dict
    from ember_train.pipelines.contrastive import ContrastiveConfig

    return from_dict(
        ContrastiveConfig,
        {
            "task": "contrastive",
            "output_dir": str(out),
            "seed": args.seed,
            "model": {
                "name_or_path": model,
                "pooling": args.pooling,
                "normalize": True,
                "max_seq_length": 128,
            },
            "data": {"train": str(train)},
            "loss": {"temperature": 0.05},
            "train": {
                "max_steps": args.contrastive_steps,
                "batch_size": args.contrastive_batch,
                "learning_rate": 5e-5,
                "warmup_ratio": 0.1,
                "log_every": 10,
                "resume": "none",
            },
            "eval": {"data": str(dev), "before_training": False, "batch_size": 64},
            "export": {"enabled": False},
        },
        source="domain_adaptation",
    )


def evaluate(model: str, dev: Path, pooling: str) -> float:
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import EvalConfig, build_evaluators

    (evaluator,) = build_evaluators(EvalConfig(data=str(dev), batch_size=64))
    encoder = Encoder.from_pretrained(
        resolve_model(model), pooling=pooling, normalize=True, max_seq_length=128
    )
    return evaluator(encoder).metrics["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with train.jsonl.gz and dev.jsonl.gz"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/domain_adaptation"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--pooling", default="mean", help="pooling of both contrastive runs and of every evaluation"
    )
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--dev-pairs", type=int, default=1000)
    parser.add_argument("--contrastive-steps", type=int, default=60)
    parser.add_argument("--contrastive-batch", type=int, default=32)
    parser.add_argument("--retromae-steps", type=int, default=40)
    parser.add_argument("--retromae-batch", type=int, default=16)
    parser.add_argument("--retromae-texts", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from ember_train.config import from_dict
    from ember_train.pipelines.contrastive import run as run_contrastive
    from ember_train.pipelines.retromae import RetroMAEConfig
    from ember_train.pipelines.retromae import run as run_retromae

    hf_logging.set_verbosity_error()
    rng = random.Random(args.seed)
    train_rows = read_jsonl(args.data / "train.jsonl.gz")
    dev_rows = read_jsonl(args.data / "dev.jsonl.gz")
    pairs = unique_debian_pairs(train_rows, max_chars=1000)
    rng.shuffle(pairs)
    dev_pairs = unique_debian_pairs(dev_rows, max_chars=1000)
    rng.shuffle(dev_pairs)
    texts = list(dict.fromkeys(r["long"].strip() for r in train_rows if r["long"].strip()))
    rng.shuffle(texts)
    work = args.work
    train = write_jsonl(work / "data" / "pairs_train.jsonl", pairs[: args.train_pairs])
    dev = write_jsonl(work / "data" / "pairs_dev.jsonl", dev_pairs[: args.dev_pairs])
    corpus = write_jsonl(
        work / "data" / "long_train.jsonl", [{"text": t} for t in texts[: args.retromae_texts]]
    )

    scores: dict[str, float] = {}
    seconds: dict[str, float] = {}
    scores["untuned"] = evaluate(MODEL, dev, args.pooling)
    print(f"untuned: ndcg@10={scores['untuned']:.2f}", flush=True)

    start = time.perf_counter()
    out_a = run_contrastive(contrastive_config(MODEL, train, dev, work / "a_contrastive", args))
    seconds["a_contrastive"] = time.perf_counter() - start
    scores["a"] = out_a["eval_after"][0]["metrics"]["ndcg@10"]
    print(f"(a) contrastive: ndcg@10={scores['a']:.2f}", flush=True)

    start = time.perf_counter()
    retromae_cfg = from_dict(
        RetroMAEConfig,
        {
            "task": "retromae",
            "output_dir": str(work / "b_retromae"),
            "seed": args.seed,
            "model": {"name_or_path": MODEL, "pooling": "cls", "max_seq_length": 128},
            "data": {"train": str(corpus)},
            "train": {
                "max_steps": args.retromae_steps,
                "batch_size": args.retromae_batch,
                "learning_rate": 1e-4,
                "warmup_ratio": 0.1,
                "log_every": 5,
                "resume": "none",
            },
        },
        source="domain_adaptation",
    )
    out_r = run_retromae(retromae_cfg)
    seconds["b_retromae"] = time.perf_counter() - start
    adapted = out_r["export_dir"]
    scores["b_retromae_only"] = evaluate(adapted, dev, args.pooling)
    print(f"(b) RetroMAE only: ndcg@10={scores['b_retromae_only']:.2f}", flush=True)

    start = time.perf_counter()
    out_b = run_contrastive(contrastive_config(adapted, train, dev, work / "b_contrastive", args))
    seconds["b_contrastive"] = time.perf_counter() - start
    scores["b"] = out_b["eval_after"][0]["metrics"]["ndcg@10"]
    print(f"(b) RetroMAE -> contrastive: ndcg@10={scores['b']:.2f}", flush=True)

    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "ndcg@10": scores,
        "seconds": seconds,
        "retromae_last_metrics": out_r["last_metrics"],
        "dev_queries": min(args.dev_pairs, len(dev_pairs)),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| arm | RetroMAE steps × batch | contrastive steps × batch | nDCG@10 (dev) |")
    print("|---|---:|---:|---:|")
    c = f"{args.contrastive_steps} × {args.contrastive_batch}"
    r = f"{args.retromae_steps} × {args.retromae_batch}"
    print(f"| untuned all-MiniLM-L6-v2 | 0 | 0 | {scores['untuned']:.2f} |")
    print(f"| (a) contrastive | 0 | {c} | {scores['a']:.2f} |")
    print(f"| (b) RetroMAE only | {r} | 0 | {scores['b_retromae_only']:.2f} |")
    print(f"| (b) RetroMAE -> contrastive | {r} | {c} | {scores['b']:.2f} |")
    print("seconds: " + ", ".join(f"{k}={v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
