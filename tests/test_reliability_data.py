"""Broken input files: each one gives a clear error naming the file, the line and the problem.

The corpus lives in ``tests/fixtures/broken/`` (see its README); files that cannot be stored as
text (a raw NUL byte, invalid UTF-8, a 10 MB line) are written here. Every case is checked three
ways: ``load_pairs`` raises a DataError with the message; ``on_bad_rows: skip`` counts what it
skipped (or still fails when nothing usable is left); and the CLI exits with code 2 and one line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO

from ember_train import cli
from ember_train.data.labelled import load_labelled
from ember_train.data.pairs import load_pairs
from ember_train.data.reader import MAX_LINE_BYTES, DataError

BROKEN = FIXTURES / "broken"
GOOD_LINE = b'{"query": "q1", "pos": "p1"}\n'


def _generated(tmp_path: Path, name: str) -> Path:
    """The corpus files that cannot live in git as text."""
    path = tmp_path / name
    if name == "nul_byte.jsonl":
        path.write_bytes(GOOD_LINE + b'{"query": "a\x00b", "pos": "p"}\n' + GOOD_LINE)
    elif name == "invalid_utf8.jsonl":
        path.write_bytes(GOOD_LINE + b'{"query": "caf\xe9", "pos": "p"}\n' + GOOD_LINE)
    elif name == "invalid_utf8.csv":
        path.write_bytes(b"query,pos\nq1,p1\ncaf\xe9,p2\nq3,p3\n")
    elif name == "nul_byte.csv":
        path.write_bytes(b"query,pos\nq\x001,p1\nq2,p2\n")
    elif name == "long_line.jsonl":
        assert MAX_LINE_BYTES < 10_000_000  # the case is only meaningful above the limit
        big = b'{"query": "' + b"x" * 10_000_000 + b'", "pos": "p"}\n'
        path.write_bytes(GOOD_LINE + big + GOOD_LINE)
    else:
        raise ValueError(name)
    return path


# (file, message in error mode, (rows kept, rows skipped) with on_bad_rows=skip or None if still an error)
CASES = [
    ("invalid_json.jsonl", r"row 2: invalid JSON \(Expecting value at column \d+\)", (2, 1)),
    ("wrong_type.jsonl", r"row 3: field 'query' must be a string, got int", (2, 1)),
    ("missing_field.jsonl", r"row 2: row has no positive \(field 'pos' is missing\)", (1, 1)),
    ("empty_string.jsonl", r"row 2: field 'query' is empty", (1, 1)),
    ("nul_escape.jsonl", r"row 2: field 'pos' contains a NUL byte", (1, 1)),
    ("empty.jsonl", r": no usable pairs: no rows at all \(an empty file\?\)", None),
    ("missing_column.csv", r"row 2: row has no positive \(field 'pos' is missing\)", None),
    ("short_row.csv", r"row 3: row has 1 field, fewer than the header's 2 \(query, pos\)", (2, 1)),
    ("nul_byte.jsonl", r"row 2: line contains a NUL byte", (2, 1)),
    ("invalid_utf8.jsonl", r"row 2: invalid UTF-8 \(invalid continuation byte at byte \d+\)", (2, 1)),
    ("invalid_utf8.csv", r"row 3: invalid UTF-8 \(invalid continuation byte at byte \d+\)", (2, 1)),
    ("nul_byte.csv", r"row 2: field 'query' contains a NUL byte", (1, 1)),
    (
        "long_line.jsonl",
        r"row 2: line is longer than 8 MiB \(one record per line; is a newline missing\?\)",
        (2, 1),
    ),
]
IDS = [c[0] for c in CASES]


def _path(tmp_path: Path, name: str) -> Path:
    return BROKEN / name if (BROKEN / name).is_file() else _generated(tmp_path, name)


@pytest.mark.parametrize("name,message,_", CASES, ids=IDS)
def test_broken_file_error_names_file_line_and_problem(tmp_path, name, message, _):
    path = _path(tmp_path, name)
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    text = str(info.value)
    assert re.search(message, text), text
    assert text.startswith(f"{path}: "), text  # the file comes first, as the user wrote it
    assert len(text) < 300 and "\n" not in text, text  # one readable line, not a dump of the row


@pytest.mark.parametrize("name,message,kept_skipped", CASES, ids=IDS)
def test_broken_file_with_skip_counts_what_was_skipped(tmp_path, caplog, name, message, kept_skipped):
    path = _path(tmp_path, name)
    if kept_skipped is None:  # nothing usable: skipping must not turn into an empty, silent run
        with pytest.raises(DataError, match="no usable pairs"):
            load_pairs(str(path), on_bad_rows="skip")
        return
    examples, bad = load_pairs(str(path), on_bad_rows="skip")
    assert (len(examples), bad.total) == kept_skipped
    assert f"skipped {bad.total} bad rows" in caplog.text
    assert re.search(message, bad.examples[0]), bad.examples


def test_error_in_a_shard_names_the_shard_not_the_directory(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_bytes(GOOD_LINE)
    (shards / "part-1.jsonl").write_text('{"query": "q", "pos": ""}\n')
    with pytest.raises(DataError, match=re.escape(f"{shards / 'part-1.jsonl'}: row 1: field 'pos' is empty")):
        load_pairs(str(shards))


def _cli_config(tmp_path: Path, model: Path, train: Path, on_bad_rows: str = "error") -> Path:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {model}, max_seq_length: 16}}\n"
        f"data: {{train: {train}, on_bad_rows: {on_bad_rows}}}\n"
        "train: {batch_size: 2, max_steps: 1}\n"
        "eval: {before_training: false}\nexport: {enabled: false}\n"
    )
    return cfg


@pytest.mark.parametrize("name,message,_", CASES, ids=IDS)
def test_cli_reports_broken_file_in_one_line_with_exit_code_2(
    tmp_path, tiny_bert_path, capsys, name, message, _
):
    path = _path(tmp_path, name)
    code = cli.main(["train", "--config", str(_cli_config(tmp_path, tiny_bert_path, path))])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ember-train:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"ember-train: error: {path}: "), err[-2000:]
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err


def test_cli_subprocess_exit_code_2_one_line_no_traceback(tmp_path, tiny_bert_path):
    """The real process: what a user sees on the terminal for a bad line."""
    path = BROKEN / "invalid_json.jsonl"
    cfg = _cli_config(tmp_path, tiny_bert_path, path)
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    column = len(path.read_text().splitlines()[1]) + 1  # the line ends where a value was expected
    expected = f"ember-train: error: {path}: row 2: invalid JSON (Expecting value at column {column})"
    assert errors == [expected], errors


def test_cli_skip_runs_and_reports_the_count(tmp_path, tiny_bert_path, capsys):
    path = tmp_path / "invalid_utf8.jsonl"  # two different good pairs (identical ones are refused)
    path.write_bytes(GOOD_LINE + b'{"query": "caf\xe9", "pos": "p"}\n' + b'{"query": "q3", "pos": "p3"}\n')
    cfg = _cli_config(tmp_path, tiny_bert_path, path, on_bad_rows="skip")
    assert cli.main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "training pairs: 2 (skipped 1 bad rows (1 invalid UTF-8);" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_rows"] == 1


def test_label_column_with_one_class_loads_via_public_loader():
    """The loader reads it (a one-class *test* set is legitimate); training must refuse it (below)."""
    data = load_labelled(str(BROKEN / "one_class.jsonl"))
    assert data.label_names() == ["games"]


def test_setfit_training_on_one_class_is_a_clear_error(tmp_path, tiny_bert_path, capsys):
    path = BROKEN / "one_class.jsonl"
    cfg = tmp_path / "setfit.yaml"
    cfg.write_text(
        f"task: setfit\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {path}}}\ntrain: {{batch_size: 2, max_steps: 1}}\n"
    )
    code = cli.main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert re.search(rf"ember-train: error: {re.escape(str(path))}: .*'label'.*one class", err), err
