from dataclasses import dataclass, field

import pytest

from ember_train.config import ConfigError, apply_overrides, from_dict, read_yaml
from ember_train.config.schema import ModelConfig, TrainConfig
from ember_train.pipelines import load_config


@dataclass
class _Section:
    name: str
    size: int = 1
    ratio: float = 0.5
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None


@dataclass
class _Top:
    section: _Section
    flag: bool = False


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_overrides_with_type_conversion():
    data = apply_overrides(
        {"section": {"name": "a"}},
        ["section.size=7", "section.ratio=1e-4", "flag=true", "section.tags=[x, y]", "section.maybe=null"],
    )
    cfg = from_dict(_Top, data, source="x.yaml")
    assert cfg.section.size == 7
    assert cfg.section.ratio == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string; accepted as float
    assert cfg.flag is True
    assert cfg.section.tags == ["x", "y"]
    assert cfg.section.maybe is None


def test_unknown_key_names_key_and_file():
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'section\.sizee'"):
        from_dict(_Top, {"section": {"name": "a", "sizee": 3}}, source="x.yaml")


def test_wrong_type_names_key_and_file():
    with pytest.raises(ConfigError, match=r"x\.yaml: section\.size: expected an integer, got 'big'"):
        from_dict(_Top, {"section": {"name": "a", "size": "big"}}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"flag: expected true/false"):
        from_dict(_Top, {"section": {"name": "a"}, "flag": "yes please"}, source="x.yaml")


def test_missing_required_value():
    with pytest.raises(ConfigError, match=r"x\.yaml: missing required key 'section\.name'"):
        from_dict(_Top, {"section": {}}, source="x.yaml")


def test_post_init_checks_become_config_errors():
    with pytest.raises(ConfigError, match="pooling must be one of"):
        from_dict(ModelConfig, {"name_or_path": "m", "pooling": "avg"}, source="x.yaml")
    with pytest.raises(ConfigError, match="report_to"):
        from_dict(TrainConfig, {"report_to": ["tensorboardx"]}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"attention_dropout must be in \[0, 1\)"):
        from_dict(ModelConfig, {"name_or_path": "m", "attention_dropout": 1.0}, source="x.yaml")


def test_override_syntax_is_key_equals_value():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["--lr", "3"])


def test_load_config_dispatches_on_task(tmp_path):
    path = _write(tmp_path, "task: contrastive\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\n")
    cfg = load_config(str(path), ["train.batch_size=8", "loss.temperature=0.05"])
    assert type(cfg).__name__ == "ContrastiveConfig"
    assert cfg.train.batch_size == 8 and cfg.loss.temperature == 0.05
    # A key from the command line is blamed on the command line, one from the file on the file.
    with pytest.raises(
        ConfigError, match=r"^command line \(train\.batchsize=8\): unknown key 'train\.batchsize'"
    ):
        load_config(str(path), ["train.batchsize=8"])
    typo = _write(
        tmp_path,
        "task: contrastive\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\ntrain: {batchsize: 8}\n",
    )
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key 'train\.batchsize'"):
        load_config(str(typo), ["train.batch_size=8"])
    bad = _write(tmp_path, "task: distillation\n")
    with pytest.raises(ConfigError, match="not a pipeline"):
        load_config(str(bad))


def test_a_renamed_key_names_its_new_name(tmp_path):
    path = _write(tmp_path, "task: retromae\nmodel: {name_or_path: m}\ndata: {train: t.txt, pack: true}\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'data\.pack' was renamed to 'data\.join_texts'"):
        load_config(str(path))
    path = _write(tmp_path, "task: retromae\nmodel: {name_or_path: m}\ndata: {train: t.txt}\n")
    with pytest.raises(ConfigError, match=r"'data\.pack_separator' was renamed to 'data\.join_separator'"):
        load_config(str(path), ["data.pack_separator=x"])
    assert load_config(str(path), ["data.join_texts=true"]).data.join_texts is True


def test_yaml_python_tags_are_refused(tmp_path):
    path = _write(tmp_path, "task: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)


def test_every_shipped_config_validates():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    configs = [p for p in root.glob("*.yaml")]
    assert configs
    for path in configs:
        load_config(str(path))


def _resume_case(tmp_path):
    """A contrastive run's directory with a checkpoint, and a builder of that run's configs."""

    def cfg(**train):
        (tmp_path / "in.yaml").write_text(
            f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: m}}\n"
            f"data: {{train: pairs.jsonl}}\ntrain: {train}\n".replace("'", "")
        )
        return load_config(str(tmp_path / "in.yaml"))

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_0000002"
    checkpoint.mkdir(parents=True)
    return cfg, run, checkpoint


def _save(run, saved: dict) -> None:
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def test_resume_stops_on_a_setting_that_cannot_change_and_lists_those_that_can(tmp_path, caplog):
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    cfg, run, checkpoint = _resume_case(tmp_path)
    _save(run, to_dict(cfg(learning_rate=2e-5, max_steps=4)))
    check_resume_config(cfg(learning_rate=2e-5, max_steps=4, resume="none"), run, None)  # not resuming
    with caplog.at_level("INFO", logger="ember_train.training.checkpoint"):
        check_resume_config(cfg(learning_rate=2e-5, max_steps=8, log_every=1), run, checkpoint)
    assert "train.max_steps: 4 -> 8" in caplog.text and "train.log_every: 10 -> 1" in caplog.text
    with pytest.raises(ConfigError) as info:
        check_resume_config(cfg(learning_rate=5e-5, batch_size=8, max_steps=8), run, checkpoint)
    message = str(info.value)
    assert "train.learning_rate: 2e-05 -> 5e-05" in message and "train.batch_size: 32 -> 8" in message
    assert "train.max_steps" not in message and "train.resume=none" in message


