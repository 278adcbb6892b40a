"""SetFit pair generation: counts and balance per strategy, self-pairs, seeds, memory, batching."""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections import Counter

import pytest

from ember_train.data.setfit_pairs import LabelPairs, PairBatchSampler, Permutation

# 3 labels with 8, 4 and 8 texts (20 in all), the running example of SetFit's strategy guide.
LABELS = ["happy"] * 8 + ["content"] * 4 + ["sad"] * 8
TEXTS = [f"text {i}" for i in range(len(LABELS))]
# Distinct unordered pairs: positives C(8,2)+C(4,2)+C(8,2) = 28+6+28 = 62; all pairs C(20,2) = 190.
POS, NEG = 62, 190 - 62


def all_pairs(ds: LabelPairs) -> list[tuple[int, int, float]]:
    return [ds.pair(k) for k in range(len(ds))]


def check_targets(pairs, labels) -> None:
    for i, j, target in pairs:
        assert (labels[i] == labels[j]) == (target == 1.0), (i, j, target)


def unordered(pairs) -> set[tuple[int, int]]:
    return {(min(i, j), max(i, j)) for i, j, _ in pairs}


def test_oversampling_counts_and_balance():
    ds = LabelPairs(TEXTS, LABELS, strategy="oversampling", seed=3)
    assert (ds.n_positive, ds.n_negative) == (POS, NEG)
    pairs = all_pairs(ds)
    assert len(pairs) == 2 * NEG
    assert Counter(t for *_, t in pairs) == {1.0: NEG, 0.0: NEG}
    check_targets(pairs, LABELS)
    # The majority kind (negatives) appears once each; the positives all appear, repeated.
    negatives = [p for p in pairs if p[2] == 0.0]
    assert len(unordered(negatives)) == NEG
    positives = [p for p in pairs if p[2] == 1.0]
    assert len(unordered(positives)) == POS
    # Items alternate positive, negative, ... so any window is balanced.
    assert [t for *_, t in pairs[:6]] == [1.0, 0.0] * 3


def test_undersampling_counts_and_balance():
    ds = LabelPairs(TEXTS, LABELS, strategy="undersampling", seed=3)
    pairs = all_pairs(ds)
    assert len(pairs) == 2 * POS
    assert Counter(t for *_, t in pairs) == {1.0: POS, 0.0: POS}
    check_targets(pairs, LABELS)
    # No pair repeats: positives are all of them once, negatives a sample without repetition.
    assert len(unordered(pairs)) == 2 * POS


def test_unique_gives_every_pair_exactly_once():
    ds = LabelPairs(TEXTS, LABELS, strategy="unique", seed=3)
    pairs = all_pairs(ds)
    assert len(pairs) == POS + NEG
    assert Counter(t for *_, t in pairs) == {1.0: POS, 0.0: NEG}
    assert unordered(pairs) == set(itertools.combinations(range(len(TEXTS)), 2))
    check_targets(pairs, LABELS)


def test_num_iterations_gives_k_positives_and_k_negatives_per_text():
    k = 3
    ds = LabelPairs(TEXTS, LABELS, num_iterations=k, strategy="unique", seed=3)
    pairs = all_pairs(ds)
    assert len(pairs) == 2 * k * len(TEXTS)
    check_targets(pairs, LABELS)
    anchors = Counter((i, t) for i, _, t in pairs)
    assert all(anchors[(i, 1.0)] == k and anchors[(i, 0.0)] == k for i in range(len(TEXTS)))


def test_num_iterations_with_a_singleton_label_keeps_balance():
    labels = ["a"] * 5 + ["b"] * 5 + ["lonely"]
    ds = LabelPairs([str(i) for i in range(11)], labels, num_iterations=2, seed=0)
    pairs = all_pairs(ds)
    assert Counter(t for *_, t in pairs) == {1.0: 22, 0.0: 22}
    check_targets(pairs, labels)
    assert all(i != j for i, j, _ in pairs)


@pytest.mark.parametrize("strategy", ["oversampling", "undersampling", "unique"])
def test_no_self_pairs_unless_asked(strategy):
    ds = LabelPairs(TEXTS, LABELS, strategy=strategy, seed=0)
    assert all(i != j for i, j, _ in all_pairs(ds))
    with_self = LabelPairs(TEXTS, LABELS, strategy=strategy, seed=0, include_self_pairs=True)
    assert with_self.n_positive == POS + len(TEXTS)  # every text paired with itself, as a positive
    selfs = [(i, j, t) for i, j, t in all_pairs(with_self) if i == j]
    assert selfs and all(t == 1.0 for *_, t in selfs)
    if strategy == "unique":
        assert {i for i, _, _ in selfs} == set(range(len(TEXTS)))


def test_num_iterations_self_pairs_only_when_asked():
    labels = ["a", "a", "b", "b", "c", "c"]
    ds = LabelPairs([str(i) for i in range(6)], labels, num_iterations=50, seed=1)
    assert all(i != j for i, j, _ in all_pairs(ds))
    ds = LabelPairs([str(i) for i in range(6)], labels, num_iterations=50, seed=1, include_self_pairs=True)
    assert any(i == j for i, j, _ in all_pairs(ds))


