"""Few-shot classification: frozen body + logistic regression vs ember-train SetFit-style tuning vs `setfit`.

For each dataset and seed, the same few-shot training sample (``--per-label`` texts per label) and
the same test subsample go to three methods, run one after the other in this process:

  (a) frozen  - the packaged MiniLM body, embeddings -> logistic regression;
  (b) ember   - ember-train's setfit pipeline (pairs -> cosine loss through the shared loop ->
                logistic regression), export disabled;
  (c) setfit  - the `setfit` library (``setfit.Trainer``) with the same body, the same pair budget
                (``num_iterations``), batch size, learning rate, warm-up, max length, seed and head
                (``LogisticRegression(C=1, max_iter=1000, random_state=seed)``).

Wall time covers loading the model, training (body and head) and predicting the test texts.
Results print as a Markdown table and go to ``--output`` as JSON.

    python -m benchmarks.bench_setfit \
        --debian /work/shared/data/debian-packages \
        --banking /work/shared/evalsets/Banking77Classification \
        --seeds 5 --per-label 8 --num-iterations 1 --max-test 1000 --threads 1 --output /tmp/bench_setfit.json

`setfit` may live outside the environment (``PYTHONPATH=/path/to/setfit_target``); when it cannot be
imported, (c) is reported as unavailable with the import error.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the per-seed lines in the log

from benchmarks.common import markdown_table, packaged_minilm_dir, read_jsonl, write_jsonl
from ember_train.config import apply_overrides, from_dict, to_dict
from ember_train.data.labelled import LabelledTexts, sample_per_label
from ember_train.evaluation.classification import classification_scores
from ember_train.models import Encoder
from ember_train.models.heads import fit_logistic_regression
from ember_train.pipelines.setfit import SetFitConfig
from ember_train.pipelines.setfit import run as run_setfit_pipeline

# ---------------------------------------------------------------------------------------------
# Data


def load_debian(root: Path, top: int) -> tuple[LabelledTexts, LabelledTexts]:
    """Package synopses (``short``) labelled by archive section; the ``top`` sections of train."""

    train_rows, dev_rows = read_jsonl(root / "train.jsonl.gz"), read_jsonl(root / "dev.jsonl.gz")
    sections = {s for s, _ in Counter(r["section"] for r in train_rows).most_common(top)}

    def labelled(rows: list[dict]) -> LabelledTexts:
        rows = [r for r in rows if r["section"] in sections and r["short"].strip()]
        return LabelledTexts([r["short"] for r in rows], [r["section"] for r in rows], source="debian")

    return labelled(train_rows), labelled(dev_rows)


def load_banking(root: Path) -> tuple[LabelledTexts, LabelledTexts]:
    def read(name: str) -> LabelledTexts:
        rows = read_jsonl(root / name)
        return LabelledTexts([r["text"] for r in rows], [r["label"] for r in rows], source="banking77")

    return read("train.jsonl"), read("test.jsonl")


def subsample(data: LabelledTexts, limit: int | None, seed: int = 0) -> LabelledTexts:
    if limit is None or len(data) <= limit:
        return data
    return data.subset(sorted(random.Random(seed).sample(range(len(data)), limit)))


def write_labelled(path: Path, data: LabelledTexts) -> str:
    rows = ({"text": t, "label": y} for t, y in zip(data.texts, data.labels, strict=True))
    return str(write_jsonl(path, rows))


# ---------------------------------------------------------------------------------------------
# Methods: each returns accuracy, macro-F1 (fractions) and seconds.


def run_frozen(
    args: argparse.Namespace, train: LabelledTexts, test: LabelledTexts, seed: int
) -> dict[str, Any]:
    start = time.perf_counter()
    encoder = Encoder.from_pretrained(args.model, max_seq_length=args.max_seq_length).eval()
    train_emb = encoder.encode(train.texts, batch_size=args.eval_batch_size).numpy()
    head = fit_logistic_regression(train_emb, train.labels, C=1.0, max_iter=1000, seed=seed)
    fit_seconds = time.perf_counter() - start
    predicted = head.predict(encoder.encode(test.texts, batch_size=args.eval_batch_size).numpy())
    return {
        **classification_scores(test.labels, predicted, False),
        "seconds": time.perf_counter() - start,
        "train_seconds": fit_seconds,
    }


def run_ember(
    args: argparse.Namespace, train: LabelledTexts, test: LabelledTexts, seed: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ember-") as tmp:
        tmp_path = Path(tmp)
        cfg = from_dict(
            SetFitConfig,
            {
                "task": "setfit",
                "output_dir": str(tmp_path / "run"),
                "seed": seed,
                "model": {"name_or_path": args.model, "max_seq_length": args.max_seq_length},
                "data": {
                    "train": write_labelled(tmp_path / "train.jsonl", train),
                    "test": write_labelled(tmp_path / "test.jsonl", test),
                },
                "pairs": {"num_iterations": args.num_iterations, "loss": args.loss},
                "head": {"type": "logistic_regression", "C": 1.0, "max_iter": 1000},
                "train": {
                    "epochs": 1,
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "warmup_ratio": 0.1,
                    "weight_decay": 0.01,
                    "log_every": 50,
                    "keep_checkpoints": 1,
                    "resume": "none",
                },
                "eval": {"batch_size": args.eval_batch_size, "before_training": False},
                "export": {"enabled": False},
            },
        )
        if args.ember_set:  # e.g. pairs.include_self_pairs=true, for a comparison on --validation
            cfg = from_dict(SetFitConfig, apply_overrides(to_dict(cfg), args.ember_set))
        start = time.perf_counter()
        results = run_setfit_pipeline(cfg)
        seconds = time.perf_counter() - start
    metrics = results["eval_after_classification"]["metrics"]
    return {
        "accuracy": metrics["accuracy"] / 100.0,
        "f1": metrics["f1"] / 100.0,
        "seconds": seconds,
        "train_seconds": results["train_seconds"],
        "pairs": results["pairs"]["pairs_per_epoch"],
    }


def run_setfit_library(
    args: argparse.Namespace, train: LabelledTexts, test: LabelledTexts, seed: int
) -> dict[str, Any]:
    from datasets import Dataset

    try:  # the module layout of newer sentence-transformers (the old path warns, then goes)
        from sentence_transformers.sentence_transformer.losses import CoSENTLoss, CosineSimilarityLoss
    except ImportError:
        from sentence_transformers.losses import CoSENTLoss, CosineSimilarityLoss
    from setfit import SetFitModel, Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="bench-setfit-") as tmp:
        start = time.perf_counter()
        model = SetFitModel.from_pretrained(
            args.model, head_params={"C": 1.0, "max_iter": 1000, "random_state": seed}, device="cpu"
        )
        model.model_body.max_seq_length = args.max_seq_length
        training_args = TrainingArguments(
            output_dir=tmp,
            batch_size=args.batch_size,
            num_epochs=1,
            num_iterations=args.num_iterations,
            body_learning_rate=args.learning_rate,
            warmup_proportion=0.1,
            loss={"cosine_mse": CosineSimilarityLoss, "cosent": CoSENTLoss}[args.loss],
            seed=seed,
            report_to="none",
            save_strategy="no",
            logging_steps=50,
            show_progress_bar=False,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=Dataset.from_dict({"text": train.texts, "label": train.labels}),
        )
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start
        predicted = list(model.predict(test.texts, batch_size=args.eval_batch_size, as_numpy=True))
        seconds = time.perf_counter() - start
    return {
        **classification_scores(test.labels, predicted, False),
        "seconds": seconds,
        "train_seconds": train_seconds,
    }


METHODS = {"frozen": run_frozen, "ember": run_ember, "setfit": run_setfit_library}
TITLES = {
    "frozen": "(a) frozen body + logistic regression",
    "ember": "(b) ember-train SetFit-style tuning",
    "setfit": "(c) setfit library",
}


# ---------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    def stats(key: str) -> tuple[float, float]:
        values = [r[key] for r in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc, acc_sd = stats("accuracy")
    f1, f1_sd = stats("f1")
    seconds, seconds_sd = stats("seconds")
    train_seconds, _ = stats("train_seconds")
    return {
        "accuracy": 100 * acc,
        "accuracy_std": 100 * acc_sd,
        "f1": 100 * f1,
        "f1_std": 100 * f1_sd,
        "seconds": seconds,
        "seconds_std": seconds_sd,
        "train_seconds": train_seconds,
    }


def merge_reports(paths: list[Path]) -> dict[str, Any]:
    """Combine reports of the same settings over different seeds (e.g. written by two processes)."""
    merged: dict[str, Any] = {"datasets": {}}
    for path in paths:
        report = json.loads(path.read_text())
        for name, entry in report["datasets"].items():
            seeds = entry.get("seeds")
            if seeds is None:  # a report written mid-run by an earlier version of this script
                seeds = list(range(entry.get("seeds_done", min(len(r) for r in entry["runs"].values()))))
            target = merged["datasets"].setdefault(name, {"runs": {}, "seeds": []})
            for key in ("num_labels", "test_texts", "test_pool", "train_texts_per_seed"):
                if key in entry:
                    target[key] = entry[key]
            target["seeds"] += seeds
            for method, runs in entry["runs"].items():
                # A seed still running when the report was written has some methods done: keep whole seeds.
                target["runs"].setdefault(method, []).extend(runs[: len(seeds)])
    for entry in merged["datasets"].values():
        entry["summary"] = {m: summarise(r) for m, r in entry["runs"].items() if r}
    return merged


def print_table(report: dict[str, Any]) -> None:
    rows = []
    for name, entry in report["datasets"].items():
        for method, s in entry.get("summary", {}).items():
            rows.append(
                [
                    f"{name} ({entry.get('num_labels', '?')} labels, {entry.get('test_texts', '?')} test)",
                    TITLES[method],
                    len(entry["runs"][method][: len(entry["seeds"])]),
                    f"{s['accuracy']:.2f} ± {s['accuracy_std']:.2f}",
                    f"{s['f1']:.2f} ± {s['f1_std']:.2f}",
                    f"{s['seconds']:.1f} ± {s['seconds_std']:.1f}",
                    f"{s['train_seconds']:.1f}",
                ]
            )
    header = ["Dataset", "Method", "Seeds", "Accuracy (mean ± std)", "Macro-F1 (mean ± std)"]
    header += ["Wall time / seed (s)", "Training (s)"]
    print()
    print(markdown_table(header, rows, align="llrrrrr"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debian", type=Path, help="directory with train.jsonl.gz and dev.jsonl.gz")
    parser.add_argument("--banking", type=Path, help="Banking77Classification directory (train/test.jsonl)")
    parser.add_argument("--model", default=None, help="body (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--methods", default="frozen,ember,setfit")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="only print the table of these JSON reports, merged"
    )
    parser.add_argument("--per-label", type=int, default=8)
    parser.add_argument("--top-sections", type=int, default=20)
    parser.add_argument("--num-iterations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument(
        "--loss",
        choices=["cosine_mse", "cosent"],
        default="cosine_mse",
        help="pair loss of (b) and (c): setfit's default CosineSimilarityLoss, or CoSENT (scale 20) for both",
    )
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument(
        "--max-test", type=int, default=1000, help="seeded random test subsample (same for all)"
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="hold out this many train texts (fixed seed) and evaluate on them instead of the test "
        "split: for choosing settings without looking at the test set",
    )
    parser.add_argument(
        "--ember-set", action="append", default=[], help="override of (b)'s config, KEY=VALUE (repeatable)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.merge:
        print_table(merge_reports(args.merge))
        return 0
    args.model = args.model or packaged_minilm_dir()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    datasets: dict[str, tuple[LabelledTexts, LabelledTexts]] = {}
    if args.debian:
        datasets[f"Debian sections (top {args.top_sections})"] = load_debian(args.debian, args.top_sections)
    if args.banking:
        datasets["Banking77"] = load_banking(args.banking)
    if not datasets:
        parser.error("give --debian and/or --banking")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unavailable: dict[str, str] = {}
    if "setfit" in methods:
        try:
            import setfit  # noqa: F401
        except Exception as e:  # report, do not crash: (a) and (b) still run
            unavailable["setfit"] = f"{type(e).__name__}: {e}"
            methods.remove("setfit")

    import sentence_transformers
    import torch
    import transformers

    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "setfit": __import__("setfit").__version__ if "setfit" in methods else None,
        },
        "torch_threads": torch.get_num_threads(),
        "unavailable": unavailable,
        "datasets": {},
    }
    for name, (train_all, test_all) in datasets.items():
        if args.validation:
            held_out = set(random.Random(12345).sample(range(len(train_all)), args.validation))
            test_all = train_all.subset(sorted(held_out))
            train_all = train_all.subset([i for i in range(len(train_all)) if i not in held_out])
            name = f"{name}, validation (held-out train)"
        test = subsample(test_all, args.max_test)
        labels = sorted(set(train_all.labels))
        test = test.subset([i for i, y in enumerate(test.labels) if y in set(labels)])
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        entry: dict[str, Any] = {
            "num_labels": len(labels),
            "train_texts_per_seed": args.per_label * len(labels),
            "test_texts": len(test),
            "test_pool": len(test_all),
            "seeds": [],
            "runs": runs,
        }
        report["datasets"][name] = entry
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            train = sample_per_label(train_all, args.per_label, seed)
            for method in methods:
                gc.collect()
                result = METHODS[method](args, train, test, seed)
                runs[method].append(result)
                print(
                    f"[{name}] seed {seed} {method}: acc={100 * result['accuracy']:.2f} f1={100 * result['f1']:.2f} "
                    f"wall={result['seconds']:.1f}s train={result['train_seconds']:.1f}s",
                    flush=True,
                )
            entry["seeds"].append(seed)
            entry["summary"] = {m: summarise(r) for m, r in runs.items()}
            if args.output:  # after every seed, so a long run can be read (or merged) before it ends
                args.output.write_text(json.dumps(report, indent=2) + "\n")

    print_table(report)
    for method, why in unavailable.items():
        print(f"\n{TITLES[method]}: not run ({why})")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
