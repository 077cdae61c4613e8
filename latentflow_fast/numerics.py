"""Non-finite values stop a run with an error naming where they appeared.

A checkpoint with NaN weights (or an overflow) would otherwise flow through the sampler into NaN
latents, WAVs of full-scale -32768 and comparisons that silently read as "equal" or "stable". The
sampler, the probe engine and the decoder check their outputs (one reduction per evaluation) and raise
NonFiniteError; `first_nonfinite_module` re-runs the failing evaluation with forward hooks to name the
first layer that produced a non-finite output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # torch is imported where used: the CLI imports this module before torch
    import torch


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or Inf in a model output (velocity, latent, waveform) or in attention inputs (a ValueError, as
    every rejected operator input is, and a FloatingPointError)."""


def count_nonfinite(tensor: "torch.Tensor") -> int:
    import torch

    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def check_finite(tensor: torch.Tensor, what: str, where: Callable[[], Optional[str]] = None) -> torch.Tensor:
    """Return `tensor`, or raise NonFiniteError naming `what` (and `where()`, called only on failure)."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = count_nonfinite(tensor)
        located = where() if where is not None else None
        raise NonFiniteError(
            f"{what} has {bad} non-finite value(s) of {tensor.numel()}"
            + (f"; first non-finite output at {located}" if located else "")
            + " (NaN/Inf weights in the checkpoint, or an overflow)"
        )
    return tensor


def first_nonfinite_module(model: torch.nn.Module, run: Callable[[], object]) -> Optional[str]:
    """Name of the first submodule (in execution order) whose output holds a non-finite value while
    `run()` executes, e.g. "transformer.layers.0.self_attn"; None if none did."""
    import torch

    found: list = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module, inputs, output):
        if found:
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for o in outputs:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and not bool(torch.isfinite(o).all()):
                found.append(names.get(module, type(module).__name__))
                return

    # Hook only leaves and direct containers of parameters: the innermost module that produced the value
    # fires first, so the first hit names the layer where it appeared.
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - locating is best effort; the caller raises its own error
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
