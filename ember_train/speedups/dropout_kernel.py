"""Build and load ``dropout_kernel.c``: CPU dropout with the mask computed in the same pass.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a cache
directory and called through :mod:`ctypes`: no PyTorch headers, no build step at install time, and
a compile of well under a second. The library's name carries a hash of the source, the compiler and
its flags, so a changed kernel or compiler builds a new one, and a shared cache never hands a
process a stale library. Where no compiler works, :func:`load` returns ``None`` (with one warning)
and :mod:`ember_train.speedups.dropout` draws the same masks with NumPy, more slowly.

Cache directory: ``$EMBER_TRAIN_CACHE``, else ``$XDG_CACHE_HOME/ember_train``, else
``~/.cache/ember_train``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("dropout_kernel.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-Wno-psabi")


def cache_dir() -> Path:
    if os.environ.get("EMBER_TRAIN_CACHE"):
        return Path(os.environ["EMBER_TRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ember_train"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _build(library: Path) -> None:
    """Compile into a temporary file, then rename it: processes that build at once never see half a file."""
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".partial")
    os.close(fd)
    try:
        subprocess.run(
            [*_compiler(), *FLAGS, str(SOURCE), "-o", partial],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or ``None`` where it cannot be built or loaded."""
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *_compiler(), *FLAGS, sys.platform, platform.machine()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"dropout_kernel-{key}.so"
    try:
        if not library.exists():
            _build(library)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(
            f"ember-train could not build its CPU dropout kernel ({detail}); CPU dropout masks are "
            "drawn with NumPy instead (the same masks, more slowly). Install a C compiler or set $CC.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    i64, u64, u32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32
    lib.ember_dropout_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64, u64, u32, ctypes.c_float]
    lib.ember_dropout_f32.restype = None
    lib.ember_keep_mask.argtypes = [ctypes.c_void_p, i64, u64, u32]
    lib.ember_keep_mask.restype = None
    return lib


def dropout_f32(x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    """``x`` (float32, CPU) with the elements the mask drops zeroed and the rest multiplied by ``scale``.

    This and :func:`keep_mask` need the kernel: callers check :func:`load` first."""
    # Named for the profiler, which does not see inside a ctypes call.
    with torch.profiler.record_function("ember_train::dropout_kernel"):
        x = x.contiguous()
        out = torch.empty_like(x)
        load().ember_dropout_f32(x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, scale)
    return out


def keep_mask(shape: torch.Size | tuple[int, ...], seed: int, threshold: int) -> torch.Tensor:
    """The boolean mask itself (for dtypes other than float32)."""
    mask = torch.empty(shape, dtype=torch.bool)
    load().ember_keep_mask(mask.data_ptr(), mask.numel(), seed, threshold)
    return mask
