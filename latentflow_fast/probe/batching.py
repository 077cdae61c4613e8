"""How many probes go into one batch: estimated from a memory budget, corrected by measurement,
halved on out-of-memory errors (the sweep retries the same probes instead of failing).

Results never depend on the batch size: every kernel on the path is batch invariant.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

MAX_ROWS = 256


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text.lower() or isinstance(exc, MemoryError)
    )


def available_memory(device: torch.device) -> int:
    """Free memory in bytes on `device` (host RAM for CPU tensors)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def estimate_row_bytes(model, traj, end_effect: bool) -> int:
    """Activation bytes one batch row needs in a forward pass (a generous analytic estimate).

    Per layer the live tensors are a few [T, D] activations, the [T, ffn] hidden state, q/k/v and the
    head outputs; attention maps are never materialised by the fused operator. Continuing to t=1 adds the
    ODE state and the decoded waveforms.
    """
    cfg = model.config
    T = traj.states[0].shape[1]
    L = traj.inputs.text.shape[1] if traj.inputs.text is not None else 1
    elem = traj.states[0].element_size()
    per_layer = T * (12 * cfg.dim + 3 * cfg.ffn_hidden_dim) + L * 4 * cfg.dim
    row = elem * (per_layer * 2 + 8 * T * cfg.in_channels)
    if end_effect:
        row += 4 * 4 * traj.target.numel()
    return int(row)


class BatchSizer:
    def __init__(self, model, traj, batch_size: Optional[int] = None, memory_budget: Optional[int] = None,
                 end_effect: bool = False):
        self.device = traj.states[0].device
        self.fixed = batch_size
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if memory_budget is None:
            memory_budget = available_memory(self.device) // 4
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget!r}")
        self.budget = int(memory_budget)
        self.row_bytes = max(1, estimate_row_bytes(model, traj, end_effect))
        self.limit = MAX_ROWS
        self._measured = False

    def size(self) -> int:
        if self.fixed is not None:
            return min(self.fixed, self.limit)
        return max(1, min(self.limit, self.budget // self.row_bytes))

    def halve(self) -> None:
        self.limit = max(1, self.size() // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def observe(self, rows: int) -> None:
        """Correct the per-row estimate once from the measured peak (CUDA only: exact allocator stats)."""
        if self._measured or self.device.type != "cuda" or rows < 1:
            return
        peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        if peak > 0:
            self.row_bytes = max(1, peak // rows)
        self._measured = True
        torch.cuda.reset_peak_memory_stats(self.device)
