"""Batch-invariant execution of a model's linear layers.

CPU (and GPU) GEMM libraries pick kernels by problem size, so row r of `x @ W.T` can change in its last
bits with the number of rows in the batch, and even with its position among them. Probing compares
branches with the clean run bit for bit (a probe that changes nothing must have an effect of exactly
zero, and a sweep must give the same numbers however its probes were batched or sharded). Inside
`batch_invariant()`, F.linear runs as a batched matmul with one [T, K] x [K, N] product per batch row,
and convolutions run one row at a time: every row sees the same problem shape whatever the batch size,
hence the same bits.
The attention itself goes through the probed operator, whose kernels are batch invariant by design.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear whose result for x[b] does not depend on the other rows of x."""
    if x.dim() < 2:
        return F.linear(x, weight, bias)
    rows, k = x.shape[0], x.shape[-1]
    out = torch.bmm(x.reshape(rows, -1, k), weight.t().expand(rows, k, weight.shape[0]))
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def batch_invariant_conv(conv, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A convolution run one batch row at a time: every call has the same shape whatever the batch."""
    if x.dim() < 3 or x.shape[0] == 1:
        return conv(x, *args, **kwargs)
    return torch.cat([conv(x[i : i + 1], *args, **kwargs) for i in range(x.shape[0])])


_CONVOLUTIONS = (F.conv1d, F.conv2d)


class _BatchInvariantMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return batch_invariant_linear(*args, **kwargs)
        if func in _CONVOLUTIONS:
            return batch_invariant_conv(func, *args, **kwargs)
        return func(*args, **kwargs)


def batch_invariant():
    """Context manager: linear layers computed per batch row (see module docstring)."""
    return _BatchInvariantMode()


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
