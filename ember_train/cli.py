"""``ember-train`` command line: train, export, eval, mine, predict.

``train`` takes the config and ``section.key=value`` overrides, exactly like ``train.py``, so the
config stays the whole experiment. Other subcommands register themselves from their packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path

from ember_train.config import ConfigError, from_dict, load_config, read_yaml
from ember_train.data.reader import DataError

# Messages of libraries that say nothing to a user of ember-train: what they report is expected
# (tied MLM-head weights are saved once; a body without an MLM head gets a new one, which the
# RetroMAE pipeline states itself).
_EXPECTED_LIBRARY_MESSAGES = {
    "accelerate.utils.other": ("Removed shared tensor",),
    "transformers.modeling_utils": ("This checkpoint seem corrupted",),
}
# transformers' per-call progress bars for reading and writing one model file (milliseconds here).
_QUIET_PROGRESS_BARS = ("Loading weights", "Writing model shards")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.starts)


def _without_weight_file_bars(factory, args, kwargs):  # noqa: ANN001 (transformers' tqdm hook)
    if str(kwargs.get("desc", "")).startswith(_QUIET_PROGRESS_BARS):
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs five INFO lines per checkpoint; ember-train's own "saved checkpoint" says it.
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, starts in _EXPECTED_LIBRARY_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(starts))
    from transformers.utils import logging as transformers_logging

    if hasattr(transformers_logging, "set_tqdm_hook"):  # transformers >= 5
        transformers_logging.set_tqdm_hook(_without_weight_file_bars)


def train_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from ember_train.pipelines import get_pipeline

    pipeline = get_pipeline(cfg.task)
    command = "accelerate launch train.py " + " ".join(
        shlex.quote(a) for a in ["--config", args.config, *args.overrides]
    )
    pipeline.run(cfg, command=command)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Export a checkpoint (``<run>/checkpoints/step_N``) with the run's config."""
    checkpoint = Path(args.checkpoint)
    config_path = Path(args.config) if args.config else checkpoint.parent.parent / "config.yaml"
    data = read_yaml(config_path)
    from ember_train.pipelines import get_pipeline

    pipeline = get_pipeline(data.get("task", ""), source=str(config_path))
    cfg = from_dict(pipeline.config_class, data, source=str(config_path))
    module = sys.modules[pipeline.run.__module__]
    if not hasattr(module, "export_checkpoint"):
        raise ConfigError(f"pipeline {cfg.task!r} cannot export checkpoints")
    if args.hub_repo_id:  # the config's own export.hub_repo_id is for its training run, not this command
        from ember_train.export.hub import check_hub_access

        private = cfg.export.hub_private if args.hub_private is None else args.hub_private
        try:
            cfg.export = dataclasses.replace(
                cfg.export, enabled=True, hub_repo_id=args.hub_repo_id, hub_private=private
            )
        except ValueError as e:
            raise ConfigError(f"--hub-repo-id: {e}") from None
        check_hub_access(args.hub_repo_id)
    out = module.export_checkpoint(cfg, checkpoint, Path(args.output))
    print(f"exported {checkpoint} to {out}")
    if args.hub_repo_id:
        from ember_train.export.hub import push_export

        command = "ember-train export " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        print(f"uploaded {out} to {push_export(out, cfg.export, command)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a pipeline from a YAML config")
    train.add_argument("--config", required=True)
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(handler=train_command)

    export = sub.add_parser("export", help="export a checkpoint for transformers and sentence-transformers")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--config", help="the run's config.yaml (default: <run>/config.yaml)")
    export.add_argument(
        "--hub-repo-id", help="also upload the export to this Hub model repository (user/name)"
    )
    export.add_argument(
        "--hub-private",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="visibility if the repository is created (default: the config's export.hub_private, true)",
    )
    export.set_defaults(handler=export_command)

    from ember_train.evaluation import commands as evaluation_commands

    evaluation_commands.register(sub)
    from ember_train import setfit_model

    setfit_model.register(sub)
    return parser


def _error_prefix() -> str:
    """``ember-train: error`` plus, in a multi-process run, which process failed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return f"ember-train: error (rank {os.environ.get('RANK', '?')} of {world})"
    return "ember-train: error"


def _report(message: str) -> None:
    """Print an error on a line of its own, even under a progress bar that is still drawn."""
    from tqdm.auto import tqdm

    tqdm.write(f"{_error_prefix()}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    from ember_train.encoder.encoder import ModelNotFoundError, UnsafeWeightsError
    from ember_train.export.hub import HubUploadError
    from ember_train.training.checkpoint import CheckpointError
    from ember_train.training.loop import NonFiniteLossError

    try:
        return args.handler(args)
    except (ConfigError, DataError, UnsafeWeightsError, ModelNotFoundError) as e:
        # User errors: one clear line, no stack trace from deep inside a library.
        _report(str(e))
        return 2
    except (CheckpointError, NonFiniteLossError, HubUploadError) as e:
        # The run stopped for a stated reason (its message says what was saved): no stack trace.
        _report(str(e))
        return 1
    except Exception as e:
        # Anything else keeps its stack trace, but first says which process failed and why.
        _report(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
