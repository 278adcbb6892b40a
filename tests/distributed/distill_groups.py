"""The queries of distill_check.py, shared with its one-process reference in test_distributed.py."""

NUM_NEGATIVES, SIZES = 2, (3, 2)  # rank 0 holds 3 queries, rank 1 holds 2: an uneven last batch


def group(i: int) -> tuple[str, str, list[str], list[float]]:
    """Query i, its positive, its negatives and the teacher's scores (positive first)."""
    negatives = [f"unrelated text {i} {j}" for j in range(NUM_NEGATIVES)]
    scores = [0.9 - 0.01 * i, *(0.3 + 0.1 * j + 0.02 * i for j in range(NUM_NEGATIVES))]
    return (
        f"query number {i} about topic {i % 5}",
        f"document {i} describing topic {i % 5}",
        negatives,
        scores,
    )
