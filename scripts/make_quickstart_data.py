"""Build the bundled quickstart sample from the Debian package descriptions.

    python scripts/make_quickstart_data.py --source ../shared/data/debian-packages --out data/quickstart

Pairs are ``short`` (one-line synopsis, the query) -> ``long`` (the description, the positive).
The train and held-out sets come from the upstream train and dev splits, which are split by
source package, so no package family straddles them. Identical synopses or descriptions are
kept once, since they would be ambiguous targets for retrieval.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def read_pairs(path: Path, max_long_chars: int) -> list[dict]:
    seen: set[str] = set()
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            short, long = row["short"].strip(), row["long"].strip()
            if not short or not long or short in seen or long in seen:
                continue
            seen.update((short, long))
            pairs.append({"query": short, "pos": long[:max_long_chars], "section": row["section"]})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, required=True, help="directory with train.jsonl.gz and dev.jsonl.gz"
    )
    parser.add_argument("--out", type=Path, default=Path("data/quickstart"))
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--dev-size", type=int, default=500)
    parser.add_argument(
        "--max-long-chars", type=int, default=1000, help="truncate long descriptions (keeps the repo small)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", args.train_size), ("dev", args.dev_size)):
        pairs = read_pairs(args.source / f"{split}.jsonl.gz", args.max_long_chars)
        sample = rng.sample(pairs, min(size, len(pairs)))
        with (args.out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for pair in sample:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        print(f"{split}: {len(sample)} pairs (of {len(pairs)} distinct) -> {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
