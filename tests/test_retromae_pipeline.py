"""The RetroMAE recipe end to end on a tiny BERT: learning, logging, exact resume, and outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REPO, two_process_launch
from test_retromae_masking import corpus_texts, train_wordpiece

from ember_train.config import from_dict
from ember_train.models import Encoder
from ember_train.pipelines import load_config
from ember_train.pipelines.retromae import RetroMAEConfig, run

CORPUS = FIXTURES / "retromae" / "debian_long.jsonl"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> Path:
    """A tiny random BERT with a 2,000-token WordPiece vocabulary trained on the fixture corpus.

    MiniLM's 30k vocabulary makes the output layer dominate a tiny model's step on CPU; a small
    vocabulary keeps these end-to-end runs to seconds and lets the loss fall visibly.
    """
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("small-bert")
    tokenizer = train_wordpiece(2000)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_cfg(model_path: Path, output_dir: Path, **sections) -> RetroMAEConfig:
    data = {
        "task": "retromae",
        "output_dir": str(output_dir),
        "seed": 7,
        "model": {"name_or_path": str(model_path), "max_seq_length": 64},
        "data": {"train": str(CORPUS), "max_texts": 160},
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "checkpoint_every": 3,
            "keep_checkpoints": 5,
            "resume": "none",
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return from_dict(RetroMAEConfig, data, source="test")


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_records(output_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(output_dir) if "loss" in r}


def test_loss_decreases_and_both_losses_are_logged(small_bert, tmp_path):
    cfg = make_cfg(
        small_bert,
        tmp_path / "run",
        train={"max_steps": 20, "learning_rate": 5e-3, "checkpoint_every": 0, "keep_checkpoints": 1},
        eval={"data": str(CORPUS), "max_texts": 16},
        export={"enabled": False},
    )
    results = run(cfg)
    records = train_records(tmp_path / "run")
    assert sorted(records) == list(range(1, 21))
    for r in records.values():
        for key in ("enc_mlm_loss", "dec_mlm_loss", "enc_mlm_acc", "dec_mlm_acc", "tokens_per_s"):
            assert key in r, key
        assert r["loss"] == pytest.approx(r["enc_mlm_loss"] + r["dec_mlm_loss"], rel=1e-5)
    first = sum(records[s]["loss"] for s in range(1, 5)) / 4
    last = sum(records[s]["loss"] for s in range(17, 21)) / 4
    assert last < first - 1.5, (first, last)
    for side in ("enc", "dec"):
        side_first = sum(records[s][f"{side}_mlm_loss"] for s in range(1, 5)) / 4
        side_last = sum(records[s][f"{side}_mlm_loss"] for s in range(17, 21)) / 4
        assert side_last < side_first - 0.5, (side, side_first, side_last)
        assert results["eval_after"][f"{side}_mlm_loss"] < results["eval_before"][f"{side}_mlm_loss"]
    assert results["eval_after"]["dec_mlm_acc"] > results["eval_before"]["dec_mlm_acc"]


def test_mlm_objective_trains_the_encoder_alone_and_exports(small_bert, tmp_path):
    """``retromae.objective: mlm``: the same encoder masking and MLM loss, no decoder anywhere
    (parameters, loss, logs, evaluation, saved files), and the same outputs as a RetroMAE run."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForMaskedLM

    from ember_train.pipelines.retromae import build_model, export_checkpoint

    out = tmp_path / "run"
    cfg = make_cfg(
        small_bert,
        out,
        retromae={"objective": "mlm"},
        train={"max_steps": 20, "learning_rate": 5e-3, "checkpoint_every": 20, "keep_checkpoints": 1},
        eval={"data": str(CORPUS), "max_texts": 16},
    )
    assert build_model(cfg).decoder is None
    results = run(cfg)
    records = train_records(out)
    assert sorted(records) == list(range(1, 21))
    for r in records.values():
        assert "enc_mlm_loss" in r and "enc_mlm_acc" in r
        assert not any(key.startswith("dec_") for key in r), r
        assert r["loss"] == pytest.approx(r["enc_mlm_loss"], rel=1e-5)
    first = sum(records[s]["enc_mlm_loss"] for s in range(1, 5)) / 4
    last = sum(records[s]["enc_mlm_loss"] for s in range(17, 21)) / 4
    assert last < first - 0.5, (first, last)
    assert set(results["eval_after"]) == {"enc_mlm_acc", "enc_mlm_loss"}
    assert results["eval_after"]["enc_mlm_loss"] < results["eval_before"]["enc_mlm_loss"]

    checkpoint = out / "checkpoints" / "step_0000020"
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(checkpoint / "model.safetensors")) if k.startswith("decoder.")]
    pretrained, final = Path(results["pretrained_dir"]), Path(results["export_dir"])
    assert (
        not (pretrained / "decoder.safetensors").exists()
        and not (pretrained / "decoder_config.json").exists()
    )
    AutoModelForMaskedLM.from_pretrained(pretrained)
    texts = corpus_texts(4)
    encoder = Encoder.from_pretrained(final)
    assert encoder.pooling == "cls"
    ours = encoder.encode(texts)
    assert torch.allclose(
        torch.as_tensor(SentenceTransformer(str(final), device="cpu").encode(texts)), ours, atol=1e-5
    )
    exported = export_checkpoint(cfg, checkpoint, tmp_path / "exported")
    assert torch.allclose(Encoder.from_pretrained(exported).encode(texts), ours, atol=1e-5)
    assert not (exported / "mlm" / "decoder.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retromae.objective=contrastive", "retromae.objective"),
        ("retromae.init_decoder_from=runs/x/pretrained", "init_decoder_from needs objective: retromae"),
        ("retromae.freeze_encoder_steps=-1", "freeze_encoder_steps must be >= 0"),
        ("retromae.encoder_lr_scale=0", "encoder_lr_scale must be a number > 0"),
    ],
)
def test_retromae_section_config_errors(tmp_path, override, message):
    """A bad objective, a decoder to load into an MLM-only run, or a bad warm-up stops at the config,
    before any model."""
    from ember_train.config import ConfigError

    cfg = tmp_path / "mlm.yaml"
    cfg.write_text(
        "task: retromae\nmodel: {name_or_path: does-not-exist}\ndata: {train: nowhere.jsonl}\n"
        "retromae: {objective: mlm}\n"
    )
    assert load_config(str(cfg)).retromae.objective == "mlm"
    with pytest.raises(ConfigError, match=message):
        load_config(str(cfg), [override])