def test_reproducible_with_a_seed_and_different_across_seeds():
    a = all_pairs(LabelPairs(TEXTS, LABELS, seed=7))
    b = all_pairs(LabelPairs(TEXTS, LABELS, seed=7))
    c = all_pairs(LabelPairs(TEXTS, LABELS, seed=8))
    assert a == b
    assert a != c
    # Item k does not depend on which items were drawn before it (random access).
    ds = LabelPairs(TEXTS, LABELS, seed=7)
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    assert {k: ds.pair(k) for k in order} == dict(enumerate(a))


def test_multi_label_pairs_match_brute_force():
    label_sets = [["a"], ["a", "b"], ["b"], ["c"], ["c", "a"], [], ["d"]] * 3
    n = len(label_sets)
    brute_pos = {
        (i, j) for i, j in itertools.combinations(range(n), 2) if set(label_sets[i]) & set(label_sets[j])
    }
    ds = LabelPairs([str(i) for i in range(n)], label_sets, strategy="unique", seed=2)
    assert ds.multi_label
    assert ds.n_positive == len(brute_pos)
    assert ds.n_negative == n * (n - 1) // 2 - len(brute_pos)
    pairs = all_pairs(ds)
    assert unordered(pairs) == set(itertools.combinations(range(n), 2))
    assert {(min(i, j), max(i, j)) for i, j, t in pairs if t == 1.0} == brute_pos
    iterated = all_pairs(LabelPairs([str(i) for i in range(n)], label_sets, num_iterations=3, seed=2))
    for i, j, t in iterated:
        assert bool(set(label_sets[i]) & set(label_sets[j])) == (t == 1.0)
        assert i != j


def test_items_are_text_pairs():
    ds = LabelPairs(TEXTS, LABELS, seed=0)
    item = ds[0]
    i, j, t = ds.pair(0)
    assert item == {"text1": TEXTS[i], "text2": TEXTS[j], "label": t}
    with pytest.raises(IndexError):
        ds.pair(len(ds))


def test_impossible_inputs_are_explained():
    with pytest.raises(ValueError, match="no positive pairs"):
        LabelPairs(["a", "b", "c"], [1, 2, 3])
    with pytest.raises(ValueError, match="no negative pairs"):
        LabelPairs(["a", "b", "c"], [1, 1, 1])
    with pytest.raises(ValueError, match="strategy"):
        LabelPairs(TEXTS, LABELS, strategy="random")
    with pytest.raises(ValueError, match="2 texts"):
        LabelPairs(["a"], [1])


def test_memory_stays_linear_for_10k_texts_and_200_labels():
    """The reference materialises ~5e7 pairs here (many GB); lazily it is a few arrays of n."""
    rng = random.Random(0)
    n = 10_000
    texts = [f"text {i}" for i in range(n)]
    labels = [f"label {rng.randrange(200)}" for _ in range(n)]
    tracemalloc.start()
    try:
        ds = LabelPairs(texts, labels, strategy="oversampling", seed=0)
        step = len(ds) // 20_000
        drawn = [ds.pair(k) for k in range(0, len(ds), step)][:20_000]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.n_positive + ds.n_negative == n * (n - 1) // 2
    assert len(ds) == 2 * max(ds.n_positive, ds.n_negative) > 9 * 10**7
    check_targets(drawn, labels)
    # 20k drawn tuples (~2 MB) + O(n) index arrays; one list of all pairs would be > 4 GB.
    assert peak < 8 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_memory_stays_linear_for_multi_label():
    rng = random.Random(1)
    n = 5_000
    label_sets = [rng.sample(range(200), 2) for _ in range(n)]
    tracemalloc.start()
    try:
        ds = LabelPairs([str(i) for i in range(n)], label_sets, num_iterations=2, seed=0)
        drawn = [ds.pair(k) for k in range(0, len(ds), 7)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 4 * n
    for i, j, t in drawn[:500]:
        assert bool(set(label_sets[i]) & set(label_sets[j])) == (t == 1.0)
    assert peak < 8 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("size", [1, 2, 3, 17, 64, 1000])
def test_permutation_is_a_bijection(size):
    perm = Permutation(size, key=123)
    assert sorted(perm(i) for i in range(size)) == list(range(size))


def test_batch_sampler_covers_every_item_once_per_epoch_and_balances_batches():
    ds = LabelPairs(TEXTS, LABELS, seed=0)  # 256 items, alternating +/-
    world = 3
    for epoch in (0, 1):
        seen = []
        shards = []
        for rank in range(world):
            sampler = PairBatchSampler(len(ds), 8, world_size=world, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            seen += [i for batch in shards[-1] for i in batch]
        assert sorted(seen) == list(range(len(ds)))
        assert len({len(s) for s in shards}) == 1  # every process gets the same number of batches
        full = PairBatchSampler(len(ds), 8 * world, seed=5)
        full.set_epoch(epoch)
        for batch in full:
            targets = Counter(ds.pair(k)[2] for k in batch)
            assert targets[1.0] == targets[0.0]  # positives and negatives in couples
    a, b = PairBatchSampler(len(ds), 8, seed=5), PairBatchSampler(len(ds), 8, seed=5)
    b.set_epoch(1)
    assert list(a) != list(b)  # each epoch has its own order


def test_batch_sampler_resumes_at_start_batch():
    sampler = PairBatchSampler(101, 4, seed=1)
    sampler.set_epoch(2)
    everything = list(sampler)
    sampler.set_epoch(2, start_batch=10)
    assert list(sampler) == everything[10:]
    assert len(sampler) == 26
    assert sorted(i for b in everything for i in b) == list(range(101))
