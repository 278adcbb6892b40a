"""CPU dropout masks and contrastive padding, measured in one process.

    python -m benchmarks.bench_cpu_dropout --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --max-length 128 --group-by-length --steps 12

1. One mask of 32 x 12 x 128 x 128 elements (attention probabilities at batch 32): PyTorch's
   ``F.dropout`` against ember-train's ``fast_dropout`` (median of 10).
2. Padding of the contrastive batches per side: one padded batch against two length-sorted
   slices (what ``PairCollator`` does).
3. Training steps A/B: two copies of the packaged all-MiniLM-L6-v2, one with
   ``use_fast_cpu_dropout`` and one with PyTorch's dropout, stepped alternately on the same
   batches (packed rows, as training on CPU; ``--padded`` for padded slices; the first step of
   each not counted), so machine noise hits both. ``--versus`` swaps the second copy for the
   fast-dropout model with some dropout switched off, to measure what dropout costs, or with its
   word embeddings frozen (``--versus frozen-word-embeddings``), to measure what their gradient and
   optimizer update cost (measurement only: not training options), or (``--versus padded``) for
   the same model on padded slices of the same pairs, to measure what packing gains, or
   (``--versus no-kernel``) for the same dropout without its C kernel (the same masks made with
   NumPy and applied by torch: what a machine without a C compiler gets), or
   (``--versus dense-embedding-grad``) without the persistent word-embedding gradient buffer
   (``train.fast_cpu_embedding_grad: false``). Both copies otherwise train as the loop does on
   CPU, the buffer included:

    python -m benchmarks.bench_cpu_dropout --pairs ../shared/data/debian-packages/train.jsonl.gz \
        --max-length 128 --group-by-length --steps 13 --versus no-dropout
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import unittest.mock

from benchmarks.common import add_batch_arguments, batches_from_arguments, median_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_batch_arguments(parser)
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument(
        "--versus",
        default="torch-dropout",
        choices=[
            "torch-dropout",
            "no-dropout",
            "no-hidden-dropout",
            "no-attention-dropout",
            "frozen-word-embeddings",
            "padded",
            "no-kernel",
            "dense-embedding-grad",
        ],
        help="the model stepped against the CPU defaults",
    )
    args = parser.parse_args()

    import torch

    from ember_train.losses.infonce import InfoNCELoss
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import make_loss_step
    from ember_train.speedups import dropout_kernel
    from ember_train.speedups.dropout import fast_dropout, use_fast_cpu_dropout
    from ember_train.speedups.embedding_grad import EmbeddingGradBuffer
    from ember_train.training.loop import build_optimizer

    x = torch.randn(32, 12, 128, 128)
    torch_ms = median_ms(lambda: torch.nn.functional.dropout(x, 0.1, True))
    fast_ms = median_ms(lambda: fast_dropout(x, 0.1))
    print(f"mask of {x.numel():,} elements: F.dropout {torch_ms:.1f} ms, fast_dropout {fast_ms:.1f} ms")

    cfg, torch_encoder, padded_batches = batches_from_arguments(
        args, group_by_length=args.group_by_length, pack=False
    )
    batches = (
        padded_batches
        if args.padded
        else batches_from_arguments(args, group_by_length=args.group_by_length)[2]
    )
    fast_encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs()).train()
    use_fast_cpu_dropout(fast_encoder)
    other = torch_encoder
    if args.versus != "torch-dropout":  # the same fast-dropout model, changed as --versus says
        use_fast_cpu_dropout(other)
        if args.versus == "frozen-word-embeddings":
            other.backbone.get_input_embeddings().weight.requires_grad_(False)
        if args.versus.startswith("no-"):
            for name, module in other.named_modules():
                attention = name.endswith("attention.self.dropout")  # BERT's attention-probability dropout
                if isinstance(module, torch.nn.Dropout) and (
                    args.versus == "no-dropout" or attention == (args.versus == "no-attention-dropout")
                ):
                    module.p = 0.0
    other_batches = padded_batches if args.versus == "padded" else batches
    models = {
        name: (enc, build_optimizer(enc, cfg.train), steps)
        for name, enc, steps in (("torch", other, other_batches), ("fast", fast_encoder, batches))
    }
    grad_buffers = {
        "fast": EmbeddingGradBuffer.for_model(fast_encoder),
        "torch": None if args.versus == "dense-embedding-grad" else EmbeddingGradBuffer.for_model(other),
    }

    for side in ("query", "documents"):
        order = "query_order" if side == "query" else "document_order"
        real = sum(int(s["attention_mask"].sum()) for b in padded_batches for s in b[side])
        one_batch = sum(
            len(b[order]) * max(int(s["attention_mask"].sum(dim=1).max()) for s in b[side])
            for b in padded_batches
        )
        sliced = sum(s["attention_mask"].numel() for b in padded_batches for s in b[side])
        print(
            f"{side}: {real:,} real tokens; padding one batch {one_batch - real:,} "
            f"({1 - real / one_batch:.1%}), two slices {sliced - real:,} ({1 - real / sliced:.1%})"
        )

    loss_step = make_loss_step(InfoNCELoss(cfg.loss.temperature, cfg.loss.symmetric))
    seconds: dict[str, list[float]] = {"torch": [], "fast": []}
    if args.versus == "no-kernel" and dropout_kernel.load() is None:
        sys.exit("the C dropout kernel did not build: nothing to compare it with")

    def without_kernel_for(name: str) -> contextlib.AbstractContextManager:
        if name != "torch" or args.versus != "no-kernel":
            return contextlib.nullcontext()
        return unittest.mock.patch.object(dropout_kernel, "load", lambda: None)

    for i in range(len(batches)):
        for name in ("torch", "fast") if i % 2 else ("fast", "torch"):
            encoder, optimizer, steps = models[name]
            start = time.perf_counter()
            if grad_buffers[name] is not None:  # as the loop does after each zero_grad
                grad_buffers[name].attach()
            with without_kernel_for(name):
                loss, _ = loss_step(encoder, steps[i])
                loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[name].append(time.perf_counter() - start)
    plain, fast = sum(seconds["torch"][1:]), sum(seconds["fast"][1:])
    per_step = statistics.median(
        a / b for a, b in zip(seconds["torch"][1:], seconds["fast"][1:], strict=True)
    )
    layout = "padded" if args.padded else "packed"
    print(
        f"{len(batches) - 1} steps: {args.versus} {plain:.2f} s, current ({layout}, CPU defaults) "
        f"{fast:.2f} s, time ratio {plain / fast:.3f}x (median per step {per_step:.3f})"
    )


if __name__ == "__main__":
    main()
