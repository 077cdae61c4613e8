"""Batch-invariant execution of a model's linear layers, and the intra-op thread count.

CPU (and GPU) GEMM libraries pick kernels by problem size, so row r of `x @ W.T` can change in its last
bits with the number of rows in the batch, and even with its position among them. Probing compares
branches with the clean run bit for bit (a probe that changes nothing must have an effect of exactly
zero, and a sweep must give the same numbers however its probes were batched or sharded). Inside
`batch_invariant()`, linear layers run as a batched matmul with one [T, K] x [K, N] product per batch row,
and convolutions run one row at a time: every row sees the same problem shape whatever the batch size,
hence the same bits. The model's own layers do it themselves (`models/invariant.py`); for modules with
other layers a TorchFunctionMode rewrites every F.linear / convolution call.
The attention itself goes through the probed operator, whose kernels are batch invariant by design.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.invariant import batch_invariant_conv, batch_invariant_linear, covers, set_batch_invariant

__all__ = ["batch_invariant", "layers_switch_themselves", "batch_invariant_conv", "batch_invariant_linear", "intra_op_threads", "single_threaded"]

_CONVOLUTIONS = (F.conv1d, F.conv2d)


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return batch_invariant_linear(*args, **kwargs)
        if func in _CONVOLUTIONS:
            return batch_invariant_conv(func, *args, **kwargs)
        return func(*args, **kwargs)


def layers_switch_themselves(model) -> bool:
    """True when every linear layer and convolution that `model`'s forward runs is one of
    `models.invariant`'s (SAMAudio: `network_modules()`), so `batch_invariant(native=True)` covers it."""
    return hasattr(model, "network_modules") and covers(model.network_modules())


@contextlib.contextmanager
def batch_invariant(native: bool = False):
    """Context manager: linear layers and convolutions computed per batch row (see module docstring).

    native=True: only switch the model's own layers (a thread-local flag), for code whose every linear layer
    and convolution is one of them (`layers_switch_themselves`). Default: also rewrite every F.linear /
    convolution call with a TorchFunctionMode (Python for every torch call).
    """
    previous = set_batch_invariant(True)
    try:
        if native:
            yield
        else:
            with _BatchInvariantMode():
                yield
    finally:
        set_batch_invariant(previous)


def single_threaded():
    """Run torch CPU ops on one intra-op thread in the calling Python thread, restoring its previous count.

    torch's multi-threaded element-wise kernels split a tensor at offsets that depend on its total size,
    and the elements at the end of each thread's chunk take a scalar path whose transcendental functions
    (exp, silu, ...) round differently from the vectorised one. With several threads a row's bits
    therefore depend on how many rows share the batch; with one thread they do not.

    torch's intra-op thread count is an OpenMP setting of the calling thread, so each Python thread sets
    and restores its own (tested): two threads in such blocks at once do not undo each other's setting.
    """
    return intra_op_threads(1)


@contextlib.contextmanager
def intra_op_threads(count: int):
    """Run torch CPU ops on `count` intra-op threads in the calling Python thread, restoring its previous
    count (a per-thread setting, see `single_threaded`)."""
    threads = torch.get_num_threads()
    if threads == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
