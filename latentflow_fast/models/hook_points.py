"""Named identity modules marking activations, as TransformerLens's HookPoint does.

A `HookPointModule` returns its input unchanged; the probe API (`latentflow_fast.probe.trace`) attaches
forward hooks to it by `name` to read, cache, edit or take gradients of that activation. With no hook
attached it costs one module call and changes no numerics (no parameters, no state-dict keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class HookPointModule(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name  # the hook name, relative to the model the probe API sees (e.g. "layers.3.hook_resid_pre")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return repr(self.name)
