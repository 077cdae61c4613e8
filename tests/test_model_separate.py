"""SAMAudio.separate on a small random model with an exactly invertible toy codec."""

import numpy as np
import pytest
import torch

from model_fixtures import small_model


@pytest.fixture(scope="module")
def model():
    return small_model(seed=1)


def wave(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_mono_output_shape_and_determinism(model):
    x = wave(1000)
    a = model.separate(x, 8000, "dog", steps=3)
    b = model.separate(x, 8000, "dog", steps=3)
    assert a.target.shape == (1000,) and a.residual.shape == (1000,) and a.sample_rate == 8000
    assert torch.equal(a.target, b.target) and torch.equal(a.residual, b.residual)
    c = model.separate(x, 8000, "dog", steps=3, seed=1)
    assert not torch.equal(a.target, c.target)
    assert a.latent.shape == (1, 63, 32) and a.noise.shape == (1, 63, 32) and a.trajectory is None


def test_noise_is_seeded_cpu_float32(model):
    res = model.separate(wave(160), 8000, "dog", steps=1, method="euler", seed=7)
    expected = torch.randn((1, 10, 32), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(res.noise, expected)


def test_batch_prompts_and_broadcast(model):
    x = wave(2, 800)
    both = model.separate(x, 8000, ["dog", "car horn"], steps=2)
    assert both.target.shape == (2, 800)
    dog = model.separate(x, 8000, "dog", steps=2)
    torch.testing.assert_close(both.target[0], dog.target[0], atol=1e-5, rtol=0)
    assert not torch.allclose(both.target[1], dog.target[1])


def test_stereo_is_averaged(model):
    x = wave(2, 2, 640)
    a = model.separate(x, 8000, "dog", steps=2)
    b = model.separate(x.mean(dim=1), 8000, "dog", steps=2)
    assert a.target.shape == (2, 640)
    assert torch.equal(a.target, b.target)


def test_resampling_path(model):
    x = wave(1, 3000)
    res = model.separate(x, 16000, "dog", steps=2)
    assert res.target.shape == (1, 3000) and res.sample_rate == 16000
    assert res.latent.shape[1] == 94  # 1500 samples at 8 kHz / hop 16, rounded up


def test_numpy_input_and_record(model):
    res = model.separate(wave(400).numpy().astype(np.float64), 8000, "dog", steps=2, record=True)
    assert len(res.trajectory) == 4
    assert torch.equal(res.trajectory[0].state, res.noise)


@pytest.mark.parametrize("audio,match", [
    (torch.zeros(0), "empty"),
    (torch.zeros(2, 0), "empty"),
    (torch.tensor([0.0, float("nan")] * 100), "NaN"),
    (torch.tensor([0.0, float("inf")] * 100), "NaN or Inf"),
    (torch.zeros(10), "shorter than one codec frame"),
    (torch.zeros(1, 1, 1, 100), "audio must be"),
])
def test_bad_audio(model, audio, match):
    with pytest.raises(ValueError, match=match) as info:
        model.separate(audio, 8000, "dog")
    assert "audio" in str(info.value)


def test_too_short_after_resampling(model):
    with pytest.raises(ValueError, match="audio is shorter"):
        model.separate(torch.zeros(20), 16000, "dog")  # 10 samples at the codec's 8 kHz < hop 16


def test_bad_arguments(model):
    x = wave(2, 400)
    with pytest.raises(ValueError, match="prompt"):
        model.separate(x, 8000, ["dog"])
    with pytest.raises(TypeError, match="prompt"):
        model.separate(x, 8000, 3)
    with pytest.raises(ValueError, match="prompts"):
        model.separate(x, 8000, ["dog", "cat"])  # unknown to the precomputed table
    with pytest.raises(TypeError, match="audio"):
        model.separate(torch.zeros(400, dtype=torch.int16), 8000, "dog")
    with pytest.raises(TypeError, match="audio"):
        model.separate([0.0] * 400, 8000, "dog")
    with pytest.raises(ValueError, match="sample_rate"):
        model.separate(x, 0, "dog")
    with pytest.raises(ValueError, match="steps"):
        model.separate(x, 8000, "dog", steps=0)
    with pytest.raises(ValueError, match="method"):
        model.separate(x, 8000, "dog", method="heun")


def test_requires_codec_and_text_encoder():
    bare = small_model(with_codec=False)
    with pytest.raises(RuntimeError, match="audio_codec"):
        bare.separate(wave(400), 8000, "dog")
