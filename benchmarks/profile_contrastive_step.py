"""Where a contrastive training step spends its CPU time: the torch profiler over real steps.

    python -m benchmarks.profile_contrastive_step --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --batch-size 32 --steps 12 --warmup-steps 2

Builds the step from the pipeline's own pieces (encoder, sharded sampler, collator,
InfoNCE loss step, fused AdamW from the training loop) on the packaged all-MiniLM-L6-v2, fp32,
profiles ``--steps`` optimizer steps after ``--warmup-steps`` untimed ones, and prints the share of
self CPU time per group of operators (matmuls, dropout, element-wise, optimizer, ...) and the top
operators. This explains the model FLOP utilisation that ``benchmarks.bench_contrastive`` reports.

``--count-host-reads`` counts, by source line, the device values one loss step (forward, loss,
backward) reads back to the host (``.item()``, ``int(t)``, ``if t:``, ``.tolist()``, ...: see
``ember_train.training.host_reads``), each of which makes the host wait for a GPU; the loop's
own read (one per optimizer step) is not in this step.

``--time-ops`` then re-runs the steps without the profiler and times each call of the named
operators with a dispatch mode, with the minor page faults it took: what an operator whose cost
is page faults (the word-embedding gradient's fresh 47 MB) costs call by call.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import add_batch_arguments, contrastive_batches
from ember_train.training.host_reads import HostReadCounter

GROUPS = {
    "matmul (mm, addmm, bmm)": {"aten::mm", "aten::addmm", "aten::bmm"},
    "dropout (random masks, masking)": {
        "aten::bernoulli_",
        "ember_train::keep_mask",
        "ember_train::dropout_kernel",
        "aten::random_",
        "aten::lt",
        "aten::mul",
        "aten::mul_",
        "aten::div_",
    },
    "GELU, softmax, LayerNorm (fwd+bwd)": {
        "aten::gelu",
        "aten::gelu_backward",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
    },
    "optimizer (fused AdamW)": {"aten::_fused_adamw_"},
    "copies, fills, sums, adds": {"aten::copy_", "aten::fill_", "aten::sum", "aten::add", "aten::add_"},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_batch_arguments(parser)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--group-by-length", action="store_true", help="length-grouped batches (data.group_by_length)"
    )
    parser.add_argument("--rows", type=int, default=15, help="top operators to print")
    parser.add_argument(
        "--by-shape",
        default="",
        help="comma-separated operators (e.g. aten::fill_,aten::copy_) to break down by input shape",
    )
    parser.add_argument(
        "--time-ops",
        default="",
        help="comma-separated operators (e.g. aten::embedding_dense_backward) to time without the profiler",
    )
    parser.add_argument(
        "--count-host-reads",
        action="store_true",
        help="count device values read on the host in one loss step",
    )
    parser.add_argument(
        "--torch-dropout", action="store_true", help="PyTorch's dropout masks (train.fast_cpu_dropout: false)"
    )
    parser.add_argument(
        "--dense-embedding-grad",
        action="store_true",
        help="a fresh dense word-embedding gradient per forward call (train.fast_cpu_embedding_grad: false)",
    )
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ember_train.losses.infonce import InfoNCELoss
    from ember_train.pipelines.contrastive import make_loss_step
    from ember_train.speedups.dropout import use_fast_cpu_dropout
    from ember_train.speedups.embedding_grad import EmbeddingGradBuffer
    from ember_train.training.optimizer import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, encoder, batches = contrastive_batches(
            args.pairs,
            batch_size=args.batch_size,
            num_batches=args.steps + args.warmup_steps,
            max_length=args.max_length,
            group_by_length=args.group_by_length,
            tmp=Path(tmp),
            pack=not args.padded,
        )

    if not args.torch_dropout:
        use_fast_cpu_dropout(encoder)  # what the training loop does on CPU (train.fast_cpu_dropout)
    optimizer = build_optimizer(encoder, cfg.train)
    # The loop's persistent word-embedding gradient on CPU (train.fast_cpu_embedding_grad).
    grad_buffer = None if args.dense_embedding_grad else EmbeddingGradBuffer.for_model(encoder)
    loss_step = make_loss_step(InfoNCELoss(cfg.loss.temperature, cfg.loss.symmetric))
    encoder.train()

    def step(batch: dict) -> None:
        if grad_buffer is not None:
            grad_buffer.attach()
        loss, _ = loss_step(encoder, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[: args.warmup_steps]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(args.by_shape)) as prof:
        for batch in batches[args.warmup_steps :]:
            step(batch)

    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = defaultdict(float)
    for event in events:
        group = next((g for g, names in GROUPS.items() if event.key in names), "other")
        shares[group] += event.self_cpu_time_total / total_us
    print(
        f"{len(batches) - args.warmup_steps} steps of batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print("| operators | share of self CPU time |\n|---|---:|")
    for group, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {100 * share:.1f}% |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for name in filter(None, args.by_shape.split(",")):
        shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == name]
        for e in sorted(shaped, key=lambda e: -e.self_cpu_time_total)[:5]:
            per_call = e.self_cpu_time_total / e.count / 1e3
            print(f"{name} {e.input_shapes}: {e.count} calls, {per_call:.2f} ms per call")
    if args.time_ops:
        time_ops(step, batches[args.warmup_steps :], set(args.time_ops.split(",")))
    if args.count_host_reads:
        count_host_reads(lambda batch: loss_step(encoder, batch)[0].backward(), batches[-1])


def count_host_reads(loss_step_and_backward, batch: dict) -> None:
    """Print how many device values one loss step reads on the host, by the line that reads them."""
    with HostReadCounter() as reads:
        loss_step_and_backward(batch)
    print(f"\nhost reads in one loss step: {reads.total}")
    for where, count in reads.by_line.most_common():
        print(f"{count:4d}  {where}")


def time_ops(step, batches: list[dict], names: set[str]) -> None:
    """Wall time and minor page faults per call of the ``names`` operators, over ``batches`` steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name().split(".")[0]
            if name not in names:
                return func(*args, **(kwargs or {}))
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            out = func(*args, **(kwargs or {}))
            seconds = time.perf_counter() - start
            shape = str(list(out.shape)) if hasattr(out, "shape") else "-"  # the result's shape
            calls[name, shape].append((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
            return out

    step_seconds = []
    for batch in batches:
        start = time.perf_counter()
        with OpTimer():
            step(batch)
        step_seconds.append(time.perf_counter() - start)
    print(f"\nwithout the profiler: {statistics.median(step_seconds):.3f} s per step (median)")
    top = sorted(calls.items(), key=lambda kv: -sum(s for s, _ in kv[1]))[:10]
    for (name, shape), timed in top:
        ms = [1e3 * s for s, _ in timed]
        print(
            f"{name} -> {shape}: {len(ms)} calls, {statistics.median(ms):.2f} ms per call (median; "
            f"{min(ms):.2f}-{max(ms):.2f}), {sum(ms) / len(step_seconds):.1f} ms per step, "
            f"page faults per call {min(f for _, f in timed)}-{max(f for _, f in timed)}"
        )


if __name__ == "__main__":
    main()
