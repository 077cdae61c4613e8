"""Small SAM-Audio-architecture models and a trivial codec for fast CPU tests."""

import torch

from latentflow_fast.models import AudioCodec, PrecomputedTextEncoder, SAMAudio, SAMAudioConfig


class FramingCodec(AudioCodec):
    """Exactly invertible toy codec: non-overlapping frames of `hop` samples are the latent vectors."""

    def __init__(self, sample_rate: int = 8000, hop: int = 16):
        super().__init__()
        self._sr, self._hop = sample_rate, hop

    @property
    def sample_rate(self):
        return self._sr

    @property
    def hop_length(self):
        return self._hop

    @property
    def latent_dim(self):
        return self._hop

    def encode(self, wave):
        pad = (-wave.shape[-1]) % self._hop
        wave = torch.nn.functional.pad(wave, (0, pad))
        return wave.reshape(wave.shape[0], -1, self._hop)

    def decode(self, latent):
        return latent.reshape(latent.shape[0], -1)


def small_config(**overrides) -> SAMAudioConfig:
    cfg = dict(dim=32, n_heads=4, n_layers=2, latent_dim=16, text_dim=8, multiple_of=16)
    cfg.update(overrides)
    return SAMAudioConfig(**cfg)


def small_model(seed: int = 0, with_codec: bool = True, **overrides) -> SAMAudio:
    torch.manual_seed(seed)
    cfg = small_config(**overrides)
    g = torch.Generator().manual_seed(seed + 1)
    table = {"dog": torch.randn(2, cfg.text_dim, generator=g), "car horn": torch.randn(3, cfg.text_dim, generator=g)}
    codec = FramingCodec(8000, cfg.latent_dim) if with_codec else None
    text = PrecomputedTextEncoder(table) if with_codec else None
    model = SAMAudio(cfg, audio_codec=codec, text_encoder=text).eval()
    # the gates of the optional paths start at 0 (inactive); open them so tests see them act
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.numel() == 1:
                p.fill_(0.5)
    return model


def random_inputs(model: SAMAudio, B: int = 2, T: int = 7, L: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = model.config.latent_dim
    noisy = torch.randn(B, T, 2 * C, generator=g)
    mixture = torch.randn(B, T, C, generator=g)
    memory = torch.randn(B, L, model.config.text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[-1, L - 2:] = False
    time = torch.rand(B, generator=g)
    return noisy, time, mixture, memory, mask
