"""What a new user meets first: the thread count under ``accelerate launch``, a quiet first screen,
resume with a changed config, and the bad inputs a new user tried (issue 26), each a clear error
naming the file, row or key, with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_bert

from ember_train import cli
from ember_train.training.hardware import _cgroup_cpu_quota, choose_cpu_threads, physical_cores

ACCELERATE_ENV = {"ACCELERATE_DYNAMO_BACKEND": "no", "ACCELERATE_MIXED_PRECISION": "no"}


# --- threads -------------------------------------------------------------------------------------


def _choose(environ: dict, launcher_said: bool | None = False, configured: int = 0, cores: int = 8):
    return choose_cpu_threads(configured, environ, lambda: launcher_said, cores=cores)


def test_accelerates_default_of_one_thread_becomes_every_core():
    """`accelerate launch` without --cpu sets OMP_NUM_THREADS=1: not the user's choice."""
    assert _choose({**ACCELERATE_ENV, "OMP_NUM_THREADS": "1"}).threads == 8
    # /proc unreadable (not Linux): accelerate's 1 is still taken for its default.
    assert _choose({**ACCELERATE_ENV, "OMP_NUM_THREADS": "1"}, launcher_said=None).threads == 8


def test_cores_are_divided_among_the_processes_of_this_machine():
    environ = {**ACCELERATE_ENV, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    choice = _choose(environ, cores=8)
    assert choice.threads == 4 and "2 processes" in choice.reason
    assert _choose({**environ, "LOCAL_WORLD_SIZE": "16"}, cores=8).threads == 1  # never 0


def test_a_thread_count_the_user_chose_is_kept():
    launched = {**ACCELERATE_ENV, "OMP_NUM_THREADS": "3"}
    assert _choose(launched, launcher_said=True).threads == 3  # --num_cpu_threads_per_process 3
    assert _choose({"OMP_NUM_THREADS": "5"}).threads == 5  # python train.py with OMP_NUM_THREADS
    choice = _choose(launched, launcher_said=True, configured=6)  # the config key wins
    assert choice.threads == 6 and choice.reason == "train.cpu_threads"
    assert _choose({}).threads == 8  # python train.py: every core


def test_physical_cores_respect_affinity_and_quota(tmp_path):
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_cpu_quota(str(quota)) == 2
    quota.write_text("max 100000\n")
    assert _cgroup_cpu_quota(str(quota)) is None


def _tiny_run_config(tmp_path: Path, model: Path, train: Path | None = None, **train_keys) -> Path:
    train_keys = {"batch_size": 4, "max_steps": 2, "log_every": 1, **train_keys}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nseed: 1\n"
        f"model: {{name_or_path: {model}, max_seq_length: 16}}\n"
        f"data: {{train: {train or REPO / 'data/quickstart/train.jsonl'}, max_examples: 16}}\n"
        f"train: {json.dumps(train_keys)}\n"
        "eval: {before_training: false}\nexport: {enabled: false}\n"
    )
    return cfg


