"""Separation quality metrics, batched over leading dimensions.

All functions accept torch tensors or numpy arrays with time on the last axis and broadcast the
leading (batch) axes. SI-SDR is computed in float64 after removing the mean of each signal
(Le Roux et al., 2019: "SDR - half-baked or well done?").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_EPS = 1e-12


def _as_tensor(x, name: str, dtype=torch.float64) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (time) axis, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real")
    return x.to(dtype)


def _check_same_length(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{names} must have the same length, got {a.shape[-1]} and {b.shape[-1]}")


def si_sdr(estimate, reference, zero_mean: bool = True) -> torch.Tensor:
    """Scale-invariant SDR in dB, ``[...]`` for inputs ``[..., S]`` (float64).

    SI-SDR = 10 log10(|a r|^2 / |a r - e|^2) with a = <e, r> / |r|^2.
    """
    est = _as_tensor(estimate, "estimate")
    ref = _as_tensor(reference, "reference")
    _check_same_length(est, ref, "estimate and reference")
    if zero_mean:
        est = est - est.mean(dim=-1, keepdim=True)
        ref = ref - ref.mean(dim=-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / ((ref * ref).sum(-1, keepdim=True) + _EPS)
    projection = alpha * ref
    noise = projection - est
    num = (projection * projection).sum(-1)
    den = (noise * noise).sum(-1)
    return 10.0 * torch.log10((num + _EPS) / (den + _EPS))


def si_sdr_improvement(estimate, reference, mixture) -> torch.Tensor:
    """SI-SDR(estimate, reference) - SI-SDR(mixture, reference), in dB."""
    return si_sdr(estimate, reference) - si_sdr(mixture, reference)


def identity_correct(estimate, sources, target_index) -> torch.Tensor:
    """True where the estimate has a higher SI-SDR to the prompted source than to every other.

    ``estimate`` [S] or [B, S]; ``sources`` [N, S] or [B, N, S] (or a list of per-item [N_b, S]
    arrays for mixtures with different source counts); ``target_index`` int or [B].
    Returns a bool tensor of shape [] or [B].
    """
    if isinstance(sources, (list, tuple)):
        est = _as_tensor(estimate, "estimate")
        if est.dim() != 2 or len(sources) != est.shape[0]:
            raise ValueError("with a list of sources, estimate must be [B, S] with B == len(sources)")
        idx = _target_indices(target_index, len(sources))
        return torch.stack([identity_correct(est[b], sources[b], int(idx[b])) for b in range(len(sources))])
    est = _as_tensor(estimate, "estimate")
    src = _as_tensor(sources, "sources")
    if src.dim() != est.dim() + 1:
        raise ValueError(
            f"sources must have one more axis than estimate, got {tuple(src.shape)} and {tuple(est.shape)}"
        )
    scores = si_sdr(est.unsqueeze(-2), src)  # [..., N]
    n = scores.shape[-1]
    idx = _target_indices(target_index, est.shape[0] if est.dim() == 2 else None)
    if est.dim() == 1:
        idx = idx.reshape(())
    if bool(((idx < 0) | (idx >= n)).any()):
        raise ValueError(f"target_index must be in [0, {n}), got {idx.tolist()}")
    target_score = scores.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    others = scores.clone()
    others.scatter_(-1, idx.unsqueeze(-1), float("-inf"))
    return target_score > others.max(dim=-1).values


def _target_indices(target_index, batch: int | None) -> torch.Tensor:
    if isinstance(target_index, (int, np.integer)) and not isinstance(target_index, bool):
        idx = torch.tensor([int(target_index)])
        return idx.expand(batch) if batch is not None else idx
    idx = torch.as_tensor(np.asarray(target_index), dtype=torch.long).reshape(-1)
    if batch is not None and idx.numel() != batch:
        raise ValueError(f"target_index must have {batch} entries, got {idx.numel()}")
    return idx


def _flatten(a, b, names: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    x = _as_tensor(a, names.split(" and ")[0], torch.float32)
    y = _as_tensor(b, names.split(" and ")[1], torch.float32)
    _check_same_length(x, y, names)
    x, y = torch.broadcast_tensors(x, y)
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), lead


def multi_resolution_stft_distance(
    a, b, fft_sizes: Sequence[int] = (256, 512, 1024), eps: float = 1e-7
) -> torch.Tensor:
    """Multi-resolution STFT distance, ``[...]`` for inputs ``[..., S]``.

    Per resolution (Hann window, hop = n_fft / 4): spectral convergence
    ||A| - |B||_F / ||B||_F plus mean |log|A| - log|B||; averaged over resolutions.
    ``b`` is the reference. Zero for identical inputs.
    """
    x, y, lead = _flatten(a, b, "a and b")
    if not fft_sizes:
        raise ValueError("fft_sizes must not be empty")
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for n_fft in fft_sizes:
        if n_fft < 2:
            raise ValueError(f"fft_sizes must be >= 2, got {n_fft}")
        window = torch.hann_window(n_fft, dtype=torch.float32)
        kw = dict(n_fft=n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
        mx = torch.stft(x, **kw).abs().double()
        my = torch.stft(y, **kw).abs().double()
        sc = torch.linalg.vector_norm(mx - my, dim=(-2, -1)) / (torch.linalg.vector_norm(my, dim=(-2, -1)) + eps)
        log_l1 = (torch.log(mx + eps) - torch.log(my + eps)).abs().mean(dim=(-2, -1))
        total += sc + log_l1
    return (total / len(fft_sizes)).reshape(lead)


_MEL_CACHE: dict = {}


def log_mel_distance(
    a, b, sample_rate: int = 16_000, n_fft: int = 1024, hop_length: int = 256, n_mels: int = 64,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Mean absolute difference of log mel spectrograms (torchaudio), ``[...]`` for ``[..., S]``."""
    import torchaudio  # local: keeps `import latentflow_fast.metrics` light

    x, y, lead = _flatten(a, b, "a and b")
    key = (sample_rate, n_fft, hop_length, n_mels)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=2.0
        )
    mel = _MEL_CACHE[key]
    lx = torch.log(mel(x).double() + eps)
    ly = torch.log(mel(y).double() + eps)
    return (lx - ly).abs().mean(dim=(-2, -1)).reshape(lead)
