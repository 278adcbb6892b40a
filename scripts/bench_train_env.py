"""Process-level settings for CPU training (allocator, OpenMP, ...): whole train.py runs, side by side.

    python scripts/bench_train_env.py --pairs ../shared/data/debian-packages/train.jsonl.gz --repeats 6 \
        --variant default= \
        --variant no-mmap=MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=1099511627776

Each ``--variant NAME=VAR=VALUE,VAR=VALUE`` (``NAME=`` for the environment as it is) trains the
packaged all-MiniLM-L6-v2 with ember-train's defaults (fp32, contrastive, one epoch of ``batch x
steps`` Debian pairs) in a ``train.py`` process of its own with those variables set, so settings
read at process start (``LD_PRELOAD``, ``MALLOC_*_``, ``THP_MEM_ALLOC_ENABLE``, ``OMP_*``) take
effect. Runs alternate order every repeat; each prints samples/s (first ``--warmup-steps`` steps
not timed), peak RSS and minor page faults, and the end shows each variant's throughput ratio to
the first variant of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contrastive import LAST_EMBER_STATS, REPO, bench_ember, load_debian_pairs  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``no-mmap=MALLOC_MMAP_MAX_=0,MALLOC_TOP_PAD_=0`` -> ("no-mmap", {...}); ``default=`` -> ("default", {})."""
    name, _, assignments = spec.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    if not name or any(not key for key in env):
        raise SystemExit(f"bad --variant {spec!r}: use NAME=VAR=VALUE,VAR=VALUE (or NAME= for none)")
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=Path, default=REPO.parent / "shared/data/debian-packages/train.jsonl.gz"
    )
    parser.add_argument("--variant", action="append", required=True, help="NAME=VAR=VALUE,... (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    variants = dict(map(parse_variant, args.variant))

    speed: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        pairs = load_debian_pairs(args.pairs, args.batch_size * args.steps, seed=0)
        pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        for r in range(args.repeats):
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                out = Path(tmp) / f"{r}_{name}"
                rate = bench_ember(
                    pairs_file, args.batch_size, args.steps, args.warmup_steps, args.max_length,
                    "fp32", False, out, env=variants[name],
                )  # fmt: skip
                speed[name].append(rate)
                print(
                    f"repeat {r} {name}: {rate:.2f} samples/s, peak RSS {LAST_EMBER_STATS['peak_rss_mib']:,.0f} MiB, "
                    f"{LAST_EMBER_STATS['minor_faults']:,} minor page faults",
                    flush=True,
                )
    first = next(iter(variants))
    print(f"\n| variant | samples/s (mean) | ratio vs {first} per repeat: median (min-max) |\n|---|---:|---|")
    for name in variants:
        ratios = [a / b for a, b in zip(speed[name], speed[first], strict=True)]
        print(
            f"| {name} | {statistics.mean(speed[name]):.2f} | {statistics.median(ratios):.3f}x "
            f"({min(ratios):.3f}-{max(ratios):.3f}), faster in {sum(x > 1 for x in ratios)} of {len(ratios)} |"
        )


if __name__ == "__main__":
    main()
