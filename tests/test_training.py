"""The tiny-model training loop is deterministic and resumes to the same weights."""

import copy

import pytest
import torch

from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from training.flow_matching import TrainConfig, data_seeds, deterministic_torch, learning_rate, train


def _small_model():
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["codec"]["hop"] = 16
    cfg["text_encoder"]["dim"] = 8
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=1, latent_dim=16, text_dim=8)
    torch.manual_seed(0)
    return build_tiny_model(cfg)


def _cfg(**kw):
    base = dict(steps=4, phases=((0.5, 0.05, 3), (1.0, 0.1, 2)), lr=1e-3, warmup=2,
                checkpoint_every=2, log_every=2, threads=1)
    return TrainConfig(**{**base, **kw})


def test_training_is_deterministic_and_resumes_bitwise(tmp_path):
    quiet = lambda s: None  # noqa: E731
    a = _small_model()
    rec_a = train(a, _cfg(), tmp_path / "a", log=quiet)
    b = _small_model()
    train(b, _cfg(), tmp_path / "b", log=quiet)
    # interrupted after 3 steps (between two regular checkpoints), then resumed by a fresh model
    c = _small_model()
    train(c, _cfg(), tmp_path / "c", log=quiet, stop_at=3)
    d = _small_model()
    rec_d = train(d, _cfg(), tmp_path / "c", log=quiet)
    for (name, pa), pb, pd in zip(a.state_dict().items(), b.state_dict().values(), d.state_dict().values()):
        assert torch.equal(pa, pb), name
        assert torch.equal(pa, pd), name
    assert rec_a["losses"] == rec_d["losses"] and len(rec_a["losses"]) == 4


def test_resume_refuses_another_config(tmp_path):
    m = _small_model()
    train(m, _cfg(), tmp_path, log=lambda s: None, stop_at=2)
    with pytest.raises(ValueError, match="another training config"):
        train(_small_model(), _cfg(lr=5e-4), tmp_path, log=lambda s: None)


def test_schedule_and_seeds():
    cfg = TrainConfig(steps=100, phases=((0.5, 0.5, 4), (1.0, 2.0, 2)), warmup=10, lr=1e-3)
    assert cfg.phase(0) == (0.5, 4) and cfg.phase(50) == (2.0, 2)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) < 1e-4
    seen = set()
    for step in range(100):
        seeds = data_seeds(cfg, step)
        assert not seen & set(seeds)
        seen |= set(seeds)
    assert max(seen) < 10_000_000  # training seed range, disjoint from the held-out seeds
    with pytest.raises(ValueError, match="phases"):
        TrainConfig(phases=((0.5, 0.5, 4),)).validate()


def test_deterministic_block_restores_the_process_settings_even_after_an_error():
    """train() runs inside deterministic_torch: its thread count and deterministic-algorithm flags are
    scoped to the block (as found before it, warn_only included), also when the block raises."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    for found in ((False, False), (True, True)):
        torch.use_deterministic_algorithms(found[0], warn_only=found[1])
        try:
            with pytest.raises(RuntimeError, match="inside"):
                with deterministic_torch(1):
                    assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
                    raise RuntimeError("inside")
            assert torch.get_num_threads() == before[0]
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == found
        finally:
            torch.use_deterministic_algorithms(before[1], warn_only=before[2])
