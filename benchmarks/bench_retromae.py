"""RetroMAE throughput and model FLOP utilisation on this machine, plus the decoder-mask memory.

    python -m benchmarks.bench_retromae --corpus /work/shared/data/debian-packages/train.jsonl.gz \
        --text-field long

For the packaged all-MiniLM-L6-v2 (+ MLM head + one-layer decoder) at 128 and 512 tokens:
training steps (forward, backward, AdamW) on full-length packed sequences, timed after a
warm-up. FLOPs per step are counted by ``torch.utils.flop_counter`` on a real step (every
matmul and attention of the encoder, MLM head and decoder, forward and backward), so MFU =
counted FLOPs / step time / fp32 matmul peak. The peak is the best of repeated 2048² fp32
matmuls at the same thread count, measured right before and after every timed step (the machine
is shared, so the per-step ratio is reported, with its spread) and at the start and end of the
run. Mask memory: the decoder's B×L×L boolean mask at batch 32 × 512, computed and measured
with the profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from benchmarks.common import MODEL, matmul_peak, read_jsonl, resolve_model


def _sdpa_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # Model FLOPs: backward = 2 × forward (no credit for the kernel's recomputation).
    return 2 * sdpa_flop_count(query, key, value)


# torch's counter has no formula for the CPU attention kernel; count it like any other attention.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def cpu_peak(repeats: int = 10) -> float:
    """Best-of-``repeats`` fp32 FLOP/s of a 2048² matmul on the CPU, without a time budget."""
    return matmul_peak(torch.float32, repeats=repeats, budget_s=float("inf"), cuda=False)


def bench_length(model, texts: list[str], seq_len: int, batch_size: int, steps: int) -> dict:
    from ember_train.config import TrainConfig
    from ember_train.data.masking import RetroMAECollator
    from ember_train.data.text_corpus import filter_and_pack, token_lengths
    from ember_train.losses.retromae import RetroMAELoss
    from ember_train.training.optimizer import build_optimizer

    tokenizer = model.tokenizer
    budget = seq_len - tokenizer.num_special_tokens_to_add(pair=False)
    # Packed sequences so (nearly) every row is full length: tokens/s counts real tokens.
    packed = [
        t for t, n in filter_and_pack(texts, token_lengths(tokenizer), pack_to=budget) if n >= budget * 0.9
    ]
    collator = RetroMAECollator(tokenizer, max_seq_length=seq_len, seed=0)
    batches = [
        collator([{"text": t, "key": (0, i)} for t in packed[i * batch_size : (i + 1) * batch_size]])
        for i in range(steps + 2)
    ]
    loss_fn = RetroMAELoss()
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-5))  # the loop's (fused) AdamW
    model.train()

    def step(batch) -> None:
        loss, _ = loss_fn(model(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss, _ = loss_fn(model(batches[0]))
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_first = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    step(batches[1])  # warm-up
    flops_per_token = flops_first / int(batches[0]["attention_mask"].sum())
    times, tokens, ratios = [], [], []
    for batch in batches[2:]:
        # The machine is shared: bracket every step with a short peak measurement and take the
        # ratio step by step, so a change of load hits numerator and denominator alike.
        peak_a = cpu_peak(repeats=3)
        start = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - start
        peak_b = cpu_peak(repeats=3)
        n = int(batch["attention_mask"].sum())
        times.append(seconds)
        tokens.append(n)
        ratios.append(n * flops_per_token / seconds / ((peak_a + peak_b) / 2))
    seconds = sum(times)
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": len(times),
        "tokens_per_s": sum(tokens) / seconds,
        "seconds_per_step": seconds / len(times),
        "best_step_s": min(times),
        "flops_per_token": flops_per_token,
        "mfu_per_step": ratios,
        "mfu_median": statistics.median(ratios),
        "fill": sum(tokens) / (len(times) * batch_size * seq_len),
        "flops_by_op": by_op,
    }


def mask_memory(batch_size: int = 32, seq_len: int = 512) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from ember_train.models.retromae import decoder_attention_mask, mask_memory_bytes

    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    # Words of 1-3 tokens, as in English WordPiece text.
    word_len = torch.randint(1, 4, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    groups = torch.cumsum((torch.cumsum(word_len, 1) % 2 == 0).long(), 1)
    groups[:, 0] = -1
    groups[:, -1] = -1
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mask = decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    num_groups = int(groups.max()) + 2
    return {
        "shape": list(mask.shape),
        "mask_bytes": mask.numel() * mask.element_size(),
        "formula_bytes": mask_memory_bytes(batch_size, seq_len, num_groups),
        "formula_bytes_upper": mask_memory_bytes(batch_size, seq_len),
        "measured_peak_bytes": peak,
        "dense_int64_bytes": batch_size * seq_len * seq_len * 8,
        "build_seconds_with_profiler": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, required=True, help="JSONL(.gz) with the texts")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-128", type=int, default=16)
    parser.add_argument("--batch-512", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--dropout",
        default="fast",
        help="comma-separated, run side by side: fast (ember-train's CPU dropout, what training "
        "uses: train.fast_cpu_dropout) and/or torch (PyTorch's dropout and SDPA)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from ember_train.models.retromae import RetroMAEModel
    from ember_train.speedups.dropout import use_fast_cpu_dropout

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    texts = [row[args.text_field] for row in read_jsonl(args.corpus, limit=6000)]
    peak_before = cpu_peak()
    results = {
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "peak_before": peak_before,
        "runs": [],
    }
    for seq_len, batch_size in ((128, args.batch_128), (512, args.batch_512)):
        for dropout in args.dropout.split(","):
            model = RetroMAEModel.from_pretrained(resolve_model(args.model), max_seq_length=seq_len)
            if dropout == "fast":
                use_fast_cpu_dropout(model)
            elif dropout != "torch":
                parser.error(f"--dropout: unknown {dropout!r}")
            run = bench_length(model, texts, seq_len, batch_size, args.steps)
            results["runs"].append({"dropout": dropout, **run})
    results["peak_after"] = peak_after = cpu_peak()
    results["mask_memory"] = mask_memory()

    peak = max(peak_before, peak_after)
    load = ", ".join(f"{x:.1f}" for x in results["load_average"])
    print(f"torch threads: {results['threads']}; machine load average at start (1/5/15 min): {load}")
    print(
        f"fp32 matmul peak (2048^2, best of 10): before {peak_before / 1e9:.1f} GFLOP/s, after {peak_after / 1e9:.1f}"
    )
    print(
        "| seq len | batch | dropout | fill | tokens/s | s/step | GFLOP/token (fwd+bwd) | achieved GFLOP/s | "
        "MFU: median per-step ratio (min-max) | MFU vs best start/end peak |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        r["achieved_flops"] = achieved
        r["mfu_vs_best_peak"] = achieved / peak
        spread = f"{min(r['mfu_per_step']):.0%}-{max(r['mfu_per_step']):.0%}"
        print(
            f"| {r['seq_len']} | {r['batch_size']} | {r['dropout']} | {r['fill']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['seconds_per_step']:.2f} | {r['flops_per_token'] / 1e9:.3f} | {achieved / 1e9:.1f} | "
            f"{r['mfu_median']:.1%} ({spread}) | {r['mfu_vs_best_peak']:.1%} |"
        )
    m = results["mask_memory"]
    print(
        f"decoder mask at {m['shape']}: mask {m['mask_bytes'] / 2**20:.1f} MiB; "
        f"formula peak {m['formula_bytes'] / 2**20:.1f} MiB (upper bound {m['formula_bytes_upper'] / 2**20:.1f}); "
        f"measured peak {m['measured_peak_bytes'] / 2**20:.1f} MiB; a dense int64 B×L×L would be "
        f"{m['dense_int64_bytes'] / 2**20:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
