"""CPU: the word-embedding gradient in one buffer that lives across steps.

PyTorch's embedding backward builds a dense ``[vocab, dim]`` gradient afresh for every forward
call (47 MB for BERT's vocabulary at 384 dims, 125 MB at 1,024), two or more per contrastive
step. On a CPU a block that large comes from the operating system each time and costs a page
fault per 4 KiB page when it is zeroed (about 45 ms a call on this project's machine, most of
the embedding's backward). Here the embedding produces a sparse gradient (the rows of the batch's
tokens) that autograd adds into a dense buffer attached as ``.grad`` before each step's first
backward pass: the same sums, with no fresh memory. Everything after the backward (DDP's
all-reduce, clipping, AdamW) sees the usual dense ``.grad``.

Not used under DeepSpeed (its engine owns the gradients) or off the CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingGradBuffer:
    """Attach with :meth:`attach` before each optimizer step's first backward; :meth:`release` after training.

    Set up after ``accelerator.prepare()``: DDP decides at wrapping time whether a parameter's
    gradient is sparse, and must see the dense ``.grad`` that reaches it here.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding
        self.buffer = torch.zeros_like(embedding.weight, memory_format=torch.contiguous_format)
        embedding.sparse = True

    @classmethod
    def for_model(cls, model: nn.Module) -> EmbeddingGradBuffer | None:
        """The buffer for the model's trainable input embedding, or None if it has none."""
        owner = next((m for m in model.modules() if hasattr(m, "get_input_embeddings")), None)
        try:
            embedding = owner.get_input_embeddings() if owner is not None else None
        except NotImplementedError:  # a model class without the accessor: keep PyTorch's gradient
            return None
        if not isinstance(embedding, nn.Embedding) or not embedding.weight.requires_grad:
            return None
        return cls(embedding)

    def attach(self) -> None:
        """Start the step's gradient at zero, in the persistent buffer."""
        self.embedding.weight.grad = self.buffer.zero_()

    def release(self) -> None:
        """Give the embedding back as it was (dense gradients) and free the buffer."""
        self.embedding.sparse = False
        if self.embedding.weight.grad is self.buffer:
            self.embedding.weight.grad = None
        self.buffer = torch.empty(0)