def test_data_loader_workers_change_nothing(small_bert, tmp_path):
    """The shipped BERT-base config masks in 4 workers: masks are keyed by (seed, epoch, batch,
    rank), not by the process that draws them, so workers give the same run, resume included."""
    run(make_cfg(small_bert, tmp_path / "main", export={"enabled": False}))
    run(make_cfg(small_bert, tmp_path / "workers", train={"num_workers": 2}, export={"enabled": False}))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "main" / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003"
    )
    run(make_cfg(small_bert, resumed, train={"resume": "auto", "num_workers": 2}, export={"enabled": False}))

    main, workers, after_resume = (train_records(tmp_path / n) for n in ("main", "workers", "resumed"))
    assert sorted(main) == sorted(workers) == list(range(1, 7)) and sorted(after_resume) == [4, 5, 6]
    for step in range(1, 7):
        assert workers[step]["loss"] == main[step]["loss"], step
    for step in (4, 5, 6):
        assert after_resume[step]["loss"] == pytest.approx(main[step]["loss"], abs=1e-5), step


def test_resume_gives_the_same_next_steps_as_not_stopping(small_bert, tmp_path):
    straight = tmp_path / "straight"
    run(make_cfg(small_bert, straight, export={"enabled": False}))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    run(make_cfg(small_bert, resumed, train={"resume": "auto"}, export={"enabled": False}))

    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "enc_mlm_loss", "dec_mlm_loss"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)


