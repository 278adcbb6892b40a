"""Does RetroMAE pretraining beat MLM pretraining at the same budget? A small-scale reproduction.

    python -m benchmarks.retromae_reproduction --data /work/shared/data/debian-packages \\
        --work runs/retromae_reproduction

RetroMAE's claim (arXiv 2205.12035): at the same pretraining budget, RetroMAE gives a better
retriever after fine-tuning than MLM pretraining. Per seed, one randomly initialised small BERT
(a WordPiece vocabulary of ``--tokenizer-vocab`` tokens, 8,192 by default, trained with MiniLM's
normaliser on the pretraining texts; ``0``: MiniLM's own 30,522, whose output projection makes a
CPU run stop at unigram statistics) goes through three arms:

* ``none``: no pretraining;
* ``mlm``: ``task: retromae`` with ``retromae.objective: mlm`` (the same encoder masking and MLM
  loss, no decoder);
* ``retromae``: ``task: retromae`` with enhanced decoding (the paper's setting);

the two pretrained arms on the same Debian long descriptions, in the same order, with the same
encoder masks (same seed): the same steps x batch x sequence length. Then every arm gets the
same contrastive tuning (``task: contrastive``, Debian short -> long pairs), once per pooling in
``--poolings`` (CLS, as RetroMAE trains it, and mean), and nDCG@10 on held-out Debian dev pairs.
Results are written after every run to ``<work>/results.json``; a rerun skips the runs already
there (``--fresh`` to redo them).

``--diagnose`` adds, for every arm's model before contrastive tuning: its nDCG@10 (each pooling)
and the mean cosine between the [CLS] vectors of different dev texts (1: collapsed); the unigram
entropy of the pretraining tokens (the MLM loss that token counts alone reach); and for RetroMAE
how much the decoder relies on ``h``: its held-out reconstruction loss/accuracy with each text's
own ``h``, with ``h`` of another text in the batch and with a zero ``h``, and how alike the ``h``
of different texts are.
``--collect DIR ...`` merges the runs of other work folders (e.g. one process per seed, run side by
side) into this one's ``results.json`` before the table and the diagnostics.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import (
    MODEL,
    fresh_accelerate_state,
    markdown_table,
    read_jsonl,
    resolve_model,
    unique_debian_pairs,
    write_jsonl,
)

ARMS = ("none", "mlm", "retromae")


def make_tokenizer(corpus: Path, work: Path, vocab_size: int):
    """MiniLM's tokenizer, or (``vocab_size`` > 0) a WordPiece vocabulary of that size trained with
    MiniLM's normaliser and pre-tokeniser on the pretraining texts (train long descriptions, never dev).

    A small vocabulary makes the output projection (the MLM head at every scored encoder and
    decoder position) cheap enough to train past unigram statistics on one CPU core.
    """
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    if vocab_size <= 0:
        return base
    path = work / f"tokenizer_{vocab_size}"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tokenizer = base.train_new_from_iterator(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_random_bert(path: Path, tokenizer, args: argparse.Namespace, seed: int) -> Path:
    """A randomly initialised BERT with an MLM head and ``tokenizer``; one per seed, shared by its arms."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain_config(
    model: Path, corpus: Path, out: Path, objective: str, seed: int, args: argparse.Namespace
):
    from ember_train.config import from_dict
    from ember_train.pipelines.retromae import RetroMAEConfig

    return from_dict(
        RetroMAEConfig,
        {
            "task": "retromae",
            "output_dir": str(out),
            "seed": seed,
            "model": {"name_or_path": str(model), "pooling": "cls", "max_seq_length": args.seq_len},
            "data": {"train": str(corpus)},
            "retromae": {
                "objective": objective,
                "encoder_mask_ratio": args.encoder_mask_ratio,
                "decoder_mask_ratio": args.decoder_mask_ratio,
            },
            "train": {
                "max_steps": args.pretrain_steps,
                "batch_size": args.pretrain_batch,
                "learning_rate": args.pretrain_lr,
                "warmup_ratio": 0.1,
                "weight_decay": 0.01,
                "log_every": 10,
                "checkpoint_every": 0,
                "resume": "none",
                "cpu_threads": args.threads,
            },
        },
        source="retromae_reproduction",
    )


