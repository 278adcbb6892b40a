"""What the CPU can do: reduced precision (so a run can warn before it crawls) and how many threads.

On x86 CPUs without AVX-512-BF16 or AMX, PyTorch emulates bf16 matmuls: they run about 100x
slower than fp32 (measured on an AVX2-only AMD EPYC: 1.3 vs 141 GFLOP/s; a MiniLM training step
18x slower), and fp16 matmuls are slow on CPUs. Users copy GPU configs to CPU machines, so this is checked, not assumed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


# --- CPU threads ---------------------------------------------------------------------------------
# `accelerate launch` without --cpu or --num_cpu_threads_per_process sets OMP_NUM_THREADS=1 for the
# training process, so the README's command trained on one core of a two-core machine (1.8x
# slower). The thread count is therefore chosen here, at the start of every run, not left to the
# launcher.


def physical_cores() -> int:
    """Physical cores this process may use: its affinity mask and cgroup CPU quota respected,
    hyper-threads not counted (one matmul thread per core is fastest)."""
    logical = os.cpu_count() or 1
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        available = logical
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    per_core = max(1, logical // physical)
    cores = max(1, min(physical, available // per_core))
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs granted by a cgroup v2 quota (``cpu.max``: "quota period"), rounded up; None if unlimited."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why this many, for the run's first lines


def _launcher_said_threads(ppid: int | None = None) -> bool | None:
    """Whether the process that started this one (``accelerate launch``) was given a thread count:
    ``--num_cpu_threads_per_process`` on its command line or OMP_NUM_THREADS in its environment.
    None where that cannot be read (no /proc)."""
    ppid = os.getppid() if ppid is None else ppid
    try:
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{ppid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    flag = any(a.startswith(b"--num_cpu_threads_per_process") for a in argv)
    return flag or any(e.startswith(b"OMP_NUM_THREADS=") for e in environ)


def choose_cpu_threads(
    configured: int,
    environ: Mapping[str, str] | None = None,
    launcher_said_threads: Callable[[], bool | None] = _launcher_said_threads,
    cores: int | None = None,
) -> ThreadChoice:
    """Torch threads for each process of a CPU run.

    The user's choice wins: ``train.cpu_threads``, then OMP_NUM_THREADS that the user set (directly,
    or through ``accelerate launch --num_cpu_threads_per_process``). Otherwise every physical core,
    divided among the processes on this machine. accelerate's own default (OMP_NUM_THREADS=1 when
    it was not told the run is on CPU) is not a user's choice.
    """
    environ = os.environ if environ is None else environ
    local_processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if configured > 0:
        return ThreadChoice(configured, "train.cpu_threads")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in environ
        if not launched_by_accelerate:
            return ThreadChoice(int(omp), "OMP_NUM_THREADS")
        if launcher_said_threads():
            return ThreadChoice(int(omp), "accelerate launch --num_cpu_threads_per_process / OMP_NUM_THREADS")
    cores = physical_cores() if cores is None else cores
    threads = max(1, cores // local_processes)
    per = f" / {local_processes} processes on this machine" if local_processes > 1 else ""
    return ThreadChoice(threads, f"{cores} physical cores{per}")


def set_cpu_threads(configured: int) -> ThreadChoice:
    """Choose (``choose_cpu_threads``) and apply the torch thread count of this process."""
    import torch

    choice = choose_cpu_threads(configured)
    torch.set_num_threads(choice.threads)
    return choice


def tell_deepspeed_the_device(device_type: str) -> None:
    """On CPU, name DeepSpeed's accelerator before anything imports it.

    Saving a model imports DeepSpeed whenever it is installed (transformers -> accelerate), and
    DeepSpeed then warns that it "cannot detect an accelerator"; naming the device silences that.
    """
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
