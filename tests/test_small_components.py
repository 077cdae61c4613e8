"""The `small` stand-in's parts: MDCT codec, contextual phrase encoder, scene generator, model sizes."""

import collections
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from latentflow_fast.data import scenes
from latentflow_fast.metrics import si_sdr
from latentflow_fast.models.mdct import MDCTCodec, mdct_basis
from latentflow_fast.models.phrase_text import PhraseTextEncoder
from latentflow_fast.models.small import DEFAULT_SMALL_CONFIG, build_small_model


# ------------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("length", [1, 100, 640, 1000, 16_000, 64_000, 64_123])
def test_mdct_round_trip_is_exact_and_energy_preserving(length):
    codec = MDCTCodec()
    gen = torch.Generator().manual_seed(length)
    wave = torch.randn(3, length, generator=gen, dtype=torch.float64)
    latent = codec.encode(wave)
    assert latent.shape == (3, max(2, -(-length // 320)), 320)
    assert codec.num_frames(length) == latent.shape[1]
    back = codec.decode(latent)
    assert back.shape == (3, latent.shape[1] * 320)
    torch.testing.assert_close(back[:, :length], wave, rtol=0, atol=1e-11)
    assert back[:, length:].abs().max().item() < 1e-11 if back.shape[1] > length else True
    # orthonormal lapped transform: energy of the (zero-padded) clip = energy of the coefficients / scale^2
    torch.testing.assert_close(latent.pow(2).sum(dim=(1, 2)) / codec.scale ** 2, wave.pow(2).sum(-1))


def test_mdct_basis_is_the_windowed_mdct():
    hop = 8
    basis = mdct_basis(hop).numpy()
    n, k = 5, 3
    window = np.sin(np.pi * (n + 0.5) / (2 * hop))
    expected = np.sqrt(2 / hop) * window * np.cos(np.pi / hop * (n + 0.5 + hop / 2) * (k + 0.5))
    assert basis[n, k] == pytest.approx(expected, abs=1e-15)
    # Princen-Bradley: w[n]^2 + w[n + hop]^2 = 1 makes overlap-add cancel the aliasing
    w = np.sin(np.pi * (np.arange(2 * hop) + 0.5) / (2 * hop))
    np.testing.assert_allclose(w[:hop] ** 2 + w[hop:] ** 2, 1.0)


def test_mdct_frames_are_local_and_centred():
    """An impulse at sample s reaches only the two frames whose windows cover it; frame t is centred on
    (t + 0.5) * hop, as the protocol's active-frame computation assumes."""
    codec = MDCTCodec()
    for s in (0, 5, 160, 1000, 63_999):
        wave = torch.zeros(1, 64_000, dtype=torch.float64)
        wave[0, s] = 1.0
        energy = codec.encode(wave)[0].pow(2).sum(-1)
        frames = set(torch.nonzero(energy > 1e-20).flatten().tolist())
        t = (s + 160) // 320  # frame t covers [t*320 - 160, t*320 + 480)
        assert frames <= {t % 200, (t - 1) % 200}, (s, frames)


def test_mdct_round_trip_si_sdr_on_clean_sources_float32():
    codec = MDCTCodec()
    for i, name in enumerate(scenes.CLASS_NAMES):
        signal, _, _ = scenes.render_source(name, np.random.Generator(np.random.PCG64(i)))
        wave = torch.from_numpy(signal).float()[None]
        assert si_sdr(codec.decode(codec.encode(wave)), wave).item() > 100.0, name


def test_mdct_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hop"):
        MDCTCodec(hop=321)
    with pytest.raises(ValueError, match="scale"):
        MDCTCodec(scale=float("nan"))
    codec = MDCTCodec(hop=32)
    with pytest.raises(ValueError, match="latent"):
        codec.decode(torch.zeros(1, 4, 31))
    with pytest.raises(ValueError, match="wave"):
        codec.encode(torch.zeros(1, 0))
    with pytest.raises(TypeError, match="wave"):
        codec.encode(torch.zeros(1, 10, dtype=torch.long))


# ------------------------------------------------------------------------------------------- text encoder
def _encoder():
    torch.manual_seed(0)
    return PhraseTextEncoder(scenes.vocabulary(), dim=32, layers=2, heads=4)


def test_phrase_encoder_is_contextual():
    enc = _encoder()
    with torch.no_grad():
        low, _ = enc(["a low tone"])
        high, _ = enc(["a high tone"])
    # the last token ("tone") is the same word at the same position; its feature depends on the phrase
    assert (low[0, 2] - high[0, 2]).abs().max() > 1e-3
    assert (low[0, 0] - high[0, 0]).abs().max() > 1e-3  # so does the determiner's


def test_phrase_encoder_rows_do_not_depend_on_the_batch():
    enc = _encoder()
    with torch.no_grad():
        alone, mask_alone = enc(["a rising chirp"])
        batch, mask = enc(["a wailing police siren sound", "a rising chirp", "the bell"])
    assert torch.equal(batch[1, :3], alone[0])
    assert mask[1].tolist() == [True, True, True, False, False] and mask_alone.all()
    assert torch.count_nonzero(batch[1, 3:]) == 0


def test_phrase_encoder_errors_name_the_vocabulary():
    enc = _encoder()
    with pytest.raises(ValueError, match="known words: .*siren"):
        enc(["a purple siren"])
    with pytest.raises(ValueError, match="at most 8"):
        enc(["a a a a a a a a a"])
    with pytest.raises(ValueError, match="at least one word"):
        enc(["   "])


# -------------------------------------------------------------------------------------------- generator
def test_scenes_are_deterministic_and_consistent():
    a, b = scenes.make_mixture(1_000_000_007), scenes.make_mixture(1_000_000_007)
    assert np.array_equal(a.mixture, b.mixture) and a.phrases == b.phrases
    for seed in list(range(40)) + scenes.eval_seeds(40):
        m = scenes.make_mixture(seed)
        assert m.mixture.shape == (scenes.CLIP_SAMPLES,) and m.mixture.dtype == np.float32
        assert 2 <= m.n_sources <= 3 and len(set(m.classes)) == m.n_sources
        assert np.array_equal(m.mixture, m.target + m.residual)
        assert np.array_equal(m.target, m.sources[m.target_index])
        assert m.prompt == m.phrases[m.target_index]
        # every pair of sources overlaps in time (active intervals of >= 2 s in a 4 s clip)
        for i in range(m.n_sources):
            for j in range(i + 1, m.n_sources):
                (s0, e0), (s1, e1) = m.active_intervals[i], m.active_intervals[j]
                assert min(e0, e1) - max(s0, s1) > 0
        for phrase in m.phrases:
            assert 3 <= len(phrase.split()) <= 6 and set(phrase.split()) <= set(scenes.vocabulary())
        for (start, end), source in zip(m.active_intervals, m.sources):
            assert np.count_nonzero(source[:start]) == 0 and np.count_nonzero(source[end:]) == 0


def test_scene_classes_and_attributes():
    assert len(scenes.CLASSES) >= 10
    for cls in scenes.CLASSES:
        assert set(cls.canonical_prompt.split()) <= set(scenes.vocabulary())
        assert 3 <= len(cls.canonical_prompt.split()) <= 6
    counts = collections.Counter()
    for seed in range(300):
        m = scenes.make_mixture(seed)
        counts.update(m.classes)
        for phrase, cls, params in zip(m.phrases, m.classes, m.params):
            if cls == "clicks":  # the speed word matches the drawn rate
                words = set(phrase.split())
                if params["rate_hz"] >= 7.0:
                    assert not words & {"slow", "sparse"}
                else:
                    assert not words & {"fast", "rapid"}
    assert set(counts) == set(scenes.CLASS_NAMES)


def test_scene_classes_can_be_fixed_for_balanced_clip_sets():
    m = scenes.make_mixture(1_000_000_123, classes=("siren", "drum"), target_index=1)
    assert m.classes == ("siren", "drum") and m.target_index == 1 and m.prompt == m.phrases[1]
    with pytest.raises(ValueError, match="classes"):
        scenes.make_mixture(1, classes=("siren", "siren"))
    with pytest.raises(ValueError, match="target_index"):
        scenes.make_mixture(1, classes=("siren", "drum"), target_index=2)


def test_seed_ranges_are_disjoint():
    assert scenes.TRAIN_SEEDS.stop <= scenes.EVAL_SEEDS.start
    assert scenes.eval_seeds(3) == [scenes.EVAL_SEEDS.start + i for i in range(3)]


# -------------------------------------------------------------------------------------------- the model
def test_small_model_sizes():
    model = build_small_model()
    cfg = model.config
    assert cfg.n_layers >= 8 and cfg.head_dim == 64 and 192 <= cfg.dim <= 256
    assert model.audio_codec.frame_rate <= 50
    assert cfg.latent_dim == model.audio_codec.latent_dim
    assert len(model.transformer.layers) == cfg.n_layers
    assert all(k.startswith(("proj.", "memory_proj.", "transformer.", "text_encoder."))
               for k in model.state_dict())


def test_small_config_rejects_mismatched_parts():
    cfg = copy.deepcopy(DEFAULT_SMALL_CONFIG)
    cfg["model"]["latent_dim"] = 64
    with pytest.raises(ValueError, match="latent_dim"):
        build_small_model(cfg)
    cfg = copy.deepcopy(DEFAULT_SMALL_CONFIG)
    cfg["codec"]["type"] = "wavelet"
    with pytest.raises(ValueError, match="type"):
        build_small_model(cfg)


# ------------------------------------------------------------------------------------------ shipped weights
def test_shipped_small_model_loads_and_separates():
    from latentflow_fast import load_model
    from latentflow_fast.models.loading import SMALL_DIR

    assert (SMALL_DIR / "model.safetensors").stat().st_size <= 40 * 2**20  # the size the project allows
    model = load_model("small")
    assert model.config.n_layers == 8 and model.config.head_dim == 64
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_small_model().parameters())
    mix = scenes.make_mixture(scenes.eval_seeds(1)[0])
    out = model.separate(torch.from_numpy(mix.mixture), mix.sample_rate, mix.prompt, steps=2)
    assert out.target.shape == (scenes.CLIP_SAMPLES,) and torch.isfinite(out.target).all()
    with pytest.raises(ValueError, match="known words"):
        model.separate(torch.from_numpy(mix.mixture), mix.sample_rate, "a purple elephant", steps=1)


def test_info_reports_the_small_models_size_and_flops():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "latentflow_fast.cli", "info", "--model", "small", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["layers"] == 8 and info["latent_frames_per_second"] == 50
    assert info["trained_clip_seconds"] == 4.0 and "siren" in info["prompt_vocabulary"]
    model = build_small_model()
    assert info["flops_per_evaluation"]["gflops"] == pytest.approx(
        model.config.flops_per_evaluation(200, info["flops_per_evaluation"]["text_tokens"]) / 1e9)


def test_flops_count_by_hand():
    from latentflow_fast.models.config import SAMAudioConfig

    cfg = SAMAudioConfig(dim=64, n_heads=1, n_layers=1, latent_dim=2, text_dim=4, ffn_exp=1.5, multiple_of=64)
    T, L, D, F = 3, 2, 64, cfg.ffn_hidden_dim
    assert F == 64
    macs = T * 12 * D + 2 * T * 3 * D * D + L * (4 * D + 3 * D * D) + 256 * D * 2 + D * D + 6 * D * D
    macs += 4 * T * D * D + 2 * T * T * D + 2 * T * D * D + 2 * L * D * D + 2 * T * L * D + 3 * T * D * F + T * D * 4
    assert cfg.flops_per_evaluation(T, L) == 2 * macs


def test_train_small_stages_chain_their_logs(tmp_path):
    """A later stage started with --init-from and --previous-log embeds the whole earlier log (with its own
    earlier stages) and sums every stage's wall time; a log of another stage is refused."""
    import importlib.util
    import json

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("train_small_script", repo / "scripts" / "train_small.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--phases", "1:0.2:2", "--warmup", "1", "--eval-every", "0", "--checkpoint-every", "1",
              "--log-every", "1", "--threads", "1", "--save-dtype", "float32"]

    def stage(name, steps, *extra):
        script.main(common + ["--steps", str(steps), "--out-dir", str(tmp_path / name),
                              "--work-dir", str(tmp_path / f"{name}_work"), *extra])
        return json.loads((tmp_path / name / "training_log.json").read_text())

    a = stage("a", 2)
    b = stage("b", 3, "--seed", "1", "--init-from", str(tmp_path / "a_work" / "checkpoint.pt"))
    c = stage("c", 2, "--seed", "2", "--init-from", str(tmp_path / "b_work" / "checkpoint.pt"),
              "--previous-log", str(tmp_path / "b" / "training_log.json"))
    # stage b's whole log (which holds a's record from its checkpoint) is embedded in c's
    assert {k: v for k, v in c["previous_stage"].items() if k not in ("init_from", "step")} == b
    assert c["previous_stage"]["previous_stage"]["step"] == a["train_config"]["steps"] == 2
    assert c["total_wall_seconds"] == pytest.approx(b["total_wall_seconds"] + c["wall_seconds"])
    assert b["total_wall_seconds"] == pytest.approx(b["previous_stage"]["wall_seconds"] + b["wall_seconds"])
    with pytest.raises(ValueError, match="previous-log"):
        stage("d", 2, "--seed", "3", "--init-from", str(tmp_path / "b_work" / "checkpoint.pt"),
              "--previous-log", str(tmp_path / "a" / "training_log.json"))
