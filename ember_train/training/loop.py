"""The training loop every pipeline shares, built on accelerate. Read it top to bottom.

The only pipeline-specific piece is ``loss_step(model, batch) -> (loss, metrics)``. Everything
else (optimizer, schedule, accumulation, clipping, precision, non-finite guards, logging,
evaluation, checkpoints and exact resume) is here, once. The loop reads device values on the
host once per optimizer step (:func:`_read_step`), so a GPU's queue never drains mid-step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn
from tqdm.auto import tqdm

from ember_train.config.parse import to_dict
from ember_train.config.schema import TrainConfig
from ember_train.data.batching import HOST_KEYS
from ember_train.speedups import apply_speedups
from ember_train.training import zero
from ember_train.training.checkpoint import (
    TrainState,
    check_resume_config,
    load_checkpoint,
    prune_best_weights,
    read_refresh_state,
    resolve_resume,
    save_best_weights,
    save_checkpoint,
)
from ember_train.training.distributed import cpu_process_group_kwargs, decide_on_main
from ember_train.training.grad_cache import StepContext
from ember_train.training.hardware import cpu_precision_warning, set_cpu_threads, tell_deepspeed_the_device
from ember_train.training.metrics_log import MetricsLogger
from ember_train.training.optimizer import ParamGroup, build_optimizer, build_schedule, group_learning_rates
from ember_train.training.select import MetricSelector

logger = logging.getLogger(__name__)

# Metric values are floats or 0-d tensors (read on the host with the loss, once per optimizer step).
LossStep = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


class DataRefresh(Protocol):
    """A hook between optimizer steps that may change the training data (e.g. re-mined negatives).

    The loop calls it with the step count on every process (it may use collectives) before the
    first batch of each pass over the data and after every optimizer step but the last. It returns
    True when the data changed: the loop then restarts its data iterator at the same position, so
    no batch prepared earlier (by a worker) is used. Its ``state_dict`` (JSON) is saved with every
    checkpoint and restored on resume, so a resumed run trains on the uninterrupted run's data.
    """

    def __call__(self, step: int) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive NaN/Inf steps (a checkpoint is saved first)."""


def build_accelerator(
    cfg: TrainConfig,
    output_dir: str | Path,
    seed: int | None,
    run_config: Any | None = None,
    trackers: bool = True,
) -> Accelerator:
    """One Accelerator per run: precision and trackers from the config, topology from ``accelerate launch``.

    ``run_config`` is the whole run's config (the recipe's dataclass): the trackers record it, and
    a resume is checked against the one its checkpoint was written with.

    A later training phase of the same run (SetFit's end-to-end tuning) passes ``seed=None`` (the
    RNG stream goes on) and ``trackers=False`` (the run's trackers are already open).
    """
    log_with = ["wandb"] if "wandb" in cfg.report_to and trackers else None
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step
        **cpu_process_group_kwargs(),
    )
    if accelerator.device.type == "cpu":
        tell_deepspeed_the_device("cpu")
        threads = set_cpu_threads(cfg.cpu_threads)
        accelerator.print(
            f"devices: cpu, {_processes(accelerator.num_processes)} x {threads.threads} threads ({threads.reason})"
        )
        if accelerator.is_main_process and (warning := cpu_precision_warning(cfg.mixed_precision)):
            logger.warning(warning)
    else:
        accelerator.print(f"devices: {accelerator.device.type}, {_processes(accelerator.num_processes)}")
    if zero.active(accelerator):
        zero.keep_transformers_out()
    if log_with:
        init_kwargs = {"wandb": {"name": cfg.wandb_run_name, "dir": str(output_dir)}}
        tracked = to_dict(run_config) if run_config is not None else {}
        accelerator.init_trackers(cfg.wandb_project, config=tracked, init_kwargs=init_kwargs)
    if run_config is not None:  # before anything is loaded, on every process
        check_resume_config(run_config, output_dir, resolve_resume(cfg.resume, output_dir))
    # One seed on every process: identical initialisation of any new weights (heads, decoders).
    if seed is not None:
        set_seed(seed)
    return accelerator


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n > 1 else "")


