"""What every recipe shares: its record (name, config class, run, export), its start and its finish.

A recipe module reads top to bottom as only what differs: its config classes, data, loss step
and evaluation, between :func:`start_run` (accelerator, Hub access check, ``config.yaml``) and
:func:`finish_run` (export, ``results.json``, Hub upload). Shared as functions, not a base class.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ember_train.config import save_config, to_dict
from ember_train.export.hub import check_hub_access, push_export
from ember_train.export.model_card import render_model_card
from ember_train.training.checkpoint import set_aside_previous_run
from ember_train.training.loop import build_accelerator


@dataclass(frozen=True)
class Pipeline:
    """A recipe, as ``train`` and ``export`` find it by the config's ``task``."""

    name: str
    config_class: type
    run: Callable[..., dict[str, Any]]  # run(cfg, command=None) -> results
    export_checkpoint: Callable[[Any, Path, Path], Path]  # (cfg, checkpoint, out_dir) -> exported dir
    # check(cfg, source): checks beyond each key's type, raising ConfigError (the ember recipe
    # builds every stage's config here, so a bad stage key stops before anything is loaded)
    check_config: Callable[[Any, str], None] | None = None


_chained = False  # inside chained_runs(): finish_run leaves the process group open


@contextmanager
def chained_runs() -> Iterator[None]:
    """Recipe runs inside share this process's process group: the ember recipe runs one recipe
    per stage, and a process group that ``end_training`` closed cannot be opened again."""
    global _chained
    before, _chained = _chained, True
    try:
        yield
    finally:
        _chained = before


def start_run(cfg: Any, check: Callable[[Accelerator], None] | None = None) -> tuple[Accelerator, Path]:
    """The run's accelerator and output directory; ``check`` may refuse the run before anything is written.

    The main process checks Hub access first (a run that cannot upload fails now, not after
    training), sets a previous run's state aside under ``train.resume: none``
    (:func:`~ember_train.training.checkpoint.set_aside_previous_run`) and saves the config as run to
    ``<output_dir>/config.yaml``.
    """
    output_dir = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg.train, output_dir, cfg.seed, run_config=cfg)
    if check is not None:
        check(accelerator)
    if accelerator.is_main_process:
        if cfg.export.hub_repo_id:
            check_hub_access(cfg.export.hub_repo_id)
        if cfg.train.resume == "none":
            set_aside_previous_run(output_dir)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()  # no process writes into output_dir before it is set up
    return accelerator, output_dir


def model_card(
    cfg: Any,
    export_dir: Path,
    *,
    command: str | None,
    results: list | None = None,
    training: dict[str, Any] | None = None,
    data_summary: str | None = None,
    stages: list[dict[str, Any]] | None = None,
    matryoshka_dims: list[int] | None = None,
    selected: dict[str, Any] | None = None,
    merge: dict[str, Any] | None = None,
) -> str:
    """The export's README: the config as run (``training``, default the whole config) and results."""
    return render_model_card(
        model_name=cfg.export.card_name(export_dir),
        base_model=cfg.model.name_or_path,
        results=results or [],
        training=to_dict(cfg) if training is None else training,
        command=command,
        data_summary=data_summary,
        stages=stages,
        matryoshka_dims=matryoshka_dims,
        selected=selected,
        merge=merge,
    )


def export_command_line(checkpoint: Path, out_dir: Path) -> str:
    """The command line an ``ember-train export`` records in its model card."""
    return f"ember-train export {checkpoint} {out_dir}"


def finish_run(
    accelerator: Accelerator,
    cfg: Any,
    output_dir: Path,
    results: dict[str, Any],
    command: str | None,
    export: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Main process: ``export(export_dir)`` when export is enabled (its return goes into the
    results), ``results.json``, and the Hub upload; then every process ends the run."""
    if accelerator.is_main_process:
        if cfg.export.enabled:
            export_dir = Path(cfg.export.dir or output_dir / "final")
            results.update(export(export_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        if cfg.export.hub_repo_id:
            accelerator.print(f"uploaded {export_dir} to {push_export(export_dir, cfg.export, command)}")
    accelerator.wait_for_everyone()
    if _chained:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    return results
