import numpy as np
import pytest

from latentflow_fast.data import synthetic
from latentflow_fast.data import CLASSES, SAMPLE_RATE, CLIP_SAMPLES, make_batch, make_mixture, eval_seeds

SEEDS = list(range(40)) + eval_seeds(20)


def test_same_seed_same_mixture_and_different_seeds_differ():
    a, b = make_mixture(7), make_mixture(7)
    assert np.array_equal(a.mixture, b.mixture)
    assert a.classes == b.classes and a.prompt == b.prompt and a.gains_db == b.gains_db
    assert not np.array_equal(a.mixture, make_mixture(8).mixture)


@pytest.mark.parametrize("seed", SEEDS)
def test_mixture_rules(seed):
    m = make_mixture(seed)
    assert m.sample_rate == SAMPLE_RATE == 16_000
    assert m.mixture.shape == (CLIP_SAMPLES,) == (32_000,)
    assert m.mixture.dtype == np.float32
    assert m.n_sources in (2, 3)
    assert len(set(m.classes)) == m.n_sources and set(m.classes) <= set(CLASSES)
    assert m.prompt == m.classes[m.target_index]
    assert np.array_equal(m.target, m.sources[m.target_index])
    others = [m.sources[i] for i in range(m.n_sources) if i != m.target_index]
    np.testing.assert_allclose(m.residual, np.sum(others, axis=0), atol=1e-6)
    assert np.array_equal(m.target + m.residual, m.mixture)
    for src, (start, end), gain in zip(m.sources, m.active_intervals, m.gains_db):
        assert end - start >= int(0.6 * SAMPLE_RATE)
        assert 0 <= start < end <= CLIP_SAMPLES
        assert not src[:start].any() and not src[end:].any()
        assert -6.0 <= gain <= 6.0
        rms = np.sqrt(np.mean(src[start:end].astype(np.float64) ** 2))
        np.testing.assert_allclose(rms, 0.1 * 10 ** (gain / 20), rtol=1e-4)
        # 10 ms fades: the first and last samples of the interval are nearly silent
        peak = np.abs(src[start:end]).max()
        assert abs(src[start]) <= 0.05 * peak + 1e-7 and abs(src[end - 1]) <= 0.05 * peak + 1e-7


def test_class_parameter_ranges():
    seen = set()
    for seed in range(150):
        m = make_mixture(seed)
        for cls, p in zip(m.classes, m.params):
            seen.add(cls)
            if cls == "sine tone":
                assert 200 <= p["frequency_hz"] <= 2000
            elif cls == "square wave":
                assert 100 <= p["f0_hz"] <= 800
            elif cls == "click train":
                assert 4 <= p["rate_hz"] <= 20
            elif cls == "chirp":
                assert 200 <= p["f_start_hz"] <= 4000 and 200 <= p["f_end_hz"] <= 4000
            elif cls == "noise bursts":
                assert 2 <= p["n_bursts"] <= 6
                for _, length in p["bursts"]:
                    assert 0.05 * SAMPLE_RATE <= length <= 0.2 * SAMPLE_RATE
    assert seen == set(CLASSES)


def test_click_train_is_impulses_and_sine_has_its_frequency():
    for seed in range(200):
        m = make_mixture(seed)
        for src, cls, p, (s, e) in zip(m.sources, m.classes, m.params, m.active_intervals):
            seg = src[s:e].astype(np.float64)
            if cls == "click train":
                # impulses: almost all samples are zero
                assert np.count_nonzero(seg) <= p["n_clicks"]
            if cls == "sine tone":
                spec = np.abs(np.fft.rfft(seg))
                peak_hz = np.argmax(spec) * SAMPLE_RATE / len(seg)
                assert abs(peak_hz - p["frequency_hz"]) < 3 * SAMPLE_RATE / len(seg)


def test_two_and_three_source_mixtures_both_occur_and_complexity():
    counts = {make_mixture(s).n_sources for s in range(30)}
    assert counts == {2, 3}
    c = make_mixture(3).complexity
    assert set(c) >= {"n_sources", "gain_spread_db"} and 0 <= c["gain_spread_db"] <= 12


def test_make_batch_stacks():
    b = make_batch([1, 2, 3])
    assert b.mixture.shape == (3, CLIP_SAMPLES)
    assert b.prompts == tuple(make_mixture(s).prompt for s in (1, 2, 3))
    assert np.array_equal(b.target[1], make_mixture(2).target)


def test_seed_ranges_are_disjoint():
    assert synthetic.TRAIN_SEEDS.stop <= synthetic.EVAL_SEEDS.start
    assert all(s in synthetic.EVAL_SEEDS for s in eval_seeds(5))


def test_bad_seeds_raise():
    with pytest.raises(ValueError, match="seed"):
        make_mixture(-1)
    with pytest.raises(TypeError, match="seed"):
        make_mixture(1.5)
    with pytest.raises(TypeError, match="seeds"):
        make_batch(3)
