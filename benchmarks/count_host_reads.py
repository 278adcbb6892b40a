"""Host reads of device values per optimizer step of a real contrastive training run.

    python -m benchmarks.count_host_reads --pairs data/quickstart/train.jsonl --layout padded,packed

Runs the contrastive pipeline (``contrastive.run``, the training loop included) twice per layout,
for ``--steps`` and for twice as many optimizer steps, and reports the difference per step, so
one-time reads (loading, the packing check, checkpoints) cancel out. Reads are counted by
:class:`ember_train.training.host_reads.HostReadCounter` (on a CPU it cannot tell a host tensor from
a device one, so packed batches show the layout's reads of host metadata too; batches are collated
in a data-loader worker, whose reads of host tensors are not counted). On a CUDA GPU the
run is also made under ``torch.cuda.set_sync_debug_mode("warn")`` and the synchronising CUDA calls
are counted: the number that matters there, with the Python lines that made them (a call made
during ``backward`` is attributed to the line that started the backward pass).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import MODEL, REPO
from ember_train.pipelines import contrastive, load_config
from ember_train.training.host_reads import HostReadCounter


def one_run(args: argparse.Namespace, layout: str, steps: int, out: Path) -> tuple[int, Counter | None]:
    """(counted host reads, CUDA synchronisations by source line, or None) of a run of ``steps`` steps."""
    pack = "true" if layout == "packed" else "false"
    cfg_path = out / f"{layout}_{steps}.yaml"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {out / f'{layout}_{steps}'}\nseed: 0\n"
        f"model: {{name_or_path: '{args.model}', max_seq_length: {args.max_length}}}\n"
        f"data: {{train: '{args.pairs}'}}\n"
        f"train: {{batch_size: {args.batch_size}, max_steps: {steps}, log_every: 1, resume: none,"
        f" pack_sequences: {pack}, fast_cpu_dropout: false, mixed_precision: '{args.precision}',"
        # Batches are collated in a loader worker: its reads are of host tensors, not the step's.
        " num_workers: 1}\n"
        "eval: {before_training: false}\nexport: {enabled: false}\n"
    )
    cfg = load_config(str(cfg_path))
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings(record=True) as caught, HostReadCounter() as reads:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            contrastive.run(cfg)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if not cuda:
        return reads.total, None
    return reads.total, Counter(
        f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, default=REPO / "data/quickstart/train.jsonl")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--layout", default="padded,packed", help="comma-separated: padded, packed")
    parser.add_argument("--steps", type=int, default=3, help="the shorter run; the longer has twice as many")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layout.split(","):
            short = one_run(args, layout, args.steps, Path(tmp))
            long = one_run(args, layout, 2 * args.steps, Path(tmp))
            per_step = (long[0] - short[0]) / args.steps
            sources = None if short[1] is None else long[1] - short[1]  # what the extra steps added
            rows.append((layout, per_step, sources))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, batch {args.batch_size}, max length {args.max_length}, precision {args.precision}")
    print("| layout | host reads per optimizer step (counted) | CUDA synchronisations per step |")
    print("|---|---:|---:|")
    for layout, per_step, sources in rows:
        syncs = "-" if sources is None else f"{sum(sources.values()) / args.steps:g}"
        print(f"| {layout} | {per_step:g} | {syncs} |")
    for layout, _, sources in rows:
        if sources:
            print(f"\n{layout}: synchronising CUDA calls per step, by the Python line that made them")
            for where, count in sources.most_common(12):
                print(f"  {count / args.steps:g}  {where}")


if __name__ == "__main__":
    main()
