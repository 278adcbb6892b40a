"""Contrastive training throughput: ember-train vs sentence-transformers' trainer, side by side.

    python -m benchmarks.bench_contrastive --pairs ../shared/data/debian-packages/train.jsonl.gz \
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from benchmarks.common import (
    DEBIAN_TRAIN,
    MODEL,
    REPO,
    fresh_accelerate_state,
    load_debian_pairs,
    matmul_peak,
    quartiles,
    resolve_model,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

PRECISIONS = ("fp32", "bf16", "fp16")  # fp16: GPUs only (loss scaling; very slow on CPUs)


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
    padded_slices: int = 2,
    peak_every_step: bool = False,
    launch: str | None = None,
) -> float:
    """One ember-train run; ``processes > 1`` launches ``train.py`` under ``accelerate launch``
    (one torch thread each, gathered negatives) with the same *global* batch; ``threads`` runs one
    process of ``train.py`` of its own with that many torch threads. ``peak_every_step`` (in-process
    runs only) adds each timed step's tokens/s and the fp32 peak beside it
    (:func:`peaks_between_steps`). ``launch="accelerate"`` runs the command a user types,
    ``accelerate launch train.py`` (no thread flag, the launch config scripts/setup.sh writes);
    ``launch="accelerate-threads"`` adds ``--num_cpu_threads_per_process`` = the physical cores."""
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
    if launch is not None:
        from ember_train.training.hardware import physical_cores

        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if launch == "accelerate-threads":
            cmd += ["--num_cpu_threads_per_process", str(physical_cores())]
        cmd += [str(REPO / "train.py"), "--config", str(cfg_path)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user's shell has it
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
    elif processes == 1 and threads is None:
        fresh_accelerate_state()
        with peaks_between_steps(step_peaks) if peak_every_step else nullcontext():
            contrastive.run(load_config(str(cfg_path)))
    elif processes == 1:
        cmd = [sys.executable, str(REPO / "train.py"), "--config", str(cfg_path)]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
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


LAST_EMBER_STATS: dict[str, float] = {}


def training_flops_per_token(pairs: list[dict], max_length: int, model: str = MODEL) -> float:
    """6 x non-embedding parameters + attention (fwd+bwd), per real token, for a BERT-like model.

    A token's attention FLOPs grow with the length of its own text, so the attention term uses
    the token-weighted mean length sum(l^2) / sum(l) of the pairs' queries and positives (truncated
    to ``max_length``), not ``max_length``: that would count attention to padding that no
    length-aware run computes (about 2% more FLOPs for MiniLM on Debian pairs at 128 tokens).
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(model)
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

    fresh_accelerate_state()
    cuda = torch.cuda.is_available()
    model = SentenceTransformer(resolve_model(model_name), device="cuda" if cuda else "cpu")
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
    launch: str | None = None  # None (in-process) | accelerate | accelerate-threads


def parse_variant(spec: str) -> Variant:
    """``ember:fp32+grouped+2proc`` -> Variant("ember", "fp32", True, 2, None, True, "auto", None).

    Extras (ember-train only): ``grouped`` (length-aware batching), ``2proc`` (two processes with
    one thread each, gathered negatives), ``1thread`` (one process, one torch thread),
    ``torchdropout`` (PyTorch's dropout masks: ``train.fast_cpu_dropout: false``), ``padded``
    (two padded length-sorted slices per side: ``train.pack_sequences: false``), ``packed``
    (padding-free rows on any device: ``train.pack_sequences: true``; without either, ``auto``:
    packed on CPU, padded on GPUs), ``1slice`` (padded batches in one slice per side, the fewest
    forward calls: ``train.padded_slices: 1``), ``noattndrop`` (no attention-probability dropout:
    ``model.attention_dropout: 0``), ``launch`` (``accelerate launch train.py`` as the README types
    it), ``launchthreads`` (the same with ``--num_cpu_threads_per_process`` = the physical cores).
    """
    side, _, rest = spec.partition(":")
    precision, *extras = rest.split("+")
    if (
        side not in ("ember", "st")
        or precision not in PRECISIONS
        or set(extras)
        - {"grouped", "2proc", "1thread", "torchdropout", "padded", "packed", "1slice", "noattndrop"}
        - {"launch", "launchthreads"}
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
        launch="accelerate"
        if "launch" in extras
        else "accelerate-threads"
        if "launchthreads" in extras
        else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, default=DEBIAN_TRAIN)
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
            pairs_file = write_jsonl(tmp / f"pairs_{batch_size}.jsonl", epoch)
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
                                launch=variant.launch,
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
