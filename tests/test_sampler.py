import pytest

from ember_train.data.sampler import ShardedBatchSampler


def _epoch(n, batch, world, **kw):
    shards = [list(ShardedBatchSampler(n, batch, world_size=world, rank=r, **kw)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every process must run the same number of steps"
    return shards


@pytest.mark.parametrize("n,batch,world", [(64, 4, 2), (101, 8, 2), (103, 5, 3), (7, 4, 1)])
def test_every_example_once_per_epoch_across_ranks(n, batch, world):
    shards = _epoch(n, batch, world, seed=3)
    seen = [i for shard in shards for b in shard for i in b]
    assert sorted(seen) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    a = ShardedBatchSampler(50, 4, seed=1)
    b = ShardedBatchSampler(50, 4, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_resume_skips_to_the_same_batch():
    full = list(ShardedBatchSampler(40, 4, seed=5))
    resumed = ShardedBatchSampler(40, 4, seed=5)
    resumed.set_epoch(0, start_batch=3)
    assert list(resumed) == full[3:]


def test_no_duplicate_texts_in_a_global_batch():
    # 30 examples but only 10 distinct queries: copies must land in different batches.
    keys = [(f"q{i % 10}", f"p{i}") for i in range(30)]
    shards = _epoch(30, 3, 2, seed=0, dedup_keys=keys)
    seen = []
    for step in range(len(shards[0])):
        global_batch = shards[0][step] + shards[1][step]
        queries = [keys[i][0] for i in global_batch]
        assert len(queries) == len(set(queries))
        seen.extend(global_batch)
    assert sorted(seen) == list(range(30))  # deferred, never dropped


def test_length_grouping_reduces_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(2000)]

    def padding(sampler):
        total = 0
        for batch in sampler:
            longest = max(lengths[i] for i in batch)
            total += sum(longest - lengths[i] for i in batch)
        return total

    plain = padding(ShardedBatchSampler(2000, 16, seed=0))
    grouped_sampler = ShardedBatchSampler(2000, 16, seed=0, lengths=lengths)
    grouped = padding(grouped_sampler)
    assert grouped < 0.2 * plain
    assert sorted(i for b in grouped_sampler for i in b) == list(range(2000))


def test_contrastive_grouping_sorts_by_document_tokens_then_query(tiny_bert_path) -> None:
    """Group keys come from truncated token counts, documents first: the cost that padding wastes."""
    from ember_train.data.pairs import PairExample
    from ember_train.models import Encoder
    from ember_train.pipelines.contrastive import grouping_lengths

    encoder = Encoder.from_pretrained(str(tiny_bert_path), max_seq_length=16)
    examples = [
        PairExample(query="a b c d e", positive="word " * 40),  # document truncated to 16 tokens
        PairExample(query="a", positive="one two three"),
        PairExample(query="a b", positive="one two three"),
        PairExample(query="x", positive="one two three four five six"),
    ]
    keys = grouping_lengths(examples, encoder)
    docs = encoder.token_lengths([e.positive for e in examples])
    assert docs[0] == 16  # truncation applies, as in a batch
    # The same counts a padded batch holds (its attention mask), one text at a time.
    assert docs == encoder.tokenize([e.positive for e in examples])["attention_mask"].sum(1).tolist()
    assert docs[1] == docs[2] < docs[3] < docs[0]
    # Documents decide the order; the query breaks the tie between examples 1 and 2.
    assert sorted(range(4), key=keys.__getitem__) == [1, 2, 3, 0]
