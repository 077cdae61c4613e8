"""Named ranges that show up in Nsight Systems (NVTX) and in the torch profiler.

One context manager serves both: `torch.profiler.record_function` puts the range in torch profiler traces
(CPU and CUDA), and when CUDA is initialised the same name is pushed as an NVTX range for nsys.
Names are stable (`latentflow.<what>[.<detail>]`) so filters in nsys/ncu scripts keep working.
"""

from __future__ import annotations

import contextlib

import torch


def _profiler_active() -> bool:
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


@contextlib.contextmanager
def nvtx_range(name: str):
    """Mark a range for nsys (NVTX, when CUDA is initialised) and the torch profiler (when it records).

    Costs two cheap checks when neither is active, so it can wrap per-attention-call work.
    """
    use_nvtx = torch.cuda.is_initialized()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        if _profiler_active():
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
