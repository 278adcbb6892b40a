"""Run under ``accelerate launch --multi_gpu --num_processes 2``: cross-device InfoNCE and sharding.

Optionally with Matryoshka prefixes (InfoNCE on each prefix, each gathered across processes).

Each process embeds its half of a fixed global batch with a DDP-wrapped encoder, computes the
gathered loss, and back-propagates. Rank 0 writes the mean loss over processes and the
(all-reduced) parameter gradients, which the test compares with one process holding the whole
batch. Also records which example indices each process draws in an epoch.
"""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from backward_step import backward_step  # this script's folder is on sys.path

from ember_train.data.sampler import ShardedBatchSampler
from ember_train.losses.infonce import InfoNCELoss
from ember_train.losses.matryoshka import with_matryoshka
from ember_train.models import Encoder
from ember_train.training.distributed import cpu_process_group_kwargs
from ember_train.training.host_reads import HostReadCounter

model_path, out_path, num_negatives, per_rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
chunk = int(sys.argv[5])  # > 0: through the gradient cache
# Optional Matryoshka prefixes and weights, e.g. "32,16,8" "1,0.5,2": the loss on each prefix.
matryoshka = [int(d) for d in sys.argv[6].split(",")] if len(sys.argv) > 6 else []
weights = [float(w) for w in sys.argv[7].split(",")] if len(sys.argv) > 7 else None
accelerator = Accelerator(**cpu_process_group_kwargs())
rank, world = accelerator.process_index, accelerator.num_processes
assert world == 2, f"expected 2 processes, got {world}"

torch.manual_seed(0)
# float64: equal formulas, not float32 summation order (gloo's all-reduce vs one matmul).
encoder = Encoder.from_pretrained(model_path, max_seq_length=16).double()
encoder.eval()  # no dropout: both sides must see identical activations
model = accelerator.prepare(encoder)

queries = [f"query number {i} about topic {i % 5}" for i in range(per_rank * world)]
positives = [f"document {i} describing topic {i % 5} in words" for i in range(per_rank * world)]
negatives = [[f"unrelated text {i} {j}" for j in range(num_negatives)] for i in range(per_rank * world)]
local = slice(rank * per_rank, (rank + 1) * per_rank)

loss_fn = with_matryoshka(InfoNCELoss(0.05, symmetric=True, gather_across_devices=True), matryoshka, weights)
q_features = encoder.tokenize(queries[local])
d_features = encoder.tokenize(positives[local] + [t for row in negatives[local] for t in row])


def loss_from(q, d):
    n = d[per_rank:].view(per_rank, num_negatives, -1) if num_negatives else None
    return loss_fn(q, d[:per_rank], n)


reads = HostReadCounter()  # the plain path's gathered loss: one read per gather (its peers' sizes)
loss = backward_step(accelerator, model, [q_features, d_features], loss_from, chunk, around_loss=reads)

losses = accelerator.gather(loss.detach().reshape(1))
grads = {
    name: param.grad.detach().clone() for name, param in encoder.named_parameters() if param.grad is not None
}

# Exact sharding: every index once per epoch across processes, for a size not divisible by world.
sampler = ShardedBatchSampler(37, 4, world_size=world, rank=rank, seed=1)
mine = [i for batch in sampler for i in batch]
everyone = [None] * world
dist.all_gather_object(everyone, {"indices": mine, "steps": len(list(sampler))})

if rank == 0:
    loss_reads = None if chunk else reads.total
    torch.save(
        {"loss": losses.mean().item(), "grads": grads, "sharding": everyone, "loss_reads": loss_reads},
        out_path,
    )
accelerator.wait_for_everyone()
print(json.dumps({"rank": rank, "loss": loss.item()}))
# Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort
# a rank ("terminate called without an active exception") after all the work is done.
accelerator.end_training()
