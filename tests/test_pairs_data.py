import gzip
import json

import pytest

from ember_train.data.pairs import PairColumns, load_pairs
from ember_train.data.reader import DataError


def _jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"query": "q", "pos": "p"}


@pytest.mark.parametrize(
    "row,message",
    [
        ({"pos": "p"}, r"row 2: field 'query' is missing"),
        ({"query": "", "pos": "p"}, r"row 2: field 'query' is empty"),
        ({"query": "  ", "pos": "p"}, r"row 2: field 'query' is empty"),
        ({"query": 5, "pos": "p"}, r"row 2: field 'query' must be a string, got int"),
        ({"query": "q"}, r"row 2: row has no positive \(field 'pos' is missing\)"),
        ({"query": "q", "pos": []}, r"row 2: field 'pos' is an empty list"),
        ({"query": "q", "pos": ["a", 3]}, r"row 2: field 'pos\[1\]' must be a string"),
        ({"query": "q", "pos": "p", "neg": [""]}, r"row 2: field 'neg\[0\]' is empty"),
        ({"query": "q", "pos": {"a": 1}}, r"row 2: field 'pos' must be a string or a list"),
        ('{"query": "q", "pos": ', r"row 2: invalid JSON"),
        ('["q", "p"]', r"row 2: expected a JSON object, got list"),
    ],
)
def test_each_bad_row_names_file_row_and_field(tmp_path, row, message):
    path = _jsonl(tmp_path, [GOOD, row, GOOD])
    with pytest.raises(DataError, match=message) as info:
        load_pairs(str(path))
    assert str(path) in str(info.value)


def test_skip_counts_every_bad_row(tmp_path, caplog):
    path = _jsonl(
        tmp_path, [GOOD, {"query": ""}, "not json", {"query": "a", "pos": ["x", "y"]}, {"pos": "z"}]
    )
    examples, bad = load_pairs(str(path), on_bad_rows="skip")
    assert [(e.query, e.positive) for e in examples] == [("q", "p"), ("a", "x"), ("a", "y")]
    assert bad.total == 3
    assert "skipped 3 bad rows" in caplog.text


def test_invalid_utf8_and_nul_bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"query": "q", "pos": "p"}\n{"query": "\xff\xfe", "pos": "p"}\n')
    with pytest.raises(DataError, match=r"row 2: invalid UTF-8"):
        load_pairs(str(path))
    path.write_bytes(b'{"query": "q", "pos": "p"}\n{"query": "a\\u0000b", "pos": "p"}\n')
    with pytest.raises(DataError, match=r"row 2: field 'query' contains a NUL byte"):
        load_pairs(str(path))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no usable pairs"):
        load_pairs(str(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_pairs(str(tmp_path / "nope.jsonl"))


def test_csv_parquet_gzip_and_column_mapping(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("question,answer\nhow,because\nwhy,\n")
    with pytest.raises(DataError, match=r"pairs\.csv: row 3: field 'answer' is empty"):
        load_pairs(str(csv_path), columns=PairColumns(query="question", pos="answer"))

    gz = tmp_path / "pairs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"q": "a", "d": "b", "n": ["c"]}) + "\n")
    examples, _ = load_pairs(str(gz), columns=PairColumns("q", "d", "n"), num_negatives=1)
    assert examples[0].negatives == ["c"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["x", "y"], "pos": ["1", "2"]}), tmp_path / "pairs.parquet")
    examples, _ = load_pairs(str(tmp_path / "pairs.parquet"))
    assert [e.positive for e in examples] == ["1", "2"]


def test_hard_negatives_required_when_asked(tmp_path):
    path = _jsonl(tmp_path, [{"query": "q", "pos": "p", "neg": ["n"]}, {"query": "r", "pos": "s"}])
    with pytest.raises(DataError, match=r"row 2: field 'neg' needs at least one hard negative"):
        load_pairs(str(path), num_negatives=2)
