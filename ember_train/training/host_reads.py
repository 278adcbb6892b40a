"""Count the device values a piece of training code reads on the host, by source line.

On a GPU every such read (``loss.item()``, ``float(mask.sum())``, ``if tensor:``, ``.tolist()``)
makes the host wait until the GPU has caught up, so it cannot queue the next kernels meanwhile.
A CPU run shows the same calls: this counter intercepts the tensor methods that convert to Python
values, which is what the tests and ``python -m benchmarks.profile_contrastive_step --count-host-reads``
use to keep the count per training step small without a GPU.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that hand a tensor's values to Python (a device-to-host copy and a wait on GPUs),
# and operations whose output size depends on the values (the host must learn it first).
READS = frozenset({"item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy"})
SIZED_BY_VALUES = frozenset({"nonzero", "masked_select", "unique", "argwhere"})


def _is_read(func: Any, args: tuple) -> bool:
    name = getattr(func, "__name__", None)
    if name in READS or name in SIZED_BY_VALUES:
        return True
    if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing: a nonzero inside
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class HostReadCounter(TorchFunctionMode):
    """``with HostReadCounter() as reads: ...`` then ``reads.total``, ``reads.by_line`` or ``reads.under(dir)``.

    Each read is attributed to the line that asked for it: the innermost frame outside PyTorch's
    own files, so a read inside transformers names transformers' line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[tuple[str, int, str]] = Counter()  # (file, line number, code) -> reads

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    @property
    def by_line(self) -> Counter[str]:
        return Counter(
            {f"{Path(file).name}:{lineno} {code}": n for (file, lineno, code), n in self.reads.items()}
        )

    def under(self, directory: str | Path) -> int:
        """Reads asked for by code in files under ``directory`` (e.g. ember-train's package)."""
        root = Path(directory).resolve()
        return sum(n for (file, _, _), n in self.reads.items() if Path(file).resolve().is_relative_to(root))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _is_read(func, args):
            caller = next(
                (
                    f
                    for f in reversed(traceback.extract_stack()[:-1])
                    if not f.filename.startswith(_TORCH_DIR)
                ),
                None,
            )
            self.reads[
                (caller.filename, caller.lineno or 0, caller.line or "") if caller else ("?", 0, "")
            ] += 1
        return func(*args, **(kwargs or {}))


_TORCH_DIR = str(Path(torch.__file__).parent)
