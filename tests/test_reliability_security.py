"""Safe loading: no code runs from a config, a weight file or a checkpoint unless the user asked,
and no secret from the environment ends up in the logs, the saved config or the model card."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from ember_train import cli
from ember_train.models.encoder import Encoder, UnsafeWeightsError


class _Exploit:
    """Unpickling this writes a file: stands for arbitrary code in a downloaded weight file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def _pickle_only_copy(model_dir: Path, out: Path, weights: object | None = None) -> Path:
    """``model_dir`` with its safetensors weights replaced by a ``pytorch_model.bin``."""
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(model_dir / "model.safetensors")) if weights is None else weights
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_bert_path):
    path = _pickle_only_copy(tiny_bert_path, tmp_path / "pickled")
    with pytest.raises(UnsafeWeightsError) as info:
        Encoder.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "pytorch_model.bin" in message
    assert "model.allow_pickle_weights: true" in message

    allowed = Encoder.from_pretrained(path, allow_pickle_weights=True).state_dict()
    reference = Encoder.from_pretrained(tiny_bert_path).state_dict()
    compared = [n for n in reference if "pooler" not in n]  # the MLM checkpoint has no pooler: random init
    assert len(compared) > 10
    for name in compared:
        assert torch.equal(allowed[name], reference[name]), name


def test_safetensors_next_to_a_pickle_file_loads_the_safetensors(tmp_path, tiny_bert_path):
    path = tmp_path / "both"
    shutil.copytree(tiny_bert_path, path)
    torch.save({"junk": torch.zeros(1)}, path / "pytorch_model.bin")
    Encoder.from_pretrained(path)  # no refusal: the safe file is there and is the one read


def test_allowed_pickle_weights_are_still_read_without_running_code(tmp_path, tiny_bert_path):
    target = tmp_path / "pwned.txt"
    path = _pickle_only_copy(tiny_bert_path, tmp_path / "evil", weights={"x": _Exploit(target)})
    with pytest.raises(Exception, match="(?i)weights.only"):
        Encoder.from_pretrained(path, allow_pickle_weights=True)
    assert not target.exists()


def test_cli_refuses_pickle_weights_in_one_line(tmp_path, tiny_bert_path, capsys):
    path = _pickle_only_copy(tiny_bert_path, tmp_path / "pickled")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {path}}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}}}\n"
    )
    assert cli.main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ember-train:")]
    assert len(lines) == 1 and "only pickle files (pytorch_model.bin)" in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_cli_refuses_python_yaml_tags_without_running_them(tmp_path, capsys):
    target = tmp_path / "pwned.txt"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"task: !!python/object/apply:pathlib.Path.touch [{target}]\n")
    assert cli.main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "python/object/apply" in err and "Traceback" not in err
    assert not target.exists()


SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_SeCrEtToKeNvAlUe0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_OtherSeCrEtToKeN0123456789abcd",
}


def test_no_secret_from_the_environment_reaches_logs_config_or_model_card(tmp_path, tiny_bert_path):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {run}\nmodel: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 16}}\n"
        f"eval: {{data: {REPO / 'data/quickstart/dev.jsonl'}, max_queries: 8}}\n"
        "train: {batch_size: 4, max_steps: 2, checkpoint_every: 1, log_every: 1}\n"
    )
    env = {**__import__("os").environ, **SECRETS}
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(cfg)],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "metrics.jsonl", "README.md", "checkpoint.json", "results.json"} <= names
    for secret in SECRETS.values():
        needle = secret.encode()
        assert needle not in done.stdout and needle not in done.stderr
        leaked = [str(p) for p in files if needle in p.read_bytes()]
        assert not leaked, leaked


def test_no_pickle_is_written_where_safetensors_will_do(tmp_path, tiny_bert_path):
    """Exports and checkpoint weights are safetensors; the only pickles are accelerate's
    optimizer/scheduler/RNG files, which resume reads with weights_only=True."""
    from ember_train.pipelines import contrastive, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 8}}\n"
        "train: {batch_size: 4, max_steps: 1}\neval: {before_training: false}\n"
    )
    contrastive.run(load_config(str(cfg)))
    pickles = sorted(
        p.relative_to(tmp_path / "run").as_posix()
        for p in (tmp_path / "run").rglob("*")
        if p.suffix in (".bin", ".pkl", ".pt", ".pth")
    )
    assert pickles == [
        "checkpoints/step_0000001/optimizer.bin",
        "checkpoints/step_0000001/random_states_0.pkl",
        "checkpoints/step_0000001/scheduler.bin",
    ]
    with pytest.raises(pickle.UnpicklingError):  # sanity: the planted-pickle check above is meaningful
        torch.load(_write_exploit(tmp_path), weights_only=True)


def _write_exploit(tmp_path: Path) -> Path:
    path = tmp_path / "exploit.bin"
    torch.save({"x": _Exploit(tmp_path / "never.txt")}, path)
    return path


def test_config_can_allow_pickle_weights_explicitly(tmp_path, tiny_bert_path):
    path = _pickle_only_copy(tiny_bert_path, tmp_path / "pickled")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {path}, max_seq_length: 16, allow_pickle_weights: true}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 8}}\n"
        "train: {batch_size: 4, max_steps: 1}\neval: {before_training: false}\nexport: {enabled: false}\n"
    )
    assert cli.main(["train", "--config", str(cfg)]) == 0
