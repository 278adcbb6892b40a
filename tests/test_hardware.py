"""The CPU precision check: bf16 on a CPU without native bf16 warns instead of silently crawling."""

from __future__ import annotations

import logging

from accelerate.state import AcceleratorState

from ember_train.config.schema import TrainConfig
from ember_train.training import hardware
from ember_train.training.loop import build_accelerator

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd crc32 atomics\n"


def test_flags_parsed_from_cpuinfo() -> None:
    assert {"avx2", "fma"} <= hardware.cpu_flags(AVX2_ONLY)
    assert "bf16" in hardware.cpu_flags(GRAVITON3)
    assert hardware.cpu_flags("nothing useful\n") == set()


def test_native_bf16_by_architecture() -> None:
    assert hardware.cpu_has_native_bf16(AVX2_ONLY, "x86_64") is False
    assert hardware.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "x86_64") is True
    assert hardware.cpu_has_native_bf16(GRAVITON3, "aarch64") is True
    assert hardware.cpu_has_native_bf16(GRAVITON2, "aarch64") is False
    assert hardware.cpu_has_native_bf16(AVX2_ONLY, "riscv64") is None  # unknown: no claim
    assert hardware.cpu_has_native_bf16("", "x86_64") is None


def test_warning_only_where_precision_would_be_slow() -> None:
    assert "emulated" in hardware.cpu_precision_warning("bf16", AVX2_ONLY, "x86_64")
    assert hardware.cpu_precision_warning("bf16", SAPPHIRE_RAPIDS, "x86_64") is None
    assert hardware.cpu_precision_warning("bf16", "", "x86_64") is None
    assert hardware.cpu_precision_warning("no", AVX2_ONLY, "x86_64") is None
    assert "fp16" in hardware.cpu_precision_warning("fp16", SAPPHIRE_RAPIDS, "x86_64")


def test_build_accelerator_warns_for_bf16_on_cpu_without_it(
    tmp_path, monkeypatch, caplog, fresh_accelerate_state
) -> None:
    avx2_flags = hardware.cpu_flags(AVX2_ONLY)
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: avx2_flags)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the warning is for CPU runs; a GPU machine has CUDA
    with caplog.at_level(logging.WARNING):
        build_accelerator(TrainConfig(mixed_precision="bf16"), tmp_path, seed=0)
    assert any("without native bf16" in r.getMessage() for r in caplog.records)

    caplog.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: {"avx512_bf16"})
    with caplog.at_level(logging.WARNING):
        build_accelerator(TrainConfig(mixed_precision="bf16"), tmp_path, seed=0)
    assert not any("bf16" in r.getMessage() for r in caplog.records)
