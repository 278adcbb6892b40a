"""Gradient cache: peak memory vs global batch, and time overhead vs plain training.

    python -m benchmarks.bench_grad_cache --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --batches 32,256,1024 --chunk 32 --max-length 32 --overhead-batch 64 --steps 2

Each configuration trains the packaged all-MiniLM-L6-v2 for a few steps in its own process
(so peak RSS is that configuration's alone): (1) with the gradient cache at each global batch
size, (2) plain training at the batch sizes that fit, and (3) plain vs cached at one batch size,
alternating, for the time overhead. Prints a Markdown table. On a machine with a CUDA GPU the
runs train there and the memory reported is the GPU's peak allocation (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import DEBIAN_TRAIN, MODEL, REPO, read_jsonl, write_jsonl


def child(args: argparse.Namespace) -> None:
    """Train and print peak RSS (MiB) and seconds per step, as JSON."""
    from ember_train.pipelines import contrastive, load_config

    out = Path(args.out)
    cfg_path = out / "bench.yaml"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {out / 'run'}\nseed: 0\n"
        f"model: {{name_or_path: '{args.model}', max_seq_length: {args.max_length}, normalize: true}}\n"
        f"data: {{train: '{args.pairs_file}'}}\nloss: {{temperature: 0.05}}\n"
        f"train: {{batch_size: {args.batch}, max_steps: {args.steps}, log_every: 1, resume: none,"
        f" grad_cache_chunk_size: {args.chunk}, keep_checkpoints: 1, mixed_precision: '{args.precision}'}}\n"
        "export: {enabled: false}\n"
    )
    contrastive.run(load_config(str(cfg_path)))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [args.batch / r["samples_per_s"] for r in records if "samples_per_s" in r]
    timed = step_seconds[1:] or step_seconds  # the first step includes warm-up
    import torch

    if torch.cuda.is_available():
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"peak_mib": peak_mib, "seconds_per_step": sum(timed) / len(timed)}))


def run_child(
    args: argparse.Namespace, pairs_file: Path, batch: int, chunk: int, steps: int, tmp: Path
) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_grad_cache",
        "--child",
        "--pairs-file",
        str(pairs_file),
        "--batch",
        str(batch),
        "--chunk",
        str(chunk),
        "--steps",
        str(steps),
        "--max-length",
        str(args.max_length),
        "--model",
        args.model,
        "--precision",
        args.precision,
        "--out",
        str(out),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(done.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=Path, default=DEBIAN_TRAIN)
    parser.add_argument("--batches", default="32,256,1024")
    parser.add_argument("--plain-batches", default="32,256", help="plain training sizes (1024 needs ~10+ GB)")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--overhead-batch", type=int, default=64)
    parser.add_argument("--overhead-repeats", type=int, default=2)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows = [r for r in read_jsonl(args.pairs) if r["short"].strip() and r["long"].strip()]
    random.Random(0).shuffle(rows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs_file = write_jsonl(
            tmp / "pairs.jsonl", ({"query": r["short"], "pos": r["long"]} for r in rows[:20000])
        )

        import torch

        cuda = torch.cuda.is_available()
        memory = "GPU peak allocated" if cuda else "peak RSS"
        print(
            f"max_length {args.max_length}, chunk {args.chunk}, {args.steps} steps per run (first not timed), "
            f"precision {args.precision}, {torch.cuda.get_device_name() if cuda else 'CPU'}"
        )
        print(f"\n| global batch | grad cache {memory} (MiB) | plain {memory} (MiB) |\n|---|---|---|")
        cached_peaks = []
        for batch in [int(b) for b in args.batches.split(",")]:
            cached = run_child(args, pairs_file, batch, args.chunk, args.steps, tmp)
            cached_peaks.append(cached["peak_mib"])
            plain = "-"
            if str(batch) in args.plain_batches.split(","):
                plain = f"{run_child(args, pairs_file, batch, 0, args.steps, tmp)['peak_mib']:.0f}"
            print(f"| {batch} | {cached['peak_mib']:.0f} | {plain} |", flush=True)
        print(f"\ngrad cache {memory}, largest / smallest batch: {cached_peaks[-1] / cached_peaks[0]:.2f}x")

        ratios = []
        for repeat in range(args.overhead_repeats):
            # Alternate which runs first, so a trend in machine load does not favour one side.
            runs = {}
            for chunk in (0, args.chunk) if repeat % 2 == 0 else (args.chunk, 0):
                runs[chunk] = run_child(args, pairs_file, args.overhead_batch, chunk, args.steps + 1, tmp)
            plain, cached = runs[0], runs[args.chunk]
            ratios.append(cached["seconds_per_step"] / plain["seconds_per_step"])
            print(
                f"batch {args.overhead_batch}: plain {plain['seconds_per_step']:.2f} s/step, "
                f"grad cache {cached['seconds_per_step']:.2f} s/step, overhead {ratios[-1]:.2f}x",
                flush=True,
            )
        print(f"grad cache time overhead: mean {sum(ratios) / len(ratios):.2f}x over {len(ratios)} repeats")


if __name__ == "__main__":
    main()
