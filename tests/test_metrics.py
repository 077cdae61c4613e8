import math

import numpy as np
import pytest
import torch

from latentflow_fast.metrics import (
    identity_correct,
    log_mel_distance,
    multi_resolution_stft_distance,
    si_sdr,
    si_sdr_improvement,
)


def _hand_si_sdr(e, r):
    e = np.asarray(e, dtype=np.float64) - np.mean(e)
    r = np.asarray(r, dtype=np.float64) - np.mean(r)
    a = np.dot(e, r) / np.dot(r, r)
    return 10 * math.log10(np.sum((a * r) ** 2) / np.sum((a * r - e) ** 2))


def test_si_sdr_matches_hand_computation():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(1000)
    e = 0.7 * r + 0.2 * rng.standard_normal(1000)
    assert float(si_sdr(e, r)) == pytest.approx(_hand_si_sdr(e, r), abs=1e-9)
    # a tiny worked example: e = r + n with n orthogonal to r and |n|^2 = |r|^2 / 10 -> 10 dB
    r2 = np.array([1.0, -1.0, 1.0, -1.0])
    n2 = np.array([1.0, 1.0, -1.0, -1.0]) * math.sqrt(0.1)
    assert float(si_sdr(r2 + n2, r2)) == pytest.approx(10.0, abs=1e-9)


def test_si_sdr_is_scale_invariant_and_batched():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 800, generator=g)
    e = r + 0.3 * torch.randn(4, 800, generator=g)
    base = si_sdr(e, r)
    assert base.shape == (4,) and base.dtype == torch.float64
    torch.testing.assert_close(si_sdr(5.0 * e, r), base)
    torch.testing.assert_close(si_sdr(e, 0.01 * r), base)
    for b in range(4):
        assert float(base[b]) == pytest.approx(_hand_si_sdr(e[b].numpy(), r[b].numpy()), abs=1e-6)


def test_si_sdr_improvement():
    g = torch.Generator().manual_seed(1)
    target, other = torch.randn(2, 1000, generator=g)
    mixture = target + other
    imp = si_sdr_improvement(target + 0.1 * other, target, mixture)
    assert float(imp) == pytest.approx(float(si_sdr(target + 0.1 * other, target) - si_sdr(mixture, target)))
    assert float(imp) > 15


def test_identity_correct():
    g = torch.Generator().manual_seed(2)
    sources = torch.randn(3, 1000, generator=g)
    estimate = sources[1] + 0.5 * sources[0]
    assert bool(identity_correct(estimate, sources, 1))
    assert not bool(identity_correct(estimate, sources, 0))
    batch = torch.stack([estimate, sources[2]])
    out = identity_correct(batch, torch.stack([sources, sources]), [1, 1])
    assert out.tolist() == [True, False]
    ragged = identity_correct(batch, [sources, sources[1:]], [1, 1])  # 2nd: sources (s1, s2), target s2
    assert ragged.tolist() == [True, True]
    with pytest.raises(ValueError, match="target_index"):
        identity_correct(estimate, sources, 3)


def test_spectral_distances_zero_for_identical_and_grow_with_noise():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8000, generator=g)
    for fn in (multi_resolution_stft_distance, log_mel_distance):
        d0 = fn(x, x)
        assert d0.shape == (2,)
        assert torch.all(d0.abs() < 1e-6)
        d1 = fn(x + 0.1 * torch.randn(2, 8000, generator=g), x)
        d2 = fn(x + 1.0 * torch.randn(2, 8000, generator=g), x)
        assert torch.all(d1 > 0) and torch.all(d2 > d1)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same length"):
        si_sdr(torch.zeros(10), torch.zeros(11))
    with pytest.raises(TypeError, match="estimate"):
        si_sdr([1.0, 2.0], torch.zeros(2))
