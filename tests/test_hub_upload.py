"""``export.hub_repo_id``: access checked before training, the export uploaded after it.

The Hub cannot be reached from tests, so ``HfApi`` is replaced by a fake that checks every call
against the real ``HfApi`` method's signature and copies uploaded folders into a local "hub".
"""

from __future__ import annotations

import filecmp
import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FIXTURES, REPO
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from ember_train import cli
from ember_train.config import ConfigError
from ember_train.export import hub
from ember_train.export.model_card import split_front_matter
from ember_train.pipelines import get_pipeline, load_config

REPO_ID = "debian-team/ember-debian"


class FakeHub:
    """Stands in for ``HfApi()``; ``log`` records (method, bound arguments, run state)."""

    def __init__(self, root: Path, watch: Path | None = None):
        self.root, self.watch = root, watch
        self.log: list[tuple[str, dict, bool]] = []
        self.fail: dict[str, Exception] = {}
        self.token_role = "write"

    def __call__(self, *args, **kwargs) -> FakeHub:  # HfApi(...) -> this fake
        return self

    def _record(self, name: str, *args, **kwargs) -> dict:
        bound = inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs).arguments
        bound.pop("self")
        started = self.watch is not None and (self.watch / "metrics.jsonl").exists()
        self.log.append((name, bound, started))
        if name in self.fail:
            raise self.fail[name]
        return bound

    def whoami(self, *args, **kwargs) -> dict:
        self._record("whoami", *args, **kwargs)
        return {"name": "someone", "auth": {"type": "access_token", "accessToken": {"role": self.token_role}}}

    def create_repo(self, *args, **kwargs) -> str:
        bound = self._record("create_repo", *args, **kwargs)
        return f"https://huggingface.co/{bound['repo_id']}"

    def upload_folder(self, *args, **kwargs) -> None:
        bound = self._record("upload_folder", *args, **kwargs)
        shutil.copytree(bound["folder_path"], self.root / bound["repo_id"], dirs_exist_ok=True)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub", watch=tmp_path / "run")
    monkeypatch.setattr(hub, "HfApi", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(task: str, model: Path, tmp_path: Path) -> Path:
    """A two-step run of ``task`` on the tiny BERT, written as YAML like a user's config."""
    if task == "contrastive":
        data = f"{{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 16}}"
    elif task == "setfit":
        rows = [{"text": f"{w} {w} package {i}", "label": w} for i in range(4) for w in ("net", "doc")]
        data = f"{{train: {write_jsonl(tmp_path / 'labelled.jsonl', rows)}}}"
    else:
        data = f"{{train: {FIXTURES / 'retromae' / 'debian_long.jsonl'}, max_texts: 16}}"
    path = tmp_path / f"{task}.yaml"
    path.write_text(
        f"task: {task}\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {model}, max_seq_length: 32}}\ndata: {data}\n"
        "train: {batch_size: 8, max_steps: 2, report_to: [jsonl]}\n"
    )
    return path


@pytest.mark.parametrize("task", ["contrastive", "setfit", "retromae"])
def test_a_run_checks_access_first_and_uploads_its_export(task, tiny_bert_path, tmp_path, fake_hub):
    cfg = load_config(str(run_config(task, tiny_bert_path, tmp_path)), [f"export.hub_repo_id={REPO_ID}"])
    results = get_pipeline(task).run(cfg, command="accelerate launch train.py ...")

    assert [(name, started) for name, _, started in fake_hub.log] == [
        ("whoami", False),  # before the first training step was logged
        ("create_repo", True),
        ("upload_folder", True),
    ]
    create, upload = fake_hub.log[1][1], fake_hub.log[2][1]
    assert create["repo_id"] == REPO_ID and create["private"] is True and create["exist_ok"] is True
    export_dir = Path(results["export_dir"])
    assert Path(upload["folder_path"]) == export_dir and upload["repo_id"] == REPO_ID
    assert "accelerate launch train.py" in upload["commit_description"]
    assert (tmp_path / "run" / "results.json").is_file()  # written before the upload

    uploaded = fake_hub.root / REPO_ID
    for name in ("model.safetensors", "config.json", "modules.json", "README.md"):
        assert filecmp.cmp(uploaded / name, export_dir / name, shallow=False), name
    front, body = split_front_matter((uploaded / "README.md").read_text())
    assert "base_model" not in front  # a local path: the Hub rejects it as base_model
    assert front["model-index"][0]["name"] == REPO_ID
    assert f"SentenceTransformer('{REPO_ID}')" in body


def test_hub_access_problems_fail_before_training(tiny_bert_path, tmp_path, fake_hub, monkeypatch):
    cfg_path = run_config("contrastive", tiny_bert_path, tmp_path)
    cfg = load_config(str(cfg_path), [f"export.hub_repo_id={REPO_ID}"])

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        get_pipeline("contrastive").run(cfg)
    assert fake_hub.log == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unauthorized = SimpleNamespace(status_code=401, headers={}, request=None)  # the response's parts it reads
    bad_gateway = SimpleNamespace(status_code=502, headers={}, request=None)
    for error, message in [
        (LocalTokenNotFoundError("Token is required"), "no Hugging Face token"),
        (
            HfHubHTTPError("401 Unauthorized", response=unauthorized),
            "refused the token",
        ),
        (HfHubHTTPError("502 Bad Gateway", response=bad_gateway), "cannot reach the Hugging Face Hub"),
        (ConnectionError("Name or service not known"), "cannot reach the Hugging Face Hub"),
    ]:
        fake_hub.fail["whoami"] = error
        with pytest.raises(ConfigError, match=message):
            get_pipeline("contrastive").run(cfg)
    fake_hub.fail.clear()
    fake_hub.token_role = "read"
    with pytest.raises(ConfigError, match="read-only"):
        get_pipeline("contrastive").run(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failed_upload_keeps_the_export_and_says_how_to_upload_it(
    tiny_bert_path, tmp_path, fake_hub, capsys
):
    fake_hub.fail["upload_folder"] = ConnectionError("connection reset")
    overrides = [f"export.hub_repo_id={REPO_ID}"]
    code = cli.main(
        ["train", "--config", str(run_config("contrastive", tiny_bert_path, tmp_path)), *overrides]
    )

    assert code == 1
    err = capsys.readouterr().err
    export_dir = tmp_path / "run" / "final"
    assert f"hf upload {REPO_ID} {export_dir}" in err and "connection reset" in err
    assert "Traceback" not in err
    assert (export_dir / "model.safetensors").is_file() and (tmp_path / "run" / "results.json").is_file()


def test_export_command_uploads_a_checkpoint(tiny_bert_path, tmp_path, fake_hub, capsys):
    cfg = load_config(str(run_config("contrastive", tiny_bert_path, tmp_path)), ["export.enabled=false"])
    get_pipeline("contrastive").run(cfg)
    assert fake_hub.log == []  # no hub_repo_id in the run: nothing touched the Hub
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    out = tmp_path / "exported"

    assert cli.main(["export", str(checkpoint), str(out), "--hub-repo-id", REPO_ID, "--no-hub-private"]) == 0
    assert [name for name, _, _ in fake_hub.log] == ["whoami", "create_repo", "upload_folder"]
    assert fake_hub.log[1][1]["private"] is False
    assert Path(fake_hub.log[2][1]["folder_path"]) == out
    assert filecmp.cmp(
        fake_hub.root / REPO_ID / "model.safetensors", out / "model.safetensors", shallow=False
    )
    assert f"uploaded {out}" in capsys.readouterr().out

    assert cli.main(["export", str(checkpoint), str(out), "--hub-repo-id", "not a repo"]) == 2
    assert "--hub-repo-id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export.hub_repo_id=not a repo", "Repo id must"),
        ("export.hub_repo_id=ember-debian", "user-or-org/name"),
    ],
)
def test_bad_hub_settings_are_config_errors(override, message, tiny_bert_path, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(str(run_config("contrastive", tiny_bert_path, tmp_path)), [override])
    with pytest.raises(ConfigError, match="needs enabled: true"):
        load_config(
            str(run_config("contrastive", tiny_bert_path, tmp_path)),
            [f"export.hub_repo_id={REPO_ID}", "export.enabled=false"],
        )
