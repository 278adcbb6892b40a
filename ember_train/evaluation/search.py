"""Exact nearest-neighbour search with bounded memory, shared by retrieval and mining.

The score matrix of a real corpus does not fit in memory (300 queries x 5M documents is 6 GB),
so queries and documents are scored in chunks and only a running top-k per query is kept.
faiss (``IndexFlatIP``, also exact) is used when it is importable and the corpus is large, or
when asked for; without faiss the torch path gives the same neighbours.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SCORES = ("cosine", "dot")
# Above this many documents faiss (when installed) is preferred to the torch loop.
FAISS_MIN_DOCS = 200_000


def load_faiss() -> ModuleType | None:
    """Return the faiss module, or None when it is not installed (it is optional)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def _prepare(x: torch.Tensor, score: str) -> torch.Tensor:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    x = torch.as_tensor(x).float()
    return F.normalize(x, dim=-1) if score == "cosine" else x


def top_k(
    queries: torch.Tensor,
    docs: torch.Tensor,
    k: int,
    *,
    score: str = "cosine",
    query_chunk: int = 256,
    doc_chunk: int = 16_384,
    use_faiss: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` documents per query: ``(scores [Q, k], indices [Q, k])``, best first.

    Peak extra memory is about ``query_chunk * (doc_chunk + k)`` floats. ``use_faiss=None``
    picks faiss for corpora over ``FAISS_MIN_DOCS`` when it is installed; ``True`` requires it.
    """
    q = _prepare(queries, score)
    d = _prepare(docs, score)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"shape mismatch: queries {tuple(q.shape)}, docs {tuple(d.shape)}")
    k = min(k, d.shape[0])
    if k <= 0 or q.shape[0] == 0:
        return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
    faiss = load_faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ImportError("use_faiss=True but faiss is not installed (pip install faiss-cpu)")
    if faiss is not None and (use_faiss or d.shape[0] >= FAISS_MIN_DOCS):
        return _faiss_top_k(faiss, q, d, k)
    return _torch_top_k(q, d, k, query_chunk=query_chunk, doc_chunk=doc_chunk, progress=progress)


def _torch_top_k(
    q: torch.Tensor, d: torch.Tensor, k: int, *, query_chunk: int, doc_chunk: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    all_scores, all_indices = [], []
    for qs in tqdm(range(0, q.shape[0], query_chunk), desc="search", disable=not progress, leave=False):
        qc = q[qs : qs + query_chunk]
        best_s = torch.full((qc.shape[0], 0), float("-inf"))
        best_i = torch.empty((qc.shape[0], 0), dtype=torch.long)
        for ds in range(0, d.shape[0], doc_chunk):
            sims = qc @ d[ds : ds + doc_chunk].T
            cand_s = torch.cat([best_s, sims], dim=1)
            cand_i = torch.cat([best_i, torch.arange(ds, ds + sims.shape[1]).expand(qc.shape[0], -1)], dim=1)
            kk = min(k, cand_s.shape[1])
            best_s, pos = cand_s.topk(kk, dim=1)
            best_i = cand_i.gather(1, pos)
        all_scores.append(best_s)
        all_indices.append(best_i)
    return torch.cat(all_scores), torch.cat(all_indices)


def _faiss_top_k(
    faiss: ModuleType, q: torch.Tensor, d: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    logger.info("exact search with faiss IndexFlatIP over %d documents", d.shape[0])
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d.contiguous().numpy())
    scores, indices = index.search(q.contiguous().numpy(), k)
    return torch.from_numpy(scores).float(), torch.from_numpy(indices).long()
