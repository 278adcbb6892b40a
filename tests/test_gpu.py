"""What only a CUDA GPU shows: bf16 and fp16 (with loss scaling) training, and DeepSpeed on a GPU.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu tests/test_gpu.py``.
Everything else in the suite also runs on a GPU machine: the pipelines then train on ``cuda``
(accelerate picks the device), and the gradient-cache equality test has a ``cuda`` case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


STEPS = 6
# Measured on an H200 (MiniLM without dropout, 6 steps, against fp32): autocast bf16 per-step
# losses within 6.5%, update cosine 0.997 (fp16: 0.6%, 0.9995); DeepSpeed's bf16 (bf16 weights
# and gradients, fp32 master copy) within 12%, update cosine 0.885-0.887.
AUTOCAST = {"loss_rel": 0.1, "min_cosine": 0.99}
DEEPSPEED_BF16 = {"loss_rel": 0.2, "min_cosine": 0.8}


def _config(tmp: Path, name: str, model: Path, **train: object) -> Path:
    train_cfg = {
        "batch_size": 16,
        "max_steps": STEPS,
        "log_every": 1,
        "learning_rate": 1e-4,
        "resume": "none",
    }
    train_cfg.update(train)
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp / name}\nseed: 5\n"
        f"model: {{name_or_path: '{model}', max_seq_length: 64, normalize: true}}\n"
        f"data: {{train: {REPO}/data/quickstart/train.jsonl, max_examples: 96}}\n"
        "loss: {temperature: 0.05}\n"
        f"train: {json.dumps(train_cfg)}\n"
    )
    return path


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _update_cosine(initial: dict, a: dict, b: dict) -> float:
    """Cosine between two runs' total weight updates over the transformer layers' matrices."""
    keys = [k for k in initial if "layer." in k and initial[k].ndim == 2]
    delta_a = torch.cat([(a[k].float() - initial[k].float()).flatten() for k in keys])
    delta_b = torch.cat([(b[k].float() - initial[k].float()).flatten() for k in keys])
    return float(torch.nn.functional.cosine_similarity(delta_a, delta_b, dim=0))


def _train_in_process(config: Path, *overrides: str) -> None:
    from accelerate.state import AcceleratorState

    from ember_train.pipelines import contrastive, load_config

    AcceleratorState._reset_state(reset_partial_state=True)  # precision is fixed once per process
    contrastive.run(load_config(str(config), list(overrides)))
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, minilm_path) -> Path:
    """MiniLM without dropout: runs in different precisions then differ by rounding alone (with
    dropout, fp32 and bf16 attention take different CUDA kernels that draw different masks)."""
    path = tmp_path_factory.mktemp("minilm-no-dropout") / "model"
    shutil.copytree(minilm_path, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, model_path) -> Path:
    tmp = tmp_path_factory.mktemp("gpu")
    _train_in_process(_config(tmp, "fp32", model_path))
    return tmp / "fp32"


def _assert_trains_like_fp32(
    run: Path, fp32_run: Path, initial: dict, loss_rel: float, min_cosine: float
) -> None:
    """Per-step losses within ``loss_rel`` of fp32's, and weight updates pointing the same way."""
    losses = [r["loss"] for r in _records(run)]
    reference = [r["loss"] for r in _records(fp32_run)]
    cosine = _update_cosine(initial, _weights(run / "final"), _weights(fp32_run / "final"))
    print(f"\n{run.name}: losses {losses}\n  fp32 losses {reference}\n  update cosine vs fp32 {cosine:.4f}")
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, rel=loss_rel)
    assert cosine > min_cosine


@pytest.mark.parametrize("precision,chunk", [("bf16", 0), ("fp16", 0), ("bf16", 8), ("fp16", 8)])
def test_mixed_precision_trains_like_fp32(fp32_run, tmp_path, model_path, precision, chunk):
    """Same job in fp32 and mixed precision (plain and with the gradient cache): losses close to
    fp32's, updates pointing the same way, fp32 weights exported, and fp16 with a live loss scale."""
    name = f"{precision}_gc{chunk}"
    _train_in_process(
        _config(tmp_path, name, model_path, mixed_precision=precision, grad_cache_chunk_size=chunk)
    )
    _assert_trains_like_fp32(tmp_path / name, fp32_run, _weights(model_path), **AUTOCAST)
    records = _records(tmp_path / name)
    if precision == "fp16":  # accelerate's GradScaler is in use, and its scale is logged
        assert all(r["loss_scale"] > 0 for r in records)
    else:
        assert "loss_scale" not in records[0]
    trained = _weights(tmp_path / name / "final")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in trained.values())

    # The export gives sentence-transformers on the GPU the training-time vectors.
    from sentence_transformers import SentenceTransformer

    from ember_train.models import Encoder

    texts = ["install a web server", "a library for parsing YAML files"]
    encoder = Encoder.from_pretrained(tmp_path / name / "final").cuda().eval()
    st = SentenceTransformer(str(tmp_path / name / "final"), device="cuda")
    torch.testing.assert_close(
        torch.as_tensor(st.encode(texts)), encoder.encode(texts).cpu(), atol=1e-5, rtol=1e-4
    )


def test_gradient_checkpointing_in_bf16(fp32_run, tmp_path, model_path):
    _train_in_process(
        _config(tmp_path, "ckpt", model_path, mixed_precision="bf16", gradient_checkpointing=True)
    )
    _assert_trains_like_fp32(tmp_path / "ckpt", fp32_run, _weights(model_path), **AUTOCAST)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_on_one_gpu_trains_like_plain_bf16(fp32_run, tmp_path, model_path, zero_stage):
    """ZeRO-2/3 launched by accelerate on one GPU in bf16: DeepSpeed really runs (its checkpoint
    format), losses follow fp32's, and the export is the fp32 master copy, not bf16-rounded weights."""
    pytest.importorskip("deepspeed")
    name = f"zero{zero_stage}"
    config = _config(tmp_path, name, model_path, mixed_precision="bf16", checkpoint_every=3)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "1"]
    cmd += ["--deepspeed_config_file", str(REPO / "configs" / "deepspeed" / f"zero{zero_stage}.json")]
    cmd += [str(REPO / "train.py"), "--config", str(config)]  # bf16: the run config's mixed_precision
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / name
    assert (run / "checkpoints" / f"step_{STEPS:07d}" / "latest").is_file()
    trained = _weights(run / "final")
    layers = [w for k, w in trained.items() if "layer." in k and w.ndim == 2]
    assert any((w.to(torch.bfloat16).float() != w).any() for w in layers), "bf16-rounded weights exported"
    # DeepSpeed's bf16 keeps weights and gradients in bf16 (no autocast): looser tolerances.
    _assert_trains_like_fp32(run, fp32_run, _weights(model_path), **DEEPSPEED_BF16)
