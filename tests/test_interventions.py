"""One intervention vocabulary for Probe (engine) and Trace (hooks): "temperature" divides the logits in
both, "logit_scale" multiplies them; the old probe meaning of temperature is refused or warned about."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from latentflow_fast.probe import Probe, ProbeEngine, trace
from latentflow_fast.probe import interventions

from engine_fixtures import small_clip, small_model

SITE = "layers.1.self_attn"


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = ProbeEngine(small_model(), time_bins=4)
    traj = engine.trajectory(small_clip(0), steps=2)
    yield engine, traj
    torch.set_num_threads(threads)


def test_every_word_has_one_meaning_and_identity():
    assert interventions.logit_scale("temperature", 2.0) == 0.5
    assert interventions.logit_scale("temperature", math.inf) == 0.0
    assert interventions.logit_scale("logit_scale", 2.0) == 2.0
    for kind, value in (("temperature", 1.0), ("logit_scale", 1.0), ("head_ablation", 1.0), ("none", 0.0)):
        assert Probe(SITE, kind, value=value).is_identity
    assert not Probe(SITE, "temperature", value=2.0).is_identity
    assert Probe(SITE, "logit_scale", value=0.0).probe_kind == "uniform"
    assert Probe(SITE, "temperature", value=math.inf).probe_kind == "uniform"
    assert Probe(SITE, "temperature", value=2.0).probe_kind == "temperature"


def test_old_temperature_meaning_is_refused_or_warned():
    with pytest.raises(ValueError, match="logit_scale"):  # temperature 0 was the old spelling of "uniform"
        Probe(SITE, "temperature", value=0.0)
    with pytest.raises(ValueError, match="> 0"):
        Probe(SITE, "temperature", value=-1.0)
    with pytest.raises(TypeError, match="logit scale"):
        Probe(SITE, "logit_scale", value=math.nan)
    interventions._warned = False
    with pytest.warns(FutureWarning, match="now divides the logits"):
        Probe(SITE, "temperature", value=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Probe(SITE, "temperature", value=3.0)  # once per process
        Probe(SITE, "logit_scale", value=3.0)
    # temperature probes have ids of their own: rows stored under the old meaning are not reused
    old_id = Probe(SITE, "logit_scale", value=2.0).probe_id
    assert Probe(SITE, "temperature", value=2.0).probe_id != old_id


def test_temperature_probe_is_the_reciprocal_logit_scale_bitwise(setup):
    engine, traj = setup
    rows = engine.run_batch(traj, 1, [Probe(SITE, "temperature", heads=(0,), value=2.0, evaluation=1),
                                      Probe(SITE, "logit_scale", heads=(0,), value=0.5, evaluation=1),
                                      Probe(SITE, "logit_scale", heads=(0,), value=2.0, evaluation=1)])
    assert rows[0]["local_effect"] == rows[1]["local_effect"] > 0
    assert rows[0]["local_effect"] != rows[2]["local_effect"]


@pytest.mark.parametrize("word, value", [("temperature", 2.0), ("temperature", 0.5), ("temperature", math.inf),
                                         ("logit_scale", 2.0), ("logit_scale", 0.0)])
def test_engine_and_trace_agree_on_each_word(setup, word, value):
    """The same word on the two APIs: the engine's local effect equals the one computed from a traced
    forward pass (Trace.set_temperature / scale_logits over the model's own attention elsewhere)."""
    engine, traj = setup
    e = 2
    row = engine.run_batch(traj, e, [Probe(SITE, word, heads=(1,), value=value, evaluation=e)])[0]
    model = engine.model
    with torch.no_grad(), trace(model) as tr:
        if word == "temperature":
            tr.set_temperature(SITE, value, heads=1)
        else:
            tr.scale_logits(SITE, value, heads=1)
        v = model(traj.states[e], torch.full((1,), traj.schedule[e][1]), traj.inputs.mixture, traj.inputs.text,
                  traj.inputs.text_mask)
    clean = traj.velocities[e]
    independent = float((v - clean).norm() / clean.norm())
    assert row["local_effect"] > 0
    assert row["local_effect"] == pytest.approx(independent, rel=1e-3, abs=1e-6)


def test_trace_checks_its_words():
    model = small_model()
    with trace(model) as tr:
        with pytest.raises(ValueError, match="logit_scale"):
            tr.set_temperature(SITE, 0.0)
        with pytest.raises(TypeError, match="factor"):
            tr.scale_logits(SITE, math.inf)