def contrastive_config(
    model: str, pooling: str, train: Path, dev: Path, out: Path, seed: int, args: argparse.Namespace
):
    from ember_train.config import from_dict
    from ember_train.pipelines.contrastive import ContrastiveConfig

    return from_dict(
        ContrastiveConfig,
        {
            "task": "contrastive",
            "output_dir": str(out),
            "seed": seed,
            "model": {
                "name_or_path": model,
                "pooling": pooling,
                "normalize": True,
                "max_seq_length": args.seq_len,
            },
            "data": {"train": str(train)},
            "loss": {"temperature": args.contrastive_temperature},
            "train": {
                "max_steps": args.contrastive_steps,
                "batch_size": args.contrastive_batch,
                "learning_rate": args.contrastive_lr,
                "warmup_ratio": 0.1,
                "log_every": 10,
                "checkpoint_every": 0,
                "resume": "none",
                "cpu_threads": args.threads,
            },
            "eval": {"data": str(dev), "before_training": False, "batch_size": 64},
            "export": {"enabled": False},
        },
        source="retromae_reproduction",
    )


def prepare_data(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Contrastive train pairs, dev pairs and the pretraining corpus (train long descriptions)."""
    rng = random.Random(0)
    train_rows = read_jsonl(args.data / "train.jsonl.gz")
    pairs = unique_debian_pairs(train_rows, max_chars=1000)
    rng.shuffle(pairs)
    dev_pairs = unique_debian_pairs(read_jsonl(args.data / "dev.jsonl.gz"), max_chars=1000)
    rng.shuffle(dev_pairs)
    texts = list(dict.fromkeys(r["long"].strip() for r in train_rows if r["long"].strip()))
    rng.shuffle(texts)
    data = args.work / "data"
    train = write_jsonl(data / "pairs_train.jsonl", pairs[: args.train_pairs])
    dev = write_jsonl(data / "pairs_dev.jsonl", dev_pairs[: args.dev_pairs])
    corpus = write_jsonl(data / "long_train.jsonl", [{"text": t} for t in texts[: args.pretrain_texts]])
    return train, dev, corpus


def zero_shot_ndcg(model: str, pooling: str, dev: Path, seq_len: int) -> float:
    """nDCG@10 of a model as it is (normalised), before contrastive tuning."""
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import EvalConfig, build_evaluators

    (evaluator,) = build_evaluators(EvalConfig(data=str(dev), batch_size=64))
    encoder = Encoder.from_pretrained(model, pooling=pooling, normalize=True, max_seq_length=seq_len)
    return evaluator(encoder).metrics["ndcg@10"]


def decoder_reliance(
    pretrained: Path, texts: list[str], seed: int, args: argparse.Namespace
) -> dict[str, float]:
    """Held-out decoder loss/accuracy with each text's own ``h``, the next text's ``h`` and a zero
    ``h``, and the mean cosine between the ``h`` of different texts.

    Own ≈ other: ``h`` tells the decoder nothing about its text, either because the decoder
    ignores it (own ≈ zero too) or because every text's ``h`` is the same (cosine ≈ 1).
    """
    import torch
    import torch.nn.functional as F

    from ember_train.data.masking import RetroMAECollator
    from ember_train.models.pooling import pool
    from ember_train.models.retromae import RetroMAEModel

    model = RetroMAEModel.from_pretrained(
        pretrained, max_seq_length=args.seq_len, init_decoder_from=pretrained
    )
    model.eval()
    collator = RetroMAECollator(
        model.tokenizer,
        max_seq_length=args.seq_len,
        encoder_mask_ratio=args.encoder_mask_ratio,
        decoder_mask_ratio=args.decoder_mask_ratio,
        seed=seed + 1000,
    )
    sums = {"own": [0.0, 0.0], "other": [0.0, 0.0], "zero": [0.0, 0.0]}
    count, cosines = 0, []
    with torch.no_grad():
        for n, start in enumerate(range(0, len(texts), 32)):
            batch = collator([{"text": t, "key": (0, n)} for t in texts[start : start + 32]])
            hidden = model.backbone(
                input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            h = pool(hidden, batch["attention_mask"], model.pooling)
            at = batch["decoder_positions"]
            targets = batch["decoder_labels"].flatten()[at]
            unit = F.normalize(h, dim=-1)
            similarity = unit @ unit.T
            off_diagonal = ~torch.eye(len(h), dtype=torch.bool)
            cosines.append(float(similarity[off_diagonal].mean()))
            for name, vector in (("own", h), ("other", h.roll(1, dims=0)), ("zero", torch.zeros_like(h))):
                length = batch["input_ids"].shape[1]
                query = model.query_stream_from(vector, length)
                content = model.content_stream_from(vector, batch["input_ids"])
                logits = model.head(model.decoder(query, content, batch["decoder_visible"]).flatten(0, 1)[at])
                sums[name][0] += float(F.cross_entropy(logits, targets, reduction="sum"))
                sums[name][1] += float((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
    found = {
        f"dec_{metric}_{name}_h": sums[name][i] / count
        for name in sums
        for i, metric in enumerate(("loss", "acc"))
    }
    return {**found, "h_cosine_between_texts": sum(cosines) / len(cosines)}


def cls_cosine_between_texts(model: str, texts: list[str], seq_len: int) -> float:
    """Mean cosine between the [CLS] vectors of different texts: near 1, every text gets one vector."""
    import torch

    from ember_train.models import Encoder

    encoder = Encoder.from_pretrained(model, pooling="cls", normalize=True, max_seq_length=seq_len)
    with torch.no_grad():
        unit = encoder.encode(texts, batch_size=64)
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / (n * (n - 1)))


def unigram_entropy(corpus: Path, model: str, seq_len: int) -> float:
    """Entropy (nats) of the pretraining tokens' frequencies: an MLM loss at this level has
    learned token counts and no context."""
    import math
    from collections import Counter

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    ids = tokenizer(texts, truncation=True, max_length=seq_len, add_special_tokens=False)["input_ids"]
    counts = Counter(token for row in ids for token in row)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def diagnose(
    results: dict, seed_dirs: dict[int, Path], dev: Path, corpus: Path, args: argparse.Namespace
) -> dict:
    dev_texts = [json.loads(line)["pos"] for line in dev.read_text().splitlines()][:256]
    found: dict = {}
    first_init = seed_dirs[args.seeds[0]] / "init"
    if first_init.is_dir():
        found["unigram_entropy"] = unigram_entropy(corpus, str(first_init), args.seq_len)
        print(f"diagnostics: unigram entropy of the pretraining tokens {found['unigram_entropy']:.3f} nats")
    for seed in args.seeds:
        for arm in ARMS:
            model = seed_dirs[seed] / ("init" if arm == "none" else f"{arm}/final")
            if f"{arm}/{seed}" not in results or not model.is_dir():
                continue
            record = {
                f"zero_shot_ndcg@10/{pooling}": zero_shot_ndcg(str(model), pooling, dev, args.seq_len)
                for pooling in args.poolings
            }
            record["cls_cosine_between_texts"] = cls_cosine_between_texts(str(model), dev_texts, args.seq_len)
            if arm == "retromae":
                record.update(decoder_reliance(seed_dirs[seed] / arm / "pretrained", dev_texts, seed, args))
            found[f"{arm}/{seed}"] = record
            print(
                f"diagnostics {arm}/{seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in record.items()),
                flush=True,
            )
    return found


def summarize(results: dict, args: argparse.Namespace) -> str:
    """Per contrastive pooling: mean ± std per arm over the seeds done, and the paired margins
    (same seed, same init)."""

    def mean_std(values: list[float]) -> str:
        if not values:
            return "-"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    pretrain = f"{args.pretrain_steps} × {args.pretrain_batch}"
    tables = []
    for pooling in args.poolings:
        metric = f"ndcg@10/{pooling}"
        by_arm = {
            arm: [r[metric] for r in results.values() if r["arm"] == arm and metric in r] for arm in ARMS
        }
        rows = [
            [
                arm,
                "0" if arm == "none" else pretrain,
                mean_std(by_arm[arm]),
                len(by_arm[arm]),
                ", ".join(f"{v:.2f}" for v in by_arm[arm]),
            ]
            for arm in ARMS
        ]
        table = markdown_table(
            ["arm", "pretraining steps × batch", f"nDCG@10, {pooling} pooling", "seeds", "per seed"],
            rows,
            "llrrl",
        )
        margins = []
        for better, worse in (("retromae", "mlm"), ("mlm", "none"), ("retromae", "none")):
            diffs = [
                results[f"{better}/{seed}"][metric] - results[f"{worse}/{seed}"][metric]
                for seed in args.seeds
                if metric in results.get(f"{better}/{seed}", {})
                and metric in results.get(f"{worse}/{seed}", {})
            ]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                margins.append([f"{better} − {worse}", mean_std(diffs), f"{wins}/{len(diffs)}"])
        tables.append(
            table + "\n\n" + markdown_table(["margin (paired by seed)", "mean ± std", "wins"], margins, "lrr")
        )
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with train.jsonl.gz and dev.jsonl.gz"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/retromae_reproduction"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--fresh", action="store_true", help="redo runs already in results.json")
    parser.add_argument("--collect", type=Path, nargs="*", default=[], help="other work folders to merge")
    parser.add_argument(
        "--diagnose", action="store_true", help="also the zero-shot and decoder-reliance checks"
    )
    parser.add_argument(
        "--tokenizer-vocab",
        type=int,
        default=8192,
        help="train a WordPiece vocabulary of this size on the pretraining texts (0: MiniLM's 30,522)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--pretrain-texts", type=int, default=40000)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--encoder-mask-ratio", type=float, default=0.3)
    parser.add_argument("--decoder-mask-ratio", type=float, default=0.5)
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--dev-pairs", type=int, default=500)
    parser.add_argument("--contrastive-steps", type=int, default=600)
    parser.add_argument("--contrastive-batch", type=int, default=32)
    parser.add_argument("--contrastive-lr", type=float, default=1e-3)
    parser.add_argument("--contrastive-temperature", type=float, default=0.05)
    parser.add_argument(
        "--poolings",
        nargs="+",
        default=["cls", "mean"],
        choices=["cls", "mean"],
        help="one contrastive run per pooling and arm (cls is what RetroMAE trains)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from ember_train.pipelines.contrastive import run as run_contrastive
    from ember_train.pipelines.retromae import run as run_retromae

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    work = args.work
    train, dev, corpus = prepare_data(args)
    tokenizer = make_tokenizer(corpus, work, args.tokenizer_vocab)
    results_file = work / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results: dict = {} if args.fresh else saved.get("runs", {})
    diagnostics: dict = {} if args.fresh else saved.get("diagnostics", {})
    seed_dirs = {seed: work / f"seed{seed}" for seed in args.seeds}
    for other in args.collect:
        found = json.loads((other / "results.json").read_text())
        results.update(found["runs"])
        diagnostics.update(found.get("diagnostics", {}))
        seed_dirs.update({r["seed"]: other / f"seed{r['seed']}" for r in found["runs"].values()})

    def save() -> None:
        summary = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "runs": results,
            "diagnostics": diagnostics,
        }
        results_file.write_text(json.dumps(summary, indent=2) + "\n")

    metrics = [f"ndcg@10/{pooling}" for pooling in args.poolings]
    for seed in args.seeds:
        if all(m in results.get(f"{arm}/{seed}", {}) for arm in args.arms for m in metrics):
            continue
        init = make_random_bert(work / f"seed{seed}" / "init", tokenizer, args, seed)
        for arm in args.arms:
            key = f"{arm}/{seed}"
            record: dict = results.get(key, {"arm": arm, "seed": seed})
            model = str(init) if arm == "none" else str(seed_dirs[seed] / arm / "final")
            pretrained = seed_dirs[seed] / arm
            if arm == "none" or "pretrain_seconds" in record:
                pass
            elif (pretrained / "results.json").is_file() and (pretrained / "final").is_dir():
                # An interrupted run: the pretraining finished, reuse it.
                done = json.loads((pretrained / "results.json").read_text())
                record["pretrain_seconds"] = done["train_seconds"]
                record["pretrain_last_metrics"] = done["last_metrics"]
            else:
                fresh_accelerate_state()
                start = time.perf_counter()
                out = run_retromae(pretrain_config(init, corpus, pretrained, arm, seed, args))
                record["pretrain_seconds"] = time.perf_counter() - start
                record["pretrain_last_metrics"] = out["last_metrics"]
                model = out["export_dir"]
            for pooling in args.poolings:
                metric = f"ndcg@10/{pooling}"
                if metric in record:
                    continue
                fresh_accelerate_state()
                start = time.perf_counter()
                out_dir = work / f"seed{seed}" / f"{arm}_contrastive_{pooling}"
                out = run_contrastive(contrastive_config(model, pooling, train, dev, out_dir, seed, args))
                record[f"contrastive_seconds/{pooling}"] = time.perf_counter() - start
                record[metric] = out["eval_after"][0]["metrics"]["ndcg@10"]
                results[key] = record
                save()
                print(f"[{time.strftime('%H:%M:%S')}] {key}: {metric}={record[metric]:.2f}", flush=True)

    if args.diagnose:
        diagnostics.update(diagnose(results, seed_dirs, dev, corpus, args))
        save()
    print(summarize(results, args))


if __name__ == "__main__":
    main()
