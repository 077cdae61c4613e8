"""Batch-invariant linear layers and convolutions, switched on per Python thread.

CPU (and GPU) GEMM libraries pick kernels by problem size, so row r of `x @ W.T` can change in its last
bits with the number of rows in the batch. Probing compares branches with the clean run bit for bit, so
inside `probe.invariance.batch_invariant()` a linear layer runs as a batched matmul with one [T, K] x [K, N]
product per batch row, and a convolution runs one row at a time: every row sees the same problem shape
whatever the batch size, hence the same bits.

The model's own layers (`Linear`, `Conv1d`: nn.Linear / nn.Conv1d with the same parameters and state-dict
keys) do this themselves when the calling thread has switched it on, at the cost of one attribute lookup.
A TorchFunctionMode that rewrites every F.linear would do the same for any module, but it runs Python for
every torch call of the forward pass (about 1300 per evaluation of the small model, 15% of its time at
batch 1); `probe.invariance` keeps it as the fallback for models with other layers.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

_state = threading.local()  # .on: batch-invariant layers switched on in this thread


def batch_invariant_on() -> bool:
    return getattr(_state, "on", False)


def set_batch_invariant(on: bool) -> bool:
    """Switch the layers' batch-invariant path on or off in the calling thread; returns the previous value."""
    previous = getattr(_state, "on", False)
    _state.on = bool(on)
    return previous


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


class Linear(nn.Linear):
    """nn.Linear that computes each batch row on its own while batch invariance is on in this thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(_state, "on", False):
            return batch_invariant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Conv1d(nn.Conv1d):
    """nn.Conv1d that runs one batch row at a time while batch invariance is on in this thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(_state, "on", False):
            return batch_invariant_conv(super().forward, x)
        return super().forward(x)


def covers(modules) -> bool:
    """True when every linear layer and convolution among `modules` (and their submodules) is one of ours."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, Linear):
                return False
            if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, Conv1d):
                return False
    return True
