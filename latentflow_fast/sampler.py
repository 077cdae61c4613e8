"""Deterministic flow-matching ODE sampler (t from 0 = noise to 1 = data), fixed grid h = 1 / steps.

SAM Audio integrates with torchdiffeq's fixed-grid midpoint method, step 2/32 -> 16 steps, 32 network
evaluations. Everything here is indexed by *evaluation*: the velocity function receives the evaluation
index, so that probing / caching code can act on single evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops.profiling import nvtx_range

METHODS = {"euler": 1, "midpoint": 2}  # network evaluations per step

# velocity_fn(state, t, evaluation) -> velocity with the shape of state
VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]


@dataclass
class Evaluation:
    index: int  # evaluation index, 0 .. num_evaluations - 1
    step: int  # ODE step this evaluation belongs to
    t: float  # time at which the velocity was evaluated
    state: torch.Tensor  # the state the velocity was evaluated at (a clone)
    velocity: torch.Tensor  # the velocity returned (a clone)


@dataclass
class SampleResult:
    final: torch.Tensor
    trajectory: Optional[list[Evaluation]] = None


def _check(steps, method) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")


def num_evaluations(steps: int = 16, method: str = "midpoint") -> int:
    _check(steps, method)
    return steps * METHODS[method]


def evaluation_schedule(steps: int = 16, method: str = "midpoint") -> list[tuple[int, float]]:
    """[(evaluation index, t)] in the order the sampler evaluates the network."""
    _check(steps, method)
    h = 1.0 / steps
    schedule = []
    for k in range(steps):
        t = k * h
        times = [t] if method == "euler" else [t, t + 0.5 * h]
        for tt in times:
            schedule.append((len(schedule), tt))
    return schedule


def sample_ode(velocity_fn: VelocityFn, x0: torch.Tensor, steps: int = 16, method: str = "midpoint",
               record: bool = False) -> SampleResult:
    """Integrate dx/dt = velocity_fn(x, t, evaluation) from t=0 (x0 = noise) to t=1.

    euler:    x_{k+1} = x_k + h v(x_k, t_k)
    midpoint: v1 = v(x_k, t_k); v2 = v(x_k + h/2 v1, t_k + h/2); x_{k+1} = x_k + h v2
    With record=True the result's trajectory lists every evaluation (cloned state, velocity, t).
    """
    from .numerics import check_finite

    _check(steps, method)
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if not callable(velocity_fn):
        raise TypeError("velocity_fn must be callable")
    h = 1.0 / steps
    trajectory: Optional[list[Evaluation]] = [] if record else None
    counter = 0

    def evaluate(state: torch.Tensor, t: float, step: int) -> torch.Tensor:
        nonlocal counter
        with nvtx_range(f"latentflow.evaluation.{counter}"):
            v = velocity_fn(state, t, counter)
        if v.shape != state.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(state.shape)}")
        check_finite(v, f"velocity at evaluation {counter} (t={t:.4f})")
        if trajectory is not None:
            trajectory.append(Evaluation(counter, step, t, state.detach().clone(), v.detach().clone()))
        counter += 1
        return v

    x = x0
    for k in range(steps):
        t = k * h
        v = evaluate(x, t, k)
        if method == "midpoint":
            v = evaluate(x + (0.5 * h) * v, t + 0.5 * h, k)
        x = x + h * v
    return SampleResult(final=x, trajectory=trajectory)


__all__ = ["Evaluation", "SampleResult", "sample_ode", "evaluation_schedule", "num_evaluations", "METHODS"]