def test_outputs_load_in_transformers_sentence_transformers_and_contrastive(small_bert, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "run"
    results = run(make_cfg(small_bert, out, train={"max_steps": 3}))
    pretrained, final = Path(results["pretrained_dir"]), Path(results["export_dir"])
    assert (pretrained / "decoder.safetensors").is_file() and (pretrained / "decoder_config.json").is_file()

    # The MLM checkpoint carries the trained weights, with the output layer tied to them.
    trained = load_file(str(out / "checkpoints" / "step_0000003" / "model.safetensors"))
    embeddings = trained["mlm.bert.embeddings.word_embeddings.weight"]
    mlm = AutoModelForMaskedLM.from_pretrained(pretrained)
    assert torch.equal(mlm.get_input_embeddings().weight, embeddings)
    assert torch.equal(mlm.get_output_embeddings().weight, embeddings)
    initial = AutoModelForMaskedLM.from_pretrained(small_bert)
    assert not torch.equal(initial.get_input_embeddings().weight, embeddings)  # it did train

    # The export: same vectors from our Encoder and from sentence-transformers, [CLS] pooling kept.
    texts = corpus_texts(4)
    encoder = Encoder.from_pretrained(final)
    assert encoder.pooling == "cls" and encoder.max_seq_length == 64
    ours = encoder.encode(texts)
    st = SentenceTransformer(str(final), device="cpu")
    assert torch.allclose(torch.as_tensor(st.encode(texts)), ours, atol=1e-5)

    # `ember-train export` of the last checkpoint gives the same encoder (and the MLM + decoder).
    from ember_train.pipelines.retromae import export_checkpoint

    cfg = make_cfg(small_bert, out, train={"max_steps": 3})
    exported = export_checkpoint(cfg, out / "checkpoints" / "step_0000003", tmp_path / "exported")
    assert torch.allclose(Encoder.from_pretrained(exported).encode(texts), ours, atol=1e-5)
    assert (exported / "mlm" / "decoder.safetensors").is_file()

    # The next stage: a contrastive run takes the export as its model.
    from ember_train.pipelines.contrastive import ContrastiveConfig
    from ember_train.pipelines.contrastive import run as run_contrastive

    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for text in corpus_texts(16):
            f.write(json.dumps({"query": text.split(".")[0][:60], "pos": text}) + "\n")
    contrastive = from_dict(
        ContrastiveConfig,
        {
            "task": "contrastive",
            "output_dir": str(tmp_path / "contrastive"),
            "model": {"name_or_path": str(final)},
            "data": {"train": str(pairs)},
            "train": {"max_steps": 2, "batch_size": 8, "resume": "none", "log_every": 1},
            "export": {"enabled": False},
        },
        source="test",
    )
    outcome = run_contrastive(contrastive)
    assert outcome["steps"] == 2


def test_streaming_with_packing_runs(small_bert, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(t.replace("\n", " ") for t in corpus_texts(60)) + "\n", encoding="utf-8")
    cfg = make_cfg(
        small_bert,
        tmp_path / "run",
        data={
            "train": str(txt),
            "streaming": True,
            "join_texts": True,
            "shuffle_buffer": 16,
            "max_texts": None,
        },
        train={"max_steps": 3, "checkpoint_every": 0},
        export={"enabled": False},
    )
    results = run(cfg)
    assert results["steps"] == 3
    assert sorted(train_records(tmp_path / "run")) == [1, 2, 3]


def test_streaming_without_a_step_budget_is_a_clear_error(small_bert, tmp_path):
    cfg = make_cfg(
        small_bert, tmp_path / "run", data={"streaming": True}, train={"max_steps": -1, "epochs": 1}
    )
    with pytest.raises(ValueError, match="max_steps"):
        run(cfg)


@pytest.mark.parametrize("name", ["retromae_quick.yaml", "retromae_bert_base.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert isinstance(cfg, RetroMAEConfig)
    assert cfg.retromae.encoder_mask_ratio == 0.3 and cfg.retromae.decoder_mask_ratio == 0.5


def test_paper_config_matches_the_paper_setting():
    cfg = load_config(str(REPO / "configs" / "retromae_bert_base.yaml"))
    assert cfg.model.name_or_path == "bert-base-uncased" and cfg.model.max_seq_length == 512
    assert (
        cfg.train.learning_rate == 1e-4 and cfg.train.warmup_ratio == 0.1 and cfg.train.weight_decay == 0.01
    )


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_training(small_bert, tmp_path, streaming):
    """``accelerate launch`` with 2 gloo processes: DDP over encoder, head and decoder; both data
    paths. In memory, the encoder is held still for every step (``freeze_encoder_steps``) while
    the head and decoder learn: the groups survive DDP's wrapping."""
    import subprocess

    from safetensors.torch import load_file

    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: retromae\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {small_bert}, max_seq_length: 48}}\n"
        f"data: {{train: {CORPUS}, max_texts: 64, streaming: {str(streaming).lower()}}}\n"
        "train: {batch_size: 4, max_steps: 3, gradient_accumulation_steps: 2, log_every: 1}\n"
        + ("" if streaming else "retromae: {freeze_encoder_steps: 3}\n")
    )
    cmd, env = two_process_launch(REPO / "train.py", "--config", cfg)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 3
    assert (tmp_path / "run" / "pretrained" / "decoder.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    if not streaming:
        start = load_file(str(small_bert / "model.safetensors"))
        final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
        assert final and all(torch.equal(final[k], start[f"bert.{k}"]) for k in final if "pooler" not in k)
        head = load_file(str(tmp_path / "run" / "pretrained" / "model.safetensors"))
        key = "cls.predictions.transform.dense.weight"
        assert not torch.equal(head[key], start[key])


def test_a_frozen_encoder_waits_while_the_head_and_decoder_learn(small_bert, tmp_path):
    """``retromae.freeze_encoder_steps``: the backbone (word embeddings, hence the tied head's output
    layer, included) is unchanged for those steps, the head's transform and the decoder move; then
    the encoder warms up afresh at ``encoder_lr_scale`` x the learning rate. Resume keeps the plan."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = make_cfg(
        small_bert,
        out,
        retromae={"freeze_encoder_steps": 3, "encoder_lr_scale": 0.5},
        train={"warmup_ratio": 0.25, "checkpoint_every": 3},
        export={"enabled": False},
    )
    run(cfg)
    start = load_file(str(small_bert / "model.safetensors"))
    frozen = load_file(str(out / "checkpoints/step_0000003/model.safetensors"))
    after = load_file(str(out / "checkpoints/step_0000006/model.safetensors"))
    body = [k for k in frozen if k.startswith("mlm.bert.") and "pooler" not in k]
    assert "mlm.bert.embeddings.word_embeddings.weight" in body and len(body) > 20
    for key in body:
        assert torch.equal(frozen[key], start[key.removeprefix("mlm.")]), key
    assert any(not torch.equal(after[key], frozen[key]) for key in body)
    for key in ("mlm.cls.predictions.transform.dense.weight", "decoder.layers.0.q_proj.weight"):
        assert not torch.equal(frozen[key], after[key]) and key in frozen

    # 6 steps, warm-up int(0.25 x 6) = 1 step; the logged lr is the next step's. The encoder's
    # schedule starts at step 3 (0 there, as any warm-up's first step), falls to 0 with the rest.
    records = train_records(out)
    lr = 1e-3
    assert [records[s]["lr/encoder"] for s in range(1, 7)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.5 * lr, 0.5 * lr / 2, 0.0], abs=1e-12
    )
    assert [records[s]["lr"] for s in range(1, 7)] == pytest.approx([lr * (6 - s) / 5 for s in range(1, 7)])

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints/step_0000003", resumed / "checkpoints/step_0000003")
    run(make_cfg(small_bert, resumed, retromae={"freeze_encoder_steps": 3, "encoder_lr_scale": 0.5},
                 train={"warmup_ratio": 0.25, "resume": "auto"}, export={"enabled": False}))  # fmt: skip
    again = train_records(resumed)
    for step in (4, 5, 6):
        assert again[step]["lr/encoder"] == pytest.approx(records[step]["lr/encoder"], abs=1e-12)
        assert again[step]["loss"] == pytest.approx(records[step]["loss"], abs=1e-5)
