"""What the CPU can do in reduced precision, so a run can warn before it crawls.

On x86 CPUs without AVX-512-BF16 or AMX, PyTorch emulates bf16 matmuls: they run about 100x
slower than fp32 (measured on an AVX2-only AMD EPYC: 1.3 vs 141 GFLOP/s; a MiniLM training step
18x slower), and fp16 matmuls are slow on CPUs. Users copy GPU configs to CPU machines, so this is checked, not assumed.
"""

from __future__ import annotations

import platform
from pathlib import Path

# CPU feature flags (as /proc/cpuinfo spells them) that give native bf16 matmuls.
NATIVE_BF16_FLAGS = {
    "x86_64": {"avx512_bf16", "amx_bf16"},
    "aarch64": {"bf16"},  # Armv8.6 BF16 (Graviton3, Neoverse V1/N2)
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Feature flags of the first CPU in ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return set()
        cpuinfo = path.read_text(errors="replace")
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None, machine: str | None = None) -> bool | None:
    """True/False where the flags say; None where they cannot be read (other OS or architecture)."""
    wanted = NATIVE_BF16_FLAGS.get(machine or platform.machine())
    flags = cpu_flags(cpuinfo)
    if wanted is None or not flags:
        return None
    return bool(wanted & flags)


def cpu_precision_warning(
    mixed_precision: str, cpuinfo: str | None = None, machine: str | None = None
) -> str | None:
    """The warning to print when training on this CPU with ``mixed_precision``, or None."""
    if mixed_precision == "fp16":
        return (
            "train.mixed_precision=fp16 on a CPU: fp16 matmuls are very slow on CPUs; "
            "use mixed_precision=no (or bf16 on a CPU with AVX-512-BF16/AMX)."
        )
    if mixed_precision == "bf16" and cpu_has_native_bf16(cpuinfo, machine) is False:
        return (
            "train.mixed_precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): "
            "bf16 is emulated here and much slower than fp32 (a matmul ~100x, a training step ~18x "
            "on an AVX2-only CPU); use mixed_precision=no."
        )
    return None
