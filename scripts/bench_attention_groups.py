"""How many attention blocks a packed row should be cut into: one layer's attention, timed.

    python scripts/bench_attention_groups.py --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --steps 6 --groups 2,3,4 --repeats 11            # add --group-by-length for grouped batches

Packed rows (:mod:`ember_train.encoder.packing`) keep attention per text by regrouping each side's
tokens into padded blocks. Attention work grows with a block's texts x width^2, so more blocks pad
less, but each block costs a dozen more operator calls forward and backward. This takes the
packed sides of ``--steps`` real contrastive batches (the pipeline's own collator, all-MiniLM-L6-v2's
tokenizer), cuts each into 1..k blocks as :func:`~ember_train.encoder.encoder.padding_optimal_cuts`
does, and times forward + backward of one attention layer's core over all of them (random
queries, keys and values of MiniLM's shape, 12 heads x 32, attention dropout 0.1 through
``FastCPUDropout`` as in CPU training), the block counts alternating within each repeat. Prints
the padded attention area against the real one and the median time per block count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contrastive import REPO, add_batch_arguments, batches_from_arguments  # noqa: E402

sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_batch_arguments(parser)
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--groups", default="2,3,4", help="block counts to compare")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (the first is not counted)")
    args = parser.parse_args()

    import torch
    from torch import nn

    from ember_train.data.batching import padding_optimal_cuts
    from ember_train.models.attention import ember_attention
    from ember_train.models.packing import PACKED_KEY, PackedLayout
    from ember_train.speedups.dropout import FastCPUDropout

    _, _, batches = batches_from_arguments(args, group_by_length=args.group_by_length)
    rows = [f[PACKED_KEY] for b in batches for side in ("query", "documents") for f in b[side]]
    heads, head_dim, p = 12, 32, 0.1

    class Attention(nn.Module):  # what ember_attention reads from a BERT self-attention module
        is_causal = False

        def __init__(self) -> None:
            super().__init__()
            self.dropout = FastCPUDropout(p)

    module = Attention().train()
    counts = [int(k) for k in args.groups.split(",")]
    layouts, area = {}, {}
    for k in counts:
        layouts[k], padded = [], 0
        for lengths in rows:
            ends = padding_optimal_cuts(lengths.tolist(), k)
            sizes = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            layouts[k].append(
                PackedLayout.from_features({PACKED_KEY: lengths, "group_sizes": torch.tensor(sizes)})
            )
            padded += sum(len(g[1]) * g[1].shape[1] ** 2 for g in layouts[k][-1].groups)
        area[k] = padded / sum(int((lengths**2).sum()) for lengths in rows)
    inputs = [
        [
            torch.randn(1, int(lengths.sum()), heads, head_dim).transpose(1, 2).requires_grad_()
            for _ in range(3)
        ]
        for lengths in rows
    ]

    def one_pass(k: int) -> float:
        start = time.perf_counter()
        for layout, (q, key, v) in zip(layouts[k], inputs, strict=True):
            out = layout.attend(ember_attention, module, q, key, v, dropout=p, scaling=head_dim**-0.5)
            out.sum().backward()
        return time.perf_counter() - start

    seconds: dict[int, list[float]] = {k: [] for k in counts}
    for r in range(args.repeats):
        for k in counts if r % 2 == 0 else counts[::-1]:
            seconds[k].append(one_pass(k))
    grouping = "length-grouped" if args.group_by_length else "not length-grouped"
    print(
        f"{len(rows)} packed sides of {args.steps} batches of {args.batch_size} ({grouping}), torch threads {torch.get_num_threads()}"
    )
    print(
        "| attention blocks per row | padded / real attention area | one layer fwd+bwd, median (ms) | vs first |"
    )
    print("|---:|---:|---:|---:|")
    base = statistics.median(seconds[counts[0]][1:])
    for k in counts:
        median = statistics.median(seconds[k][1:])
        print(f"| {k} | {area[k]:.3f} | {1e3 * median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
