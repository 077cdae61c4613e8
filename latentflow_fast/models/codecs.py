"""Audio codecs behind one interface: waveform [B, S] <-> latent frames [B, T, C]."""

from __future__ import annotations

import abc

import torch
import torch.nn as nn


class AudioCodec(nn.Module, abc.ABC):
    """encode(wave [B, S] float) -> latent [B, T, C]; decode(latent [B, T, C]) -> wave [B, S'].

    T = ceil(S / hop_length) frames (codecs pad the tail); S' = T * hop_length.
    `hop_length` = samples per latent frame, `frame_rate` = frames per second
    (SAM Audio's DAC-VAE: hop 1920 at 48 kHz -> 25 frames/s, 128 channels).
    """

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int: ...

    @property
    @abc.abstractmethod
    def hop_length(self) -> int:
        """Samples per latent frame."""

    @property
    @abc.abstractmethod
    def latent_dim(self) -> int: ...

    @property
    def frame_rate(self) -> float:
        """Latent frames per second."""
        return self.sample_rate / self.hop_length

    @abc.abstractmethod
    def encode(self, wave: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.hop_length)


def __getattr__(name):  # DACVAE lives in its own module; keep `from .codecs import DACVAE` working lazily
    if name == "DACVAE":
        from .dacvae import DACVAE

        return DACVAE
    raise AttributeError(name)
