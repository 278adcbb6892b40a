"""DeepSpeed config completion (no DeepSpeed needed): what the engine cannot infer from ember-train."""

import pytest
from torch import nn
from transformers import BertConfig, BertModel

from ember_train.config.schema import TrainConfig
from ember_train.training import zero


class EncoderLike(nn.Module):
    """A model without ``.config`` of its own (like ember-train's encoder), a backbone inside."""

    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        self.backbone = BertModel(config)


def test_auto_values_batch_size_and_clipping_are_filled():
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "overlap_comm": True,
        },
    }
    zero.complete_config(ds, TrainConfig(batch_size=8, max_grad_norm=0.5), EncoderLike())
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 32 * 32,
        "stage3_prefetch_bucket_size": int(0.9 * 32 * 32),
        "stage3_param_persistence_threshold": 320,
        "overlap_comm": True,
    }


def test_explicit_values_are_kept_and_clipping_can_be_off():
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}
    zero.complete_config(ds, TrainConfig(max_grad_norm=0.0), EncoderLike())
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert ds["gradient_clipping"] == 0.0


def test_gradient_accumulation_is_refused():
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 1.*grad_cache_chunk_size"):
        zero.complete_config({}, TrainConfig(gradient_accumulation_steps=2), EncoderLike())