def test_resume_after_an_upgrade_that_added_keys_sees_no_change(tmp_path, caplog):
    """A config.yaml written before keys were added (their defaults now apply) is no change."""
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    cfg, run, checkpoint = _resume_case(tmp_path)
    older = to_dict(cfg(max_steps=4))
    del older["train"]["max_grad_norm"], older["loss"]["temperature"], older["seed"]  # fixed keys
    _save(run, older)
    with caplog.at_level("INFO", logger="ember_train.training.checkpoint"):
        check_resume_config(cfg(max_steps=4), run, checkpoint)
    assert not caplog.records  # nothing listed as changed

    with pytest.raises(ConfigError) as info:  # a real change is still refused, and only it is named
        check_resume_config(cfg(max_steps=4, batch_size=8), run, checkpoint)
    message = str(info.value)
    assert "train.batch_size: 32 -> 8" in message
    assert "max_grad_norm" not in message and "temperature" not in message and "seed" not in message


def test_resume_after_an_upgrade_that_removed_keys_compares_the_rest(tmp_path, caplog):
    """A key this version no longer has cannot affect the run: it is left out and named in a
    warning, and every other key is still compared."""
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    cfg, run, checkpoint = _resume_case(tmp_path)
    older = to_dict(cfg(max_steps=4))
    older["train"]["retired_knob"] = 3
    older["loss"]["old_setting"] = "x"
    _save(run, older)
    with caplog.at_level("INFO"):
        check_resume_config(cfg(max_steps=4), run, checkpoint)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "loss.old_setting, train.retired_knob" in warnings[0]
    assert "changed settings" not in caplog.text

    with pytest.raises(ConfigError, match=r"cannot change when resuming: train\.batch_size: 32 -> 8\. "):
        check_resume_config(cfg(max_steps=4, batch_size=8), run, checkpoint)


def test_resume_compares_a_renamed_key_under_its_new_name(tmp_path):
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    def cfg(join_texts):
        path = _write(
            tmp_path,
            f"task: retromae\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: m}}\n"
            f"data: {{train: t.txt, join_texts: {str(join_texts).lower()}}}\n",
        )
        return load_config(str(path))

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_0000002"
    checkpoint.mkdir(parents=True)
    older = to_dict(cfg(join_texts=True))
    older["data"]["pack"] = older["data"].pop("join_texts")  # its name before the rename
    _save(run, older)
    check_resume_config(cfg(join_texts=True), run, checkpoint)
    with pytest.raises(ConfigError, match=r"data\.join_texts: True -> False"):
        check_resume_config(cfg(join_texts=False), run, checkpoint)


def test_resume_goes_on_with_a_warning_when_the_saved_config_cannot_be_read_any_more(tmp_path, caplog):
    """A value this version refuses cannot be restored, so refusing would only force a fresh start."""
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    cfg, run, checkpoint = _resume_case(tmp_path)
    older = to_dict(cfg(max_steps=4))
    older["train"]["mixed_precision"] = "fp8"  # accepted by no version of TrainConfig here
    _save(run, older)
    with caplog.at_level("WARNING", logger="ember_train.training.checkpoint"):
        check_resume_config(cfg(max_steps=4), run, checkpoint)
    assert "without comparing its config" in caplog.text and "train.mixed_precision: 'fp8'" in caplog.text


def test_resume_of_another_recipes_checkpoint_names_the_task_only(tmp_path, caplog):
    from ember_train.config import to_dict
    from ember_train.training.checkpoint import check_resume_config

    cfg, run, checkpoint = _resume_case(tmp_path)
    retromae = _write(
        tmp_path, f"task: retromae\noutput_dir: {run}\nmodel: {{name_or_path: m}}\ndata: {{train: t}}\n"
    )
    _save(run, to_dict(load_config(str(retromae))))
    with pytest.raises(
        ConfigError, match=r"cannot change when resuming: task: 'retromae' -> 'contrastive'\. "
    ):
        check_resume_config(cfg(), run, checkpoint)
    assert not caplog.records  # its keys are not taken for keys removed from this recipe


def test_reading_an_older_config_drops_removed_keys_wherever_they_are():
    @dataclass
    class _Outer:
        top: _Top
        items: str | list[_Section] = "none"

    data = {
        "top": {"section": {"name": "a", "gone": 1}, "old_flag": True},
        "items": [{"name": "b"}, {"name": "c", "size": 2, "also_gone": 0}],
        "removed_section": {"x": 1},
    }
    with pytest.raises(ConfigError, match="unknown key 'removed_section'"):
        from_dict(_Outer, data)
    dropped: list[str] = []
    outer = from_dict(_Outer, data, dropped=dropped)
    assert outer.top.section.name == "a" and [i.size for i in outer.items] == [1, 2]
    assert sorted(dropped) == ["items[1].also_gone", "removed_section", "top.old_flag", "top.section.gone"]
