"""MDCTCodec: a critically sampled, exactly invertible lapped transform (the `small` model's codec).

Frames of 2 * hop samples with 50% overlap, a sine window and an orthonormal MDCT (type-IV DCT of the
folded frame). The window satisfies the Princen-Bradley condition, so the time-domain aliasing of
neighbouring frames cancels on overlap-add (TDAC) and decode(encode(x)) == x up to float rounding.

Framing is circular: frame t covers samples [t*hop - hop/2, t*hop + 3*hop/2) of the clip taken as
periodic, so T = ceil(S / hop) frames (the codec interface's count), frame t is centred on the
middle of [t*hop, (t+1)*hop), and every sample lies in exactly two frames. The first and last frames
therefore also see hop/2 samples of the other end of the clip, weighted by the window's tail.

``bins`` keeps only the lowest MDCT bins (the latent's channels): at hop 320 and 16 kHz the bins are
25 Hz wide, so ``bins=80`` is a 0-2 kHz latent of 80 channels at 50 frames per second (SAM Audio: 128
channels at 25 frames per second from a learned DAC-VAE). The round trip is then exact for content below
about 1.9 kHz and drops what lies above 2 kHz. Why fewer channels than samples per hop: the DiT predicts
2C values per frame through a Linear(D, 2C), so for a model of width D the output only spans all of them
when 2C <= D, and its input projection squeezes 3C values (noisy state and mixture) into D.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .codecs import AudioCodec


def mdct_basis(hop: int) -> torch.Tensor:
    """Windowed orthonormal MDCT basis [2*hop, hop] (float64): coefficients = frame @ basis."""
    n = np.arange(2 * hop)[:, None]
    k = np.arange(hop)[None, :]
    window = np.sin(np.pi * (n + 0.5) / (2 * hop))
    basis = math.sqrt(2.0 / hop) * window * np.cos(np.pi / hop * (n + 0.5 + hop / 2) * (k + 0.5))
    return torch.from_numpy(basis)


class MDCTCodec(AudioCodec):
    """wave [B, S] <-> latent [B, T, bins], T = max(2, ceil(S / hop)); latent = scale * MDCT coefficients.

    ``scale`` (default 10) brings sources at RMS ~0.1 to coefficients of ~unit variance (the transform is
    orthonormal, so it preserves energy). Tails shorter than a hop are zero-padded; clips shorter than two
    hops are padded to two (one circular frame would alias onto itself). The basis is a float64 attribute
    cast per call: the codec adds no state-dict keys.
    """

    def __init__(self, sample_rate: int = 16_000, hop: int = 320, scale: float = 10.0, bins: int | None = None):
        super().__init__()
        if isinstance(hop, bool) or not isinstance(hop, int) or hop < 2 or hop % 2:
            raise ValueError(f"hop must be an even int >= 2, got {hop!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if bins is None:
            bins = hop
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= hop:
            raise ValueError(f"bins must be an int in [1, hop={hop}], got {bins!r}")
        self.hop = hop
        self.bins = bins
        self.scale = float(scale)
        self._sample_rate = sample_rate
        self._basis64 = mdct_basis(hop)
        self._basis_cache: dict = {}

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def hop_length(self) -> int:
        return self.hop

    @property
    def latent_dim(self) -> int:
        return self.bins

    @property
    def bandwidth_hz(self) -> float:
        """Upper edge of the kept bins."""
        return self.bins * self._sample_rate / (2 * self.hop)

    def num_frames(self, num_samples: int) -> int:
        return max(2, -(-num_samples // self.hop))

    def basis(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._basis_cache:
            self._basis_cache[key] = self._basis64[:, : self.bins].to(device=device, dtype=dtype)
        return self._basis_cache[key]

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, S] (or [S]) -> latent [B, T, bins]."""
        if not isinstance(wave, torch.Tensor):
            raise TypeError(f"wave must be a torch.Tensor, got {type(wave).__name__}")
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2 or wave.shape[-1] == 0:
            raise ValueError(f"wave must be [B, S] with S > 0, got shape {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise TypeError(f"wave must be a floating tensor, got {wave.dtype}")
        hop, half = self.hop, self.hop // 2
        frames = self.num_frames(wave.shape[-1])
        wave = F.pad(wave, (0, frames * hop - wave.shape[-1]))
        periodic = torch.cat([wave[:, -half:], wave, wave[:, :half]], dim=1)  # [B, T*hop + hop]
        windows = periodic.unfold(1, 2 * hop, hop)  # [B, T, 2*hop]
        return (windows @ self.basis(wave.device, wave.dtype)) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, T, bins] -> wave [B, T * hop]."""
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 3 or latent.shape[-1] != self.bins or latent.shape[1] < 2:
            raise ValueError(f"latent must be [B, T >= 2, {self.bins}], got shape {tuple(latent.shape)}")
        hop, half = self.hop, self.hop // 2
        B, T, _ = latent.shape
        windows = (latent / self.scale) @ self.basis(latent.device, latent.dtype).T  # [B, T, 2*hop]
        # overlap-add: the first half of frame t and the second half of frame t-1 share hop samples
        first, second = windows[..., :hop], windows[..., hop:]
        blocks = first + torch.roll(second, shifts=1, dims=1)  # block t = periodic samples [t*hop, (t+1)*hop)
        periodic = blocks.reshape(B, T * hop)  # periodic index i <-> clip sample (i - hop/2) mod (T*hop)
        return torch.roll(periodic, shifts=-half, dims=1)
