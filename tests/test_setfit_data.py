"""Labelled texts and scored pairs: formats, validation with row numbers, bad-row handling, few-shot sampling."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from ember_train.data.labelled import (
    LabelledTexts,
    load_labelled,
    load_scored_pairs,
    normalize_scores,
    sample_per_label,
)
from ember_train.data.reader import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_single_label_jsonl_and_csv(tmp_path):
    rows = [
        {"text": "a game", "label": "games"},
        {"text": "a font", "label": "fonts"},
        {"text": "x", "label": 3},
    ]
    data = load_labelled(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert data.texts == ["a game", "a font", "x"] and data.labels == ["games", "fonts", 3]
    assert not data.multi_label
    (tmp_path / "d.csv").write_text("text,label\na game,games\na font,fonts\n", encoding="utf-8")
    csv_data = load_labelled(str(tmp_path / "d.csv"))
    assert csv_data.labels == ["games", "fonts"]


def test_multi_label_lists(tmp_path):
    rows = [{"text": "t1", "label": ["a", "b"]}, {"text": "t2", "label": []}, {"text": "t3", "label": ["b"]}]
    data = load_labelled(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert data.multi_label
    assert data.labels == [["a", "b"], [], ["b"]]
    assert data.label_names() == ["a", "b"]


def test_custom_field_names(tmp_path):
    rows = [{"sentence": "hello", "intent": "greet"}, {"sentence": "bye", "intent": "leave"}]
    data = load_labelled(
        str(write_jsonl(tmp_path / "c.jsonl", rows)), text_field="sentence", label_field="intent"
    )
    assert data.labels == ["greet", "leave"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"text": "  ", "label": "a"}, "row 2: field 'text' is empty"),
        ({"text": "ok"}, "row 2: field 'label' is missing"),
        ({"text": "ok", "label": True}, "row 2: field 'label' must be a string or an integer"),
        ({"text": "ok", "label": 1.5}, "row 2: field 'label' must be a string or an integer, got float"),
        ({"text": "ok", "label": ["a", "a"]}, "row 2: field 'label' repeats a label"),
        (
            {"text": "ok", "label": ["a"]},
            "row 2: field 'label' is a list of labels but earlier rows have single labels",
        ),
        ({"text": "ok", "label": {"x": 1}}, "row 2: field 'label' must be a string or an integer, got dict"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad, message):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "fine", "label": "a"}, bad, {"text": "also", "label": "b"}]
    )
    with pytest.raises(DataError) as err:
        load_labelled(str(path))
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: invalid JSON"):
        load_labelled(str(path))


def test_skip_counts_bad_rows_and_logs_them(tmp_path, caplog):
    rows = [
        {"text": "a", "label": "x"},
        {"text": "", "label": "x"},
        {"text": "c"},
        {"text": "d", "label": "y"},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        data = load_labelled(str(path), on_bad_rows="skip")
    assert data.texts == ["a", "d"]
    assert "skipped 2 bad rows" in caplog.text and "row 2" in caplog.text


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"label": "a"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_labelled(str(path), on_bad_rows="skip")


def test_scored_pairs_from_jsonl_and_csv(tmp_path):
    rows = [
        {"sentence1": "a", "sentence2": "b", "score": 4.5},
        {"sentence1": "c", "sentence2": "d", "score": 0},
    ]
    pairs = load_scored_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert pairs.scores == [4.5, 0.0] and pairs.sentence2 == ["b", "d"]
    (tmp_path / "p.csv").write_text("sentence1,sentence2,score\na,b,3.25\nc,d,oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p.csv: row 3: field 'score' must be a number, got 'oops'"):
        load_scored_pairs(str(tmp_path / "p.csv"))
    (tmp_path / "n.csv").write_text("sentence1,sentence2,score\na,b,nan\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 2: field 'score' is not finite"):
        load_scored_pairs(str(tmp_path / "n.csv"))
    (tmp_path / "m.csv").write_text("sentence1,sentence2,score\na,,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 2: field 'sentence2' is empty"):
        load_scored_pairs(str(tmp_path / "m.csv"))


def test_normalize_scores():
    assert normalize_scores([0.0, 2.5, 5.0], 0, 5) == [0.0, 0.5, 1.0]
    assert normalize_scores([1.0, 3.0]) == [0.0, 1.0]  # data range by default
    with pytest.raises(ValueError, match="outside"):
        normalize_scores([6.0], 0, 5)
    with pytest.raises(ValueError, match="empty"):
        normalize_scores([2.0, 2.0])


def test_sample_per_label_is_seeded_and_capped():
    data = LabelledTexts([f"t{i}" for i in range(30)], ["a"] * 20 + ["b"] * 7 + ["c"] * 3)
    few = sample_per_label(data, 5, seed=1)
    assert Counter(few.labels) == {"a": 5, "b": 5, "c": 3}
    assert sample_per_label(data, 5, seed=1).texts == few.texts
    assert sample_per_label(data, 5, seed=2).texts != few.texts
    multi = LabelledTexts(
        [f"t{i}" for i in range(6)], [["a"], ["a", "b"], ["b"], ["a"], ["b"], ["c"]], multi_label=True
    )
    picked = sample_per_label(multi, 1, seed=0)
    assert {lab for labels in picked.labels for lab in labels} == {"a", "b", "c"}
