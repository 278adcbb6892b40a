"""Raw-text corpus for RetroMAE: formats, bad rows, min-length skipping, packing, streaming."""

from __future__ import annotations

import json
import random

import pytest
from conftest import FIXTURES, minilm_dir
from transformers import AutoTokenizer

from ember_train.data.reader import DataError
from ember_train.data.text_corpus import (
    CorpusStats,
    KeyedBatches,
    KeyedTexts,
    StreamingBatches,
    filter_and_join,
    iter_texts,
    shuffle_buffer,
    token_lengths,
)

CORPUS = FIXTURES / "retromae" / "debian_long.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def test_jsonl_and_plain_text_give_the_same_documents(tmp_path):
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()[:50]]
    one_line = [t.replace("\n", " ") for t in texts]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(one_line[:25]) + "\n\n\n" + "\n".join(one_line[25:]) + "\n", encoding="utf-8")
    stats = CorpusStats()
    assert list(iter_texts(str(txt), stats=stats)) == one_line
    assert stats.blank_lines == 2
    assert list(iter_texts(str(CORPUS)))[:50] == texts


def test_text_column_of_csv_and_folder_of_text_files(tmp_path):
    (tmp_path / "a.csv").write_text('id,body\n1,"first doc"\n2,"second doc"\n', encoding="utf-8")
    assert list(iter_texts(str(tmp_path / "a.csv"), text_field="body")) == ["first doc", "second doc"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("one\ntwo\n", encoding="utf-8")
    (folder / "c.jsonl").write_text('{"text": "three"}\n', encoding="utf-8")
    assert list(iter_texts(str(folder))) == ["one", "two", "three"]


def test_bad_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n{"text": ""}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'text' is missing"):
        list(iter_texts(str(path)))
    stats = CorpusStats()
    assert list(iter_texts(str(path), on_bad_rows="skip", stats=stats)) == ["fine"]
    assert stats.bad_rows.total == 3
    assert "skipped 3 bad rows" in stats.summary()


@pytest.mark.parametrize(
    "name,content,error,kept,bad",
    [
        # unparsable JSON lines (a cut-off record, invalid UTF-8) are bad rows too
        (
            "broken.jsonl",
            b'{"text": "first"}\n{"text": "cut off\n\xff\xfe\n{"text": "last"}\n',
            r"broken.jsonl: row 2",
            ["first", "last"],
            {"invalid JSON": 1, "invalid UTF-8": 1},
        ),
        (
            "bad.txt",
            b"good line\nbad \xff byte\nnul \x00 here\nlast\n",
            r"bad.txt: row 2: invalid UTF-8",
            ["good line", "last"],
            {"invalid UTF-8": 1, "NUL byte": 1},
        ),
    ],
)
def test_bad_lines_name_the_line_or_are_skipped(tmp_path, name, content, error, kept, bad):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=error):
        list(iter_texts(str(path)))
    stats = CorpusStats()
    assert list(iter_texts(str(path), on_bad_rows="skip", stats=stats)) == kept
    assert stats.bad_rows.counts == bad


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(iter_texts(str(tmp_path / "nope.jsonl")))


def test_short_texts_are_skipped_and_counted(tokenizer):
    texts = [
        "a b",
        "one two three four five six seven eight nine",
        "x",
        "alpha beta gamma delta epsilon zeta",
    ]
    stats = CorpusStats()
    kept = list(filter_and_join(texts, token_lengths(tokenizer), min_tokens=5, stats=stats))
    assert [t for t, _ in kept] == [texts[1], texts[3]]
    assert stats.texts_read == 4 and stats.too_short == 2 and stats.sequences == 2
    assert "2 shorter than the minimum skipped" in stats.summary()


def test_packing_fills_sequences_without_losing_or_splitting_texts(tokenizer):
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[:200]
    texts = [json.loads(line)["text"].replace("\n", " ") for line in lines]
    lengths = token_lengths(tokenizer)
    stats = CorpusStats()
    packed = list(filter_and_join(texts, lengths, join_to=126, separator="\n", stats=stats))
    assert len(packed) < len(texts)  # short descriptions were joined
    assert "\n".join(t for t, _ in packed) == "\n".join(texts)  # order kept, nothing lost
    for text, n in packed:
        pieces = text.split("\n")
        assert n == sum(lengths(pieces)) or len(pieces) == 1
        if len(pieces) > 1:
            assert n <= 126
        # The retokenized sequence costs what the packer counted (WordPiece: separators are free).
        assert lengths([text])[0] == n
    assert stats.tokens == sum(n for _, n in packed)


def test_shuffle_buffer_is_a_permutation_and_seeded():
    items = list(range(1000))
    a = list(shuffle_buffer(items, 100, random.Random(1)))
    b = list(shuffle_buffer(items, 100, random.Random(1)))
    assert sorted(a) == items and a == b and a != items
    assert list(shuffle_buffer(items, 0, random.Random(1))) == items


def _streaming(texts, **kwargs):
    defaults = {"batch_size": 4, "num_batches": 10, "seed": 3, "shuffle_buffer_size": 8}
    return StreamingBatches(lambda: iter(texts), lambda items: items, **{**defaults, **kwargs})


def test_streaming_batches_cycle_passes_and_resume_exactly():
    texts = [f"doc {i}" for i in range(10)]
    full = list(_streaming(texts))
    assert len(full) == 10 and all(len(b) == 4 for b in full)
    # 40 texts from a 10-text corpus: every text appears 4 times (passes are reshuffled).
    seen = [item["text"] for batch in full for item in batch]
    assert sorted(seen) == sorted(texts * 4)
    assert [item["key"] for item in full[7]] == [(0, 7)] * 4
    resumed = _streaming(texts)
    resumed.set_epoch(0, start_batch=6)
    assert list(resumed) == full[6:]


def test_streaming_shards_are_disjoint_and_equal_length():
    texts = [f"doc {i}" for i in range(30)]
    shards = [
        list(_streaming(texts, num_batches=3, world_size=2, rank=r, shuffle_buffer_size=0)) for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 3
    first = {i["text"] for b in shards[0] for i in b}
    second = {i["text"] for b in shards[1] for i in b}
    assert not first & second


def test_streaming_needs_a_step_budget_and_a_corpus():
    with pytest.raises(ValueError, match="max_steps"):
        _streaming(["a"], num_batches=0)
    with pytest.raises(DataError, match="0 texts"):
        list(_streaming([]))


def test_keyed_batches_carry_epoch_and_batch_number():
    from ember_train.data.sampler import ShardedBatchSampler

    keyed = KeyedBatches(ShardedBatchSampler(10, 4, seed=0))
    dataset = KeyedTexts([f"t{i}" for i in range(10)])
    keyed.set_epoch(2, start_batch=1)
    batches = list(keyed)
    assert len(keyed) == 3 and len(batches) == 2
    assert {dataset[k]["key"] for k in batches[0]} == {(2, 1)}
    assert {dataset[k]["key"] for k in batches[1]} == {(2, 2)}