def _launch(tmp_path: Path, cfg: Path, *launcher_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch train.py`` as the README types it, with accelerate's default launch
    config written the way scripts/setup.sh writes it, in this test's own HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="")
    subprocess.run(
        [sys.executable, str(REPO / "scripts/write_accelerate_config.py")], env=env, check=True, timeout=120
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, str(REPO / "train.py")]
    return subprocess.run(
        [*cmd, "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )


def test_readme_launch_uses_every_core_and_starts_quietly(tmp_path, tiny_bert_path):
    done = _launch(tmp_path, _tiny_run_config(tmp_path, tiny_bert_path))
    screen = done.stdout + done.stderr
    assert done.returncode == 0, screen[-3000:]
    cores = physical_cores()
    assert f"devices: cpu, 1 process x {cores} threads ({cores} physical cores)" in screen, screen[:3000]
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines[0].startswith("devices: cpu"), lines[:5]  # the run's own lines come first
    # The data is read before the model, so that a bad file stops the run before a slow load.
    assert lines[1].startswith("training pairs: "), lines[:5]
    assert lines[2].startswith("model: "), lines[:5]
    for noise in (
        "were not passed to `accelerate launch`",  # accelerate's defaults block
        "Setting accelerator to CPU",  # DeepSpeed's import warning
        "Loading weights",  # transformers' per-file progress bars
        "Writing model shards",
        "LOAD REPORT",  # the tiny model has an MLM head, which the encoder does not load
    ):
        assert noise not in screen, noise
    assert screen.count("saved checkpoint") == 1, screen[-2000:]  # the last step's, once


def test_launcher_thread_flag_is_kept(tmp_path, tiny_bert_path):
    done = _launch(tmp_path, _tiny_run_config(tmp_path, tiny_bert_path), "--num_cpu_threads_per_process", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process x 1 threads (accelerate launch --num_cpu_threads_per_process" in done.stdout


# --- resume with a changed config ------------------------------------------------------------------


def test_resume_refuses_a_setting_that_would_be_ignored(tmp_path, tiny_bert_path, capsys):
    cfg = str(_tiny_run_config(tmp_path, tiny_bert_path, learning_rate=5e-5))
    assert cli.main(["train", "--config", cfg]) == 0
    capsys.readouterr()
    # The restored optimizer and schedule would keep 5e-5: the run stops and names the key.
    assert cli.main(["train", "--config", cfg, "train.learning_rate=1e-3", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 5e-05 -> 0.001" in err and "train.resume=none" in err, err
    assert "train.max_steps" not in err  # a length change takes effect: not an error
    # Starting afresh is allowed, and a longer run continues the checkpoint with the new length.
    assert cli.main(["train", "--config", cfg, "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 3


# --- bad input as a new user types it -----------------------------------------------------------------


def _error(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ember-train: error")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name_or_path=runs/missing/final", r"model 'runs/missing/final': no such directory"),
        ("model.name_or_path=/no/such/model", r"model '/no/such/model': no such directory"),
        (
            "model.name_or_path=nobody-here/no-such-model",
            r"model 'nobody-here/no-such-model': not a local directory, and not loadable from the "
            r"Hugging Face Hub: offline \(HF_HUB_OFFLINE=1\)",
        ),
        (
            "train.learning_rate=-1e-4",
            r"command line \(train.learning_rate=-1e-4\): .*learning_rate must be a positive",
        ),
        (
            "train.learning_rate=nan",
            r"command line \(train.learning_rate=nan\): .*learning_rate must be a positive",
        ),
        (
            "train.lerning_rate=1e-4",
            r"command line \(train.lerning_rate=1e-4\): unknown key 'train.lerning_rate'",
        ),
    ],
)
def test_bad_settings_fail_before_training_naming_the_key(
    tmp_path, tiny_bert_path, capsys, override, message
):
    cfg = _tiny_run_config(tmp_path, tiny_bert_path)
    line = _error(capsys, ["train", "--config", str(cfg), override])
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_identical_pairs_are_refused_not_trained_at_loss_zero(tmp_path, tiny_bert_path, capsys):
    data = tmp_path / "same.jsonl"
    data.write_text('{"query": "one query", "pos": "one document"}\n' * 20)
    line = _error(capsys, ["train", "--config", str(_tiny_run_config(tmp_path, tiny_bert_path, data))])
    assert line.startswith(f"ember-train: error: {data}: every batch holds a single pair (16 pairs"), line


def test_fewer_pairs_than_the_batch_size_are_announced(tmp_path, tiny_bert_path, capsys, caplog):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {i}", "pos": f"document {i}"}) + "\n" for i in range(3)))
    cfg = _tiny_run_config(tmp_path, tiny_bert_path, data, batch_size=32, max_steps=1)
    assert cli.main(["train", "--config", str(cfg)]) == 0
    assert "only 3 pairs: a batch holds at most 3, not 32" in caplog.text


def _one_step_config(tmp_path: Path, task: str, model: Path, train: Path) -> Path:
    cfg = tmp_path / f"{task}.yaml"
    cfg.write_text(
        f"task: {task}\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {model}, max_seq_length: 16}}\n"
        f"data: {{train: {train}}}\ntrain: {{batch_size: 2, max_steps: 1}}\n"
    )
    return cfg


def test_retromae_with_an_empty_corpus_names_the_file(tmp_path, tiny_bert_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = _error(
        capsys, ["train", "--config", str(_one_step_config(tmp_path, "retromae", tiny_bert_path, empty))]
    )
    assert line.startswith(f"ember-train: error: {empty}: 0 usable texts"), line


def test_setfit_with_one_text_per_label_names_the_file_and_the_key(tmp_path, tiny_bert_path, capsys):
    data = tmp_path / "labelled.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"text {i}", "label": lab}) + "\n" for i, lab in enumerate("abc"))
    )
    line = _error(
        capsys, ["train", "--config", str(_one_step_config(tmp_path, "setfit", tiny_bert_path, data))]
    )
    assert line.startswith(f"ember-train: error: {data}: no positive pairs"), line
    assert "pairs.include_self_pairs: true" in line


def test_retromae_from_a_body_without_mlm_head_says_so_in_one_line(tmp_path, caplog):
    """A sentence-transformers body has no MLM head: transformers' 'checkpoint seem corrupted'
    warning and its key table are replaced by one line saying a new head is initialised."""
    from transformers import AutoModel, AutoTokenizer

    from ember_train.models.retromae import RetroMAEModel

    source = make_tiny_bert(tmp_path / "with-head")
    body = tmp_path / "body"  # the encoder alone, as sentence-transformers ships it
    AutoModel.from_pretrained(source).save_pretrained(body)
    AutoTokenizer.from_pretrained(source).save_pretrained(body)
    cli._setup_logging()
    caplog.set_level("INFO")
    caplog.clear()  # the set-up's own loads above are not under test
    RetroMAEModel.from_pretrained(body, max_seq_length=16)
    assert "no MaskedLM head: a new one is initialised (cls" in caplog.text
    assert "seem corrupted" not in caplog.text and "LOAD REPORT" not in caplog.text
