"""Two processes vs one: contrastive training throughput on this machine, side by side.

    python scripts/bench_two_process.py --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --global-batch 32 --steps 10 --warmup-steps 2 --repeats 2

Same global batch, model (packaged all-MiniLM-L6-v2), Debian ``short -> long`` pairs and max
length, run through ``train.py`` as a user would:

* ``1proc-2threads``: ``python train.py`` (one process, both cores' torch threads);
* ``2proc-1thread``: ``accelerate launch --multi_gpu --num_processes 2 --num_cpu_threads_per_process 1``
  with ``loss.gather_across_devices: true`` (gloo; each process holds half the batch and scores it
  against all documents of both);
* ``1proc-1thread``: one process, one thread (the per-core baseline).

On a 2-core machine this measures the overhead of data parallelism (gather, gradient all-reduce,
two Python processes), not a speed-up. Runs alternate order per repeat; the first
``--warmup-steps`` steps of each run are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_contrastive import MODEL, load_debian_pairs  # noqa: E402

VARIANTS = ("1proc-2threads", "2proc-1thread", "1proc-1thread")


def command(variant: str, config: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    train = [str(REPO / "train.py"), "--config", str(config)]
    if variant == "2proc-1thread":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        launch += ["--num_cpu_threads_per_process", "1", "--main_process_port", "0"]
        return launch + train, {**env, "CUDA_VISIBLE_DEVICES": ""}
    threads = "2" if variant == "1proc-2threads" else "1"
    return [sys.executable, *train], {**env, "OMP_NUM_THREADS": threads}


def run(variant: str, pairs: Path, out: Path, global_batch: int, steps: int, max_length: int) -> list[dict]:
    processes = 2 if variant.startswith("2proc") else 1
    config = out / "bench.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f"task: contrastive\noutput_dir: {out / 'run'}\nseed: 0\n"
        f"model: {{name_or_path: '{MODEL}', max_seq_length: {max_length}, normalize: true}}\n"
        f"data: {{train: '{pairs}'}}\n"
        f"loss: {{temperature: 0.05, gather_across_devices: {'true' if processes > 1 else 'false'}}}\n"
        f"train: {{batch_size: {global_batch // processes}, max_steps: {steps}, log_every: 1,"
        " resume: none, keep_checkpoints: 1, checkpoint_every: 100000}\n"
        "export: {enabled: false}\n"
    )
    cmd, env = command(variant, config)
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "samples_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=Path, default=REPO.parent / "shared/data/debian-packages/train.jsonl.gz"
    )
    parser.add_argument("--num-pairs", type=int, default=4000)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = tmp / "pairs.jsonl"
        rows = load_debian_pairs(args.pairs, args.num_pairs, seed=0)
        pairs.write_text("".join(json.dumps(p) + "\n" for p in rows))
        for r in range(args.repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                timed = run(v, pairs, tmp / f"{v}_{r}", args.global_batch, args.steps, args.max_length)
                timed = timed[args.warmup_steps :]
                # Each record's rate is global (the logger scales by the process count) over one step.
                seconds = sum(args.global_batch / rec["samples_per_s"] for rec in timed)
                speeds[v].append(args.global_batch * len(timed) / seconds)
                print(f"repeat {r}: {v} {speeds[v][-1]:.2f} samples/s", flush=True)
    base = variants[0]
    print(f"\n| variant | samples/s (mean) | ratio vs {base} (min-max over repeats) |\n|---|---:|---|")
    for v in variants:
        ratios = [a / b for a, b in zip(speeds[v], speeds[base], strict=True)]
        print(
            f"| {v} | {statistics.mean(speeds[v]):.2f} | {statistics.mean(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