def steps_per_epoch(dataloader: Any, cfg: TrainConfig) -> int:
    """Optimizer steps in one pass over ``dataloader`` (its last step may take fewer micro-batches)."""
    return max(math.ceil(len(dataloader) / cfg.gradient_accumulation_steps), 1)


def _set_epoch(dataloader: Any, epoch: int, start_batch: int) -> int:
    """Select the epoch's order and skip consumed batches; returns how many batches to skip by hand."""
    sampler = getattr(dataloader, "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch, start_batch=start_batch)
        return 0
    return start_batch  # a plain or iterable loader: skip by consuming, deterministic if its order is


def train_loop(
    *,
    accelerator: Accelerator,
    model: nn.Module,
    loss_step: LossStep,
    dataloader: Any,
    cfg: TrainConfig,
    output_dir: str | Path,
    evaluate: Callable[[], dict[str, float]] | None = None,
    backward_in_step: bool = False,
    save_final_checkpoint: bool = True,
    select: MetricSelector | None = None,
    refresh: DataRefresh | None = None,
    param_groups: Sequence[ParamGroup] = (),
) -> dict[str, Any]:
    """Train ``model`` with ``loss_step`` over ``dataloader``; return the final step and metrics.

    ``dataloader`` is not passed through ``accelerator.prepare``: pipelines give each process its
    own shard through ``ShardedBatchSampler`` (exact epochs, resumable order). ``evaluate`` runs
    on the main process every ``cfg.eval_every`` steps; the pipeline runs it before and after.
    With ``backward_in_step`` the loss step is called as ``loss_step(model, batch, ctx)`` and runs
    its own backward passes through ``ctx`` (a :class:`StepContext`); the loop does the rest.
    ``save_final_checkpoint=False`` leaves the last checkpoint to a pipeline that changes the model
    after training (the SetFit-style head), so it is written once, complete.
    With ``select`` (``eval.select``) the last step is evaluated too, and the weights of the best
    evaluation so far are kept in ``<output_dir>/best/step_N``; the returned ``best_step`` names
    them (0 when no evaluation ran). Every process takes the main process's decision.
    ``refresh`` may change the data between steps (:class:`DataRefresh`). ``param_groups`` train
    at their own learning rate, or wait some steps (:class:`ParamGroup`).
    """
    output_dir = Path(output_dir)
    accum = cfg.gradient_accumulation_steps
    batches_per_epoch = len(dataloader)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch(dataloader, cfg) * cfg.epochs

    if zero.active(accelerator):
        zero.complete_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, model)
    speedups = apply_speedups(model, cfg, accelerator.device, zero.active(accelerator))
    optimizer = build_optimizer(model, cfg, param_groups)
    group_names = [g["group_name"] for g in optimizer.param_groups]
    frozen_steps = [g["frozen_steps"] for g in optimizer.param_groups]

    def schedule(opt: Any) -> torch.optim.lr_scheduler.LRScheduler:
        return build_schedule(opt, int(cfg.warmup_ratio * total_steps), total_steps, frozen_steps)

    model, optimizer, scheduler = accelerator.prepare(model, optimizer, schedule(optimizer))
    # DeepSpeed ZeRO-3 regroups the optimizer's parameters in prepare(): rebuild the schedule on
    # the prepared optimizer, inside the wrapper accelerate registered for checkpoints.
    scheduler.scheduler = schedule(optimizer)

    state = TrainState()  # saved as JSON in the checkpoint marker, never pickled
    checkpoint = resolve_resume(cfg.resume, output_dir)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state)
        if refresh is not None:
            refresh.load_state_dict(read_refresh_state(checkpoint))
        accelerator.print(
            f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        )
    saved = state.state_dict() if checkpoint is not None else None  # the newest checkpoint's state
    if select is not None and state.best_select not in (None, str(select)):
        logger.warning(
            "eval.select changed from %s to %s since the checkpoint: the best step is chosen afresh",
            state.best_select, select,
        )  # fmt: skip
        state.best_step, state.best_score = 0, None
    if select is not None:
        state.best_select = str(select)

    metrics_logger = MetricsLogger(accelerator, output_dir, cfg.report_to)
    progress = tqdm(
        total=total_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    last_logged: dict[str, float] = {}
    # This optimizer step's micro-batches: (detached loss, metrics). Their device values are read
    # on the host once, at the step's end, so that a GPU is not made to wait after every forward.
    micro_batches: list[tuple[torch.Tensor, dict[str, Any]]] = []
    start_time = time.perf_counter()
    model.train()
    speedups.start_step()

    def save() -> Path:
        hook_state = refresh.state_dict() if refresh is not None else None
        return save_checkpoint(accelerator, output_dir, state, cfg.keep_checkpoints, hook_state)

    while state.step < total_steps:
        if refresh is not None:  # a pass starts (an epoch, a resume, or new data): the hook's turn
            refresh(state.step)
        skip = _set_epoch(dataloader, state.epoch, state.batch_in_epoch)
        # Creating a DataLoader iterator draws from the global RNG; keep it out of the stream so
        # a resumed run's dropout masks are those of the uninterrupted run.
        with torch.random.fork_rng(devices=[]):
            batches = iter(dataloader)
        data_changed = False
        for batch in batches:
            if skip:
                skip -= 1
                continue
            state.batch_in_epoch += 1
            sync = state.batch_in_epoch % accum == 0 or state.batch_in_epoch == batches_per_epoch
            batch = batch_to_device(batch, accelerator.device)

            # Forward + backward; gradients are only all-reduced on the last micro-batch. A
            # non-finite loss is back-propagated like any other (its gradients spoil the step,
            # which is then skipped), except under DeepSpeed, whose engine steps the optimizer
            # inside backward: there it must be stopped before.
            if backward_in_step:  # e.g. the gradient cache, which runs several backward passes
                ctx = StepContext(
                    backward=lambda t: accelerator.backward(t / accum),
                    no_sync=lambda: zero.no_sync(accelerator, model),
                    sync=sync,
                    may_backward=lambda t: _may_backward(accelerator, t),
                )
                with accelerator.autocast():
                    loss, step_metrics = loss_step(model, batch, ctx)
            else:
                with zero.no_sync(accelerator, model) if not sync else nullcontext():
                    with accelerator.autocast():
                        loss, step_metrics = loss_step(model, batch)
                    if _may_backward(accelerator, loss.detach()):
                        accelerator.backward(loss / accum)
            micro_batches.append((loss.detach(), step_metrics))

            if not sync:
                continue
            grad_norm_value = _clip_and_norm(accelerator, model, cfg.max_grad_norm)
            # The step's one host read: losses, metrics and gradient norm together.
            step_finite, grad_norm, records = _read_step(accelerator, micro_batches, grad_norm_value)
            micro_batches.clear()
            for record in records:
                metrics_logger.accumulate(record)
            # fp16: a non-finite gradient is a loss-scale overflow; the GradScaler must see it
            # (it skips the update and lowers the scale), or its next unscale_ fails.
            overflow = step_finite and not math.isfinite(grad_norm) and accelerator.scaler is not None
            if step_finite and math.isfinite(grad_norm):
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # e.g. DeepSpeed's own fp16 overflow
                    scheduler.step()
                state.nonfinite_streak = 0
            elif overflow:
                # Not accelerate's optimizer_step_was_skipped: it misses the skip with fused AdamW.
                optimizer.step()
                scale = accelerator.scaler.get_scale()
                logger.warning(
                    "step %d: fp16 gradient overflow; update skipped, loss scale lowered to %g",
                    state.step + 1,
                    scale,
                )
                # Early overflows while the scale settles are normal; below 1 they are not.
                state.nonfinite_streak = state.nonfinite_streak + 1 if scale < 1 else 0
            else:
                if accelerator.scaler is not None:  # unscale_ ran without a step: start it afresh
                    accelerator.scaler.update(accelerator.scaler.get_scale())
                state.nonfinite_streak += 1
                logger.warning(
                    "step %d: non-finite %s; skipping the update (%d in a row)",
                    state.step + 1,
                    "loss" if not step_finite else "gradient",
                    state.nonfinite_streak,
                )
            optimizer.zero_grad(set_to_none=True)
            speedups.start_step()
            state.step += 1
            progress.update(1)
            # Before the checkpoint, which then holds the data the next steps train on.
            data_changed = refresh is not None and state.step < total_steps and refresh(state.step)

            if state.nonfinite_streak >= cfg.max_nonfinite_steps:
                path = save()
                progress.close()  # an open bar would garble the error line printed after it
                raise NonFiniteLossError(
                    f"stopping at step {state.step}: {state.nonfinite_streak} consecutive non-finite losses or "
                    f"gradients (max_nonfinite_steps={cfg.max_nonfinite_steps}); checkpoint saved at {path}"
                )
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                extra = {"lr": scheduler.get_last_lr()[0], **group_learning_rates(optimizer, group_names)}
                extra.update(grad_norm=grad_norm, epoch=state.epoch)
                if accelerator.scaler is not None:  # fp16: a falling scale means overflows
                    extra["loss_scale"] = accelerator.scaler.get_scale()
                last_logged = metrics_logger.flush(state.step, extra)
                progress.set_postfix(_postfix(last_logged))
            if evaluate is not None and cfg.eval_every > 0 and state.step % cfg.eval_every == 0:
                _evaluate(accelerator, model, evaluate, metrics_logger, state, select, output_dir)
            if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0:
                save()
                saved = state.state_dict()
                if select is not None and accelerator.is_main_process:
                    prune_best_weights(output_dir, state.best_step)
            if state.step >= total_steps or data_changed:  # new data: restart the pass where it is
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0

    progress.close()
    # The last step is a candidate too (and its evaluation goes into the checkpoint's state).
    if select is not None and evaluate is not None and state.last_eval_step != state.step:
        _evaluate(accelerator, model, evaluate, metrics_logger, state, select, output_dir)
    speedups.release()
    if save_final_checkpoint and state.state_dict() != saved:  # not twice when the last step was saved
        save()
    if select is not None and accelerator.is_main_process:
        prune_best_weights(output_dir, state.best_step)
    if zero.active(accelerator):
        zero.take_back_trained_model(accelerator, model)
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,  # with the sampler's fixed order: what was trained on
        "train_seconds": time.perf_counter() - start_time,
        "last_metrics": last_logged,
        "best_step": state.best_step,
        "model": zero.unwrap(accelerator, model),
    }


def batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """The batch's tensors on ``device``, except packing metadata (:data:`HOST_KEYS`), read on the host."""
    return send_to_device(batch, device, skip_keys=list(HOST_KEYS))


def _may_backward(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether to back-propagate this loss. Always, except a non-finite one under DeepSpeed.

    Elsewhere a non-finite loss is caught once per optimizer step by :func:`_read_step` (no host
    read here). DeepSpeed's engine steps inside ``backward``, so its processes must agree first.
    """
    if not zero.active(accelerator):
        return True
    flag = torch.isfinite(loss).all().float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def _read_step(
    accelerator: Accelerator,
    micro_batches: list[tuple[torch.Tensor, dict[str, Any]]],
    grad_norm: torch.Tensor | float,
) -> tuple[bool, float, list[dict[str, float]]]:
    """Read an optimizer step's device values on the host, in one transfer.

    Returns whether every micro-batch's loss was finite on every process (one bad micro-batch
    spoils the step), the gradient norm, and one metrics record per micro-batch (its loss only
    when finite, so NaN losses are not averaged into the logs). Metric values may be floats or
    0-d tensors (read here, with the rest).
    """
    losses = torch.stack([loss.float().reshape(()) for loss, _ in micro_batches])
    bad = (~torch.isfinite(losses)).sum().float().reshape(1)
    if accelerator.num_processes > 1:  # every process must make the same decision
        bad = accelerator.reduce(bad, reduction="sum")
    norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
    tensor_metrics = [
        ((i, key), value)
        for i, (_, metrics) in enumerate(micro_batches)
        for key, value in metrics.items()
        if isinstance(value, torch.Tensor)
    ]
    parts = [bad, norm, losses, *(value for _, value in tensor_metrics)]
    values = torch.cat([t.detach().float().reshape(-1).to(losses.device) for t in parts]).tolist()

    n = len(micro_batches)
    bad_count, norm_value, loss_values = values[0], values[1], values[2 : 2 + n]
    read = {where: value for (where, _), value in zip(tensor_metrics, values[2 + n :], strict=True)}
    records = []
    for i, (_, metrics) in enumerate(micro_batches):
        record = {key: read.get((i, key), value) for key, value in metrics.items()}
        if math.isfinite(loss_values[i]):
            record = {"loss": loss_values[i], **record}
        records.append(record)
    return bad_count == 0, norm_value, records


def _clip_and_norm(accelerator: Accelerator, model: nn.Module, max_norm: float) -> torch.Tensor | float:
    """Clip (if asked) and return the global gradient norm, identical on every process.

    A tensor on the device (read by :func:`_read_step`), or a float under DeepSpeed (its engine's).
    """
    if zero.active(accelerator):
        return zero.grad_norm(accelerator)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def _run_eval(
    accelerator: Accelerator,
    evaluate: Callable[[], dict[str, float]],
    metrics_logger: MetricsLogger,
    step: int,
) -> dict[str, float]:
    """Evaluate (main process), log and print; returns the metrics (empty on other processes)."""
    results: dict[str, float] = {}
    # ZeRO-3: every forward gathers sharded parameters from all processes, so all of them evaluate.
    if accelerator.is_main_process or zero.is_zero3(accelerator):
        results = evaluate()
        if accelerator.is_main_process:
            metrics_logger.log(step, {f"eval/{k}": v for k, v in results.items()})
            accelerator.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
    accelerator.wait_for_everyone()
    return results if accelerator.is_main_process else {}


def _evaluate(
    accelerator: Accelerator,
    model: nn.Module,
    evaluate: Callable[[], dict[str, float]],
    metrics_logger: MetricsLogger,
    state: TrainState,
    select: MetricSelector | None,
    output_dir: Path,
) -> None:
    """Evaluate at this step; with ``select``, keep these weights when they are the best so far."""
    results = _run_eval(accelerator, evaluate, metrics_logger, state.step)
    state.last_eval_step = state.step
    if select is None:
        return
    score = decide_on_main(accelerator, lambda: select.score(results))  # one decision for every process
    if not select.better(score, state.best_score):
        return
    state.best_step, state.best_score = state.step, score
    record = {"step": state.step, "score": score, "select": str(select), "metrics": results}
    save_best_weights(accelerator, model, output_dir, state.step, record)
    if accelerator.is_main_process:
        prune_best_weights(output_dir, state.best_step)
        accelerator.print(f"step {state.step}: best so far by {select} = {score:.4f}")


def _postfix(record: dict[str, float]) -> dict[str, str]:
    shown = {"loss": "loss", "lr": "lr", "samples_per_s": "samples/s", "tokens_per_s": "tok/s"}
    return {label: f"{record[key]:.3g}" for key, label in shown.items() if key in record}
