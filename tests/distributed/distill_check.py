"""Run under ``accelerate launch --multi_gpu --num_processes 2``: InfoNCE + distillation KL.

The processes hold different numbers of queries (3 and 2: an uneven last batch), embed them with
a DDP-wrapped encoder (plainly or through the gradient cache) and back-propagate
``InfoNCE (gathered) + 0.5 * KL``. Rank 0 writes the mean loss over processes and the all-reduced
parameter gradients, which the test compares with one process holding all 5 queries.
"""

import sys

import torch
from accelerate import Accelerator
from backward_step import backward_step  # this script's folder is on sys.path
from distill_groups import NUM_NEGATIVES, SIZES, group

from ember_train.losses.distill import DistillationLoss
from ember_train.losses.infonce import InfoNCELoss
from ember_train.models import Encoder
from ember_train.training.distributed import cpu_process_group_kwargs

model_path, out_path, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
accelerator = Accelerator(**cpu_process_group_kwargs())
rank = accelerator.process_index
assert accelerator.num_processes == 2

torch.manual_seed(0)
encoder = Encoder.from_pretrained(model_path, max_seq_length=16).double().eval()  # exact, no dropout
model = accelerator.prepare(encoder)


start = sum(SIZES[:rank])
local = [group(i) for i in range(start, start + SIZES[rank])]
teacher = torch.tensor([g[3] for g in local], dtype=torch.float64)
q_features = encoder.tokenize([g[0] for g in local])
d_features = encoder.tokenize([g[1] for g in local] + [t for g in local for t in g[2]])
infonce = InfoNCELoss(0.05, gather_across_devices=True)
distill = DistillationLoss(0.1, 0.05)


def loss_from(q, d):
    b = q.shape[0]
    n = d[b:].view(b, NUM_NEGATIVES, -1)
    return infonce(q, d[:b], n) + 0.5 * distill(q, d[:b], n, teacher)


loss = backward_step(accelerator, model, [q_features, d_features], loss_from, chunk)

losses = accelerator.gather(loss.detach().reshape(1))
grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
if rank == 0:
    torch.save({"loss": losses.mean().item(), "grads": grads}, out_path)
accelerator.wait_for_everyone()
accelerator.end_training()
