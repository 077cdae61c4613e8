"""The flow-matching ODE sampler: schedule, accuracy order, recording, determinism."""

import math

import pytest
import torch

from latentflow_fast.sampler import Evaluation, evaluation_schedule, num_evaluations, sample_ode


def linear_velocity(lam):
    return lambda x, t, i: lam * x


def test_evaluation_counts_and_schedule():
    assert num_evaluations(16, "midpoint") == 32
    assert num_evaluations(16, "euler") == 16
    sched = evaluation_schedule(16, "midpoint")
    assert [i for i, _ in sched] == list(range(32))
    assert [t for _, t in sched[:4]] == [0.0, 1 / 32, 1 / 16, 3 / 32]
    assert sched[-1][1] == 15 / 16 + 1 / 32
    assert [t for _, t in evaluation_schedule(4, "euler")] == [0.0, 0.25, 0.5, 0.75]


def test_calls_match_schedule():
    calls = []

    def v(x, t, i):
        calls.append((i, t))
        return torch.zeros_like(x)

    sample_ode(v, torch.zeros(3), steps=16, method="midpoint")
    assert calls == evaluation_schedule(16, "midpoint")


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2)])
def test_accuracy_order_on_linear_ode(method, order):
    lam, x0 = -1.3, torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(lam)
    errs = [(sample_ode(linear_velocity(lam), x0, steps=n, method=method).final - exact).abs().max().item()
            for n in (8, 16, 32)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 2 ** order * 0.8 < coarse / fine < 2 ** order * 1.25


def test_time_dependent_velocity():
    x0 = torch.zeros(1, dtype=torch.float64)
    v = lambda x, t, i: torch.full_like(x, t)  # x(1) = 1/2
    assert sample_ode(v, x0, steps=8, method="midpoint").final.item() == pytest.approx(0.5, abs=1e-15)
    assert sample_ode(v, x0, steps=8, method="euler").final.item() == pytest.approx(0.5 * (1 - 1 / 8), abs=1e-15)


def test_record_trajectory():
    x0 = torch.randn(2, 3)
    res = sample_ode(linear_velocity(0.5), x0, steps=3, method="midpoint", record=True)
    traj = res.trajectory
    assert len(traj) == 6 and all(isinstance(e, Evaluation) for e in traj)
    assert [e.index for e in traj] == list(range(6))
    assert [e.step for e in traj] == [0, 0, 1, 1, 2, 2]
    assert [e.t for e in traj] == [t for _, t in evaluation_schedule(3, "midpoint")]
    assert torch.equal(traj[0].state, x0)
    for e in traj:
        assert torch.equal(e.velocity, 0.5 * e.state)
    h = 1 / 3
    assert torch.equal(traj[1].state, x0 + (0.5 * h) * traj[0].velocity)
    assert torch.equal(traj[2].state, x0 + h * traj[1].velocity)
    assert sample_ode(linear_velocity(0.5), x0, steps=3).trajectory is None


def test_recorded_tensors_are_clones():
    buf = torch.zeros(2)

    def v(x, t, i):
        buf.fill_(float(i))  # the velocity function reuses one buffer
        return buf

    res = sample_ode(v, torch.zeros(2), steps=2, method="euler", record=True)
    assert [e.velocity[0].item() for e in res.trajectory] == [0.0, 1.0]


def test_bitwise_repeat():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 8, generator=g) / 3
    v = lambda x, t, i: torch.tanh(x @ W) * (1 + t)
    x0 = torch.randn(4, 8, generator=g)
    a = sample_ode(v, x0, steps=16).final
    b = sample_ode(v, x0, steps=16).final
    assert torch.equal(a, b)


def test_bad_arguments():
    v = linear_velocity(1.0)
    with pytest.raises(ValueError, match="steps"):
        sample_ode(v, torch.zeros(1), steps=0)
    with pytest.raises(ValueError, match="steps"):
        sample_ode(v, torch.zeros(1), steps=2.0)
    with pytest.raises(ValueError, match="method"):
        sample_ode(v, torch.zeros(1), method="rk4")
    with pytest.raises(TypeError, match="x0"):
        sample_ode(v, [0.0])
    with pytest.raises(ValueError, match="shape"):
        sample_ode(lambda x, t, i: x[:0], torch.zeros(2))


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_a_run_resumed_mid_trajectory_reproduces_the_full_run_bitwise(method):
    """The one sampler starts at any evaluation: given the state at the start of that evaluation's step
    and the velocity computed there, it reproduces the uninterrupted run bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(6, 6) / 3

    def velocity(x, t, i):
        return torch.tanh(x @ w) * (1 + t) + 0.1 * i

    x0 = torch.randn(2, 6)
    full = sample_ode(velocity, x0, steps=5, method=method, record=True)
    per_step = 2 if method == "midpoint" else 1
    for e, ev in enumerate(full.trajectory):
        step_start = full.trajectory[(e // per_step) * per_step].state
        resumed = sample_ode(velocity, step_start, steps=5, method=method, start_evaluation=e,
                             velocity=ev.velocity, record=True)
        assert torch.equal(resumed.final, full.final), e
        assert [r.index for r in resumed.trajectory] == list(range(e + 1, 5 * per_step))
        if e % per_step == 0:  # a step boundary: starting without a velocity evaluates e itself
            fresh = sample_ode(velocity, step_start, steps=5, method=method, start_evaluation=e)
            assert torch.equal(fresh.final, full.final), e


def test_resuming_checks_its_arguments():
    v = linear_velocity(0.5)
    with pytest.raises(ValueError, match="start_evaluation"):
        sample_ode(v, torch.zeros(3), steps=2, method="euler", start_evaluation=2)
    with pytest.raises(ValueError, match="velocity"):
        sample_ode(v, torch.zeros(3), steps=2, method="midpoint", start_evaluation=1)
    with pytest.raises(ValueError, match="velocity"):
        sample_ode(v, torch.zeros(3), steps=2, start_evaluation=0, velocity=torch.zeros(4))
