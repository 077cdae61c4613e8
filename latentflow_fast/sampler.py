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
               record: bool = False, *, start_evaluation: int = 0,
               velocity: Optional[torch.Tensor] = None) -> SampleResult:
    """Integrate dx/dt = velocity_fn(x, t, evaluation) from t=0 (x0 = noise) to t=1.

    euler:    x_{k+1} = x_k + h v(x_k, t_k)
    midpoint: v1 = v(x_k, t_k); v2 = v(x_k + h/2 v1, t_k + h/2); x_{k+1} = x_k + h v2
    With record=True the result's trajectory lists every evaluation (cloned state, velocity, t).

    Starting mid-trajectory (the one sampler every branch uses): with ``start_evaluation`` = e, ``x0`` is
    the state at the start of e's step, and ``velocity`` is the velocity already computed at evaluation
    e (a branched or intervened evaluation). Integration continues from there with exactly the arithmetic
    of an uninterrupted run, so a branch whose velocity equals the clean one reproduces the clean result
    bit for bit. Without ``velocity`` the run starts by evaluating e, which must then open a step.
    """
    from .numerics import check_finite

    _check(steps, method)
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if not callable(velocity_fn):
        raise TypeError("velocity_fn must be callable")
    per_step = METHODS[method]
    if isinstance(start_evaluation, bool) or not isinstance(start_evaluation, int) or \
            not 0 <= start_evaluation < steps * per_step:
        raise ValueError(f"start_evaluation must be an int in [0, {steps * per_step}), got {start_evaluation!r}")
    first_step, position = divmod(start_evaluation, per_step)
    if velocity is None and position:
        raise ValueError("velocity: starting at the midpoint evaluation of a step needs its velocity")
    if velocity is not None and velocity.shape != x0.shape:
        raise ValueError(f"velocity must have the shape of x0 {tuple(x0.shape)}, got {tuple(velocity.shape)}")
    h = 1.0 / steps
    trajectory: Optional[list[Evaluation]] = [] if record else None
    counter = start_evaluation

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
    for k in range(first_step, steps):
        t = k * h
        if k == first_step and velocity is not None:
            v = velocity  # evaluation start_evaluation, computed by the caller
            counter += 1
            if method == "midpoint" and position == 0:
                v = evaluate(x + (0.5 * h) * v, t + 0.5 * h, k)
        else:
            v = evaluate(x, t, k)
            if method == "midpoint":
                v = evaluate(x + (0.5 * h) * v, t + 0.5 * h, k)
        x = x + h * v
    return SampleResult(final=x, trajectory=trajectory)


__all__ = ["Evaluation", "SampleResult", "sample_ode", "evaluation_schedule", "num_evaluations", "METHODS"]
