"""What the training loop needs to do differently under DeepSpeed (ZeRO stages 1-3).

DeepSpeed's engine steps the optimizer inside ``backward``, keeps gradients in its own buffers,
holds fp32 master weights apart from a (possibly bf16) module and, at stage 3, leaves every
process 1/N of each parameter. These helpers keep the loop's code the same for DDP and DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ember_train.config.schema import TrainConfig


def active(accelerator: Accelerator) -> bool:
    """True when this run trains through a DeepSpeed engine."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare model. ``accelerator.unwrap_model`` imports DeepSpeed whenever it is installed, and
    DeepSpeed's import prints an accelerator warning on CPU, so it is only asked under DeepSpeed."""
    if active(accelerator):
        return accelerator.unwrap_model(model)
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def keep_transformers_out() -> None:
    """Unregister accelerate's ZeRO config from transformers.

    With a ZeRO-3 config registered, transformers builds models already sharded (``zero.Init``)
    and saves them through ZeRO gathers. Pipelines build models whole on every process (the
    evaluation before training runs on one) and ``prepare()`` shards them.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def complete_config(ds_config: dict, cfg: TrainConfig, model: nn.Module) -> None:
    """Fill what DeepSpeed cannot infer: the loader is not passed to ``prepare()`` (batch size),
    the engine clips inside its own step (the norm), and ``auto`` bucket sizes need a hidden size
    (accelerate reads it from ``model.config``, which an encoder with a decoder or head lacks;
    the values follow accelerate's rules)."""
    if cfg.gradient_accumulation_steps > 1:
        # A skipped (non-finite) micro-batch cannot be taken back out of DeepSpeed's buffers.
        raise ValueError(
            "with DeepSpeed, use gradient_accumulation_steps: 1. Contrastive and SetFit-style runs can "
            "raise batch_size and set grad_cache_chunk_size instead: the gradient cache keeps memory "
            "flat and, unlike accumulation, gives every query the whole batch's negatives"
        )
    ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds_config["gradient_clipping"] = max(cfg.max_grad_norm, 0.0)
    hidden = next(
        (m.config.hidden_size for m in model.modules() if hasattr(getattr(m, "config", None), "hidden_size")),
        None,
    )
    zero = ds_config.get("zero_optimization", {})
    rules = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, rule in rules.items():
        if zero.get(key) == "auto" and hidden is not None:
            zero[key] = rule(int(hidden))


def no_sync(accelerator: Accelerator, model: nn.Module) -> Any:
    """Accumulate this backward's gradients without ending the optimizer step.

    DDP: skip the all-reduce. DeepSpeed: its engine steps the optimizer inside every backward
    that accelerate marks as syncing, so mark this one as not (the gradient cache's several
    backward passes make one step).
    """
    if active(accelerator):
        return _accumulating(accelerator)
    return accelerator.no_sync(model)


@contextmanager
def _accumulating(accelerator: Accelerator) -> Iterator[None]:
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def grad_norm(accelerator: Accelerator) -> float:
    """The norm the engine computed (and clipped to) in its last step; 0 before the first."""
    norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def is_zero3(accelerator: Accelerator) -> bool:
    return active(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def take_back_trained_model(accelerator: Accelerator, model: nn.Module) -> None:
    """Give every process the whole trained model back, in fp32, as a plain module.

    Evaluation, head fitting and export run on the main process alone and must see what was
    trained: the optimizer's fp32 master weights (the module may hold bf16 copies), whole (ZeRO-3
    shards them and gathers them in hooks that all processes must enter together).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    stage3 = is_zero3(accelerator)
    params = list(accelerator.unwrap_model(model).parameters())
    whole = []
    for param in params:  # collective under ZeRO-3: every process walks the same parameters
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is None:  # frozen: no optimizer copy
            with deepspeed.zero.GatheredParameters([param], enabled=stage3):
                master = param.data.clone()
        whole.append(master.detach().float().to(param.device))
    if stage3:
        model.destroy()  # removes ZeRO-3's gather hooks
    for param, data in zip(params, whole, strict=True):
        param.data = data
