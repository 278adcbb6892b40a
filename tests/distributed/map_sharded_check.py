"""Run under ``accelerate launch --multi_gpu --num_processes 2``: token lengths computed in shards.

Each process computes ``grouping_lengths`` for every second pair only (``map_sharded``); rank 0
writes what it got back, the items its own share held, and the single-process result.
"""

import json
import sys

from accelerate import Accelerator

from ember_train.data.pairs import PairExample
from ember_train.models import Encoder
from ember_train.pipelines.contrastive import grouping_lengths
from ember_train.training.distributed import cpu_process_group_kwargs, map_sharded

model_path, out_path = sys.argv[1], sys.argv[2]
accelerator = Accelerator(**cpu_process_group_kwargs())
assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"

encoder = Encoder.from_pretrained(model_path, max_seq_length=16)
words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
examples = [
    PairExample(query=" ".join(words[: 1 + i % 3]), positive=" ".join(words * (1 + i % 4))[: 6 + 7 * i])
    for i in range(37)
]
local_queries: list[str] = []


def lengths_of(shard: list[PairExample]) -> list[int]:
    local_queries.extend(e.query for e in shard)
    return grouping_lengths(shard, encoder)


sharded = map_sharded(lengths_of, examples)
if accelerator.is_main_process:
    result = {
        "sharded": sharded,
        "local_count": len(local_queries),
        "full": grouping_lengths(examples, encoder),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
accelerator.wait_for_everyone()
accelerator.end_training()
