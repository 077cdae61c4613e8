"""The clean trajectory in exact mode may run on several intra-op threads: only where one evaluation on those
threads gives one thread's bits (checked by the engine on the first run of a configuration, and here
independently), and then the whole run and every sweep branched from it are bitwise the one-thread ones."""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest
import torch

import latentflow_fast.probe.engine as engine_module
from latentflow_fast.probe import Probe, ProbeEngine
from latentflow_fast.probe.invariance import batch_invariant, intra_op_threads

from engine_fixtures import small_clip, small_model

STEPS = 1  # midpoint: 2 evaluations (the check at the first, two threads at the second)
CAPTURE = dict(capture=("entropy", "segment_mass"), capture_sites="layers.0.*", cache_heads="*")


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_clip():
    # dim 128 and a 1.25 s clip (312 frames): the [1, T, D] activations (40k elements) exceed torch's grain
    # size (32768), so element-wise ops are split between two threads and the comparison means something
    model = small_model(dim=128, heads=4)
    clip = small_clip(0)
    clip.mixture = torch.cat([clip.mixture] * 5)
    clip.target = torch.cat([clip.target] * 5)
    return model, clip


def _same_trajectory(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a.states, b.states))
    assert all(torch.equal(x, y) for x, y in zip(a.velocities, b.velocities))
    assert torch.equal(a.final, b.final) and torch.equal(a.target, b.target)
    assert a.captures.keys() == b.captures.keys()
    assert all(torch.equal(a.captures[s][n], b.captures[s][n]) for s in a.captures for n in a.captures[s])
    assert all(torch.equal(a.head_outputs[s], b.head_outputs[s]) for s in a.head_outputs)
    assert a.layer_inputs.keys() == b.layer_inputs.keys()
    assert all(torch.equal(x, y) for e in a.layer_inputs for x, y in zip(a.layer_inputs[e], b.layer_inputs[e]))


def _one_evaluation(model, traj, threads):
    """Evaluation 0 of the clean run, computed directly (SDPA everywhere, per-row linears) on `threads`."""
    with torch.no_grad(), batch_invariant(), intra_op_threads(threads):
        inputs = traj.inputs
        return model(inputs.noise, torch.full((1,), traj.schedule[0][1]), inputs.mixture, inputs.text, inputs.text_mask)


def test_clean_trajectory_uses_all_threads_exactly_when_they_give_one_threads_bits(model_and_clip):
    model, clip = model_and_clip
    with _threads(2):
        reference = ProbeEngine(model, time_bins=4, trajectory_threads=1).trajectory(clip, steps=STEPS, **CAPTURE)
        engine = ProbeEngine(model, time_bins=4)
        first = engine.trajectory(clip, steps=STEPS, **CAPTURE)
        again = engine.trajectory(clip, steps=STEPS, **CAPTURE)
        assert torch.get_num_threads() == 2
    assert reference.threads == 1
    # whatever the engine decided, the bits are one thread's
    _same_trajectory(first, reference)
    _same_trajectory(again, reference)
    # and its decision agrees with an independent comparison on this device
    independent = torch.equal(_one_evaluation(model, reference, 1), _one_evaluation(model, reference, 2))
    assert first.threads == again.threads == (2 if independent else 1)


def test_sweeps_from_a_many_thread_trajectory_are_bitwise_the_one_thread_ones(model_and_clip):
    model, clip = model_and_clip
    probes = [Probe("layers.0.self_attn", "head_ablation", heads=(1,), evaluation=1),
              Probe("layers.1.cross_attn", "logit_scale", value=0.0, evaluation=0),
              Probe("layers.0.self_attn", "none", evaluation=1),
              Probe("layers.1.self_attn", "head_ablation", value=1.0, evaluation=0, window=None)]
    with _threads(2):
        tables = []
        for engine in (ProbeEngine(model, time_bins=4, trajectory_threads=1), ProbeEngine(model, time_bins=4)):
            traj = engine.trajectory(clip, steps=STEPS, **CAPTURE)
            tables.append(engine.sweep(traj, probes, end_effect=True, progress=False, batch_size=3)
                          .sort_values("probe_id").reset_index(drop=True))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    table = tables[1].set_index("probe_id")
    real, identity = table.loc[[p.probe_id for p in probes[:2]]], table.loc[[p.probe_id for p in probes[2:]]]
    assert (identity["local_effect"] == 0).all() and (identity["end_latent_change"] == 0).all()
    assert (real["local_effect"] > 0).all()


def test_a_failed_thread_check_keeps_one_thread_and_is_remembered(model_and_clip, monkeypatch):
    model, clip = model_and_clip
    calls = []

    def differs(a, b):
        calls.append(1)
        return False

    monkeypatch.setattr(engine_module, "_same_evaluation", differs)
    used = []
    original = engine_module.intra_op_threads

    def spy(count):
        used.append(count)
        return original(count)

    monkeypatch.setattr(engine_module, "intra_op_threads", spy)
    with _threads(2):
        engine = ProbeEngine(model, time_bins=4)
        first = engine.trajectory(clip, steps=STEPS, **CAPTURE)
        used_first = list(used)
        second = engine.trajectory(clip, steps=STEPS, **CAPTURE)
        reference = ProbeEngine(model, time_bins=4, trajectory_threads=1).trajectory(clip, steps=STEPS, **CAPTURE)
    assert first.threads == second.threads == 1
    assert len(calls) == 1  # one check per configuration
    assert used_first == [1, 2]  # evaluation 0 on one thread (the result) and on two (the check) only
    assert used == used_first  # the second run: one thread throughout, no check
    _same_trajectory(first, reference)
    _same_trajectory(second, reference)


def test_runs_with_maps_or_reductions_and_fast_mode_skip_the_check(model_and_clip):
    from latentflow_fast.probe.probes import MapRequest, Reduction

    model, clip = model_and_clip
    with _threads(2):
        engine = ProbeEngine(model, time_bins=4)
        maps = engine.trajectory(clip, steps=1, cache_heads=(), maps=[MapRequest("layers.0.self_attn", heads=(0,))])
        reduced = engine.trajectory(clip, steps=1, cache_heads=(),
                                    reductions=[Reduction("r", "layers.0.self_attn", lambda p, s, e: p.sum())])
        fast = ProbeEngine(model, time_bins=4, exact=False).trajectory(clip, steps=1, cache_heads=())
    assert maps.threads == reduced.threads == 1 and fast.threads is None
    assert not engine._thread_verdicts


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_trajectory_threads_is_checked(bad):
    with pytest.raises(ValueError, match="trajectory_threads"):
        ProbeEngine(small_model(), trajectory_threads=bad)
