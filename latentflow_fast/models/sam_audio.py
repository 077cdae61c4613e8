"""SAMAudio: input projection + text memory + DiT, and the end-to-end `separate()`.

Per latent frame the network sees cat(noisy x_t [2C], zeros [2C], mixture latent duplicated [2C]) and
predicts a velocity [2C]: channels 0..C-1 the target source, C..2C-1 the residual.
Text reaches the DiT only through cross-attention: memory = memory_proj(text) + timestep_emb(t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..sampler import Evaluation, sample_ode
from .attention import AttentionRouter
from .codecs import AudioCodec
from .config import SAMAudioConfig
from .dit import DiT
from .invariant import Conv1d, Linear
from .text import TextEncoder


class SinusoidalEmbedding(nn.Module):
    """timestep_emb: sin/cos of t (no parameters), [B] -> [B, dim], added to every text token."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        inv_freq = torch.exp(-math.log(self.theta) * torch.arange(half).float() / half)
        args = t.float()[:, None] * inv_freq.to(t.device)[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)


class AlignModalities(nn.Module):
    """align_masked_video: x + tanh(gate) * LayerNorm(conv1x1(video [B, vision_dim, T]))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = Conv1d(in_dim, dim, kernel_size=1)
        self.layer_norm = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return x + self.gate.tanh() * self.layer_norm(self.conv(video).transpose(1, 2))


class EmbedAnchors(nn.Module):
    """embed_anchors: x + tanh(gate) * proj(embed(anchor id of each frame)); id num_anchors = padding."""

    def __init__(self, num_anchors: int, embedding_dim: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(num_anchors + 1, embedding_dim, padding_idx=num_anchors)
        self.gate = nn.Parameter(torch.zeros(1))
        self.proj = Linear(embedding_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, anchor_ids: torch.Tensor, anchor_alignment: torch.Tensor) -> torch.Tensor:
        return x + self.gate.tanh() * self.proj(self.embed(anchor_ids.gather(1, anchor_alignment)))


@dataclass
class SeparationInputs:
    """Everything one separation needs besides the network: encoded once, shared by all evaluations."""

    mixture: torch.Tensor  # [B, T, C] codec latent of the (mono, codec-rate) mixture
    text: Optional[torch.Tensor]  # [B, L, text_dim]
    text_mask: Optional[torch.Tensor]  # [B, L] bool, True = token
    noise: torch.Tensor  # [B, T, 2C] x0 of the ODE
    prompts: list[str]
    sample_rate: int  # the input's sample rate
    num_samples: int  # the input's length in samples
    squeeze: bool  # the input was 1-D: drop the batch dim of the outputs


@dataclass
class SeparationResult:
    target: torch.Tensor  # float32 CPU [B, S] (or [S] for 1-D input) at `sample_rate`
    residual: torch.Tensor
    sample_rate: int
    latent: Optional[torch.Tensor] = None  # [B, T, 2C] final ODE state
    noise: Optional[torch.Tensor] = None  # [B, T, 2C] initial ODE state
    trajectory: Optional[list[Evaluation]] = None  # with record=True: every network evaluation
    lsac: Optional[object] = None  # with lsac=...: latentflow_fast.lsac.CacheStats (calls computed / skipped)


class SAMAudio(nn.Module):
    def __init__(self, config: SAMAudioConfig, audio_codec: Optional[AudioCodec] = None,
                 text_encoder: Optional[TextEncoder] = None):
        super().__init__()
        if not isinstance(config, SAMAudioConfig):
            raise TypeError(f"config must be a SAMAudioConfig, got {type(config).__name__}")
        self.config = config
        D = config.dim
        self.proj = Linear(config.in_channels, D)
        self.memory_proj = Linear(config.text_dim, D)
        self.timestep_emb = SinusoidalEmbedding(D)
        self.transformer = DiT(config)
        self.align_masked_video = AlignModalities(config.vision_dim, D) if config.vision_dim else None
        self.embed_anchors = (EmbedAnchors(config.num_anchors, config.anchor_embedding_dim, D)
                              if config.num_anchors else None)
        self.audio_codec = audio_codec
        self.text_encoder = text_encoder

    @property
    def attention_router(self) -> AttentionRouter:
        return self.transformer.attention_router

    def network_modules(self) -> list:
        """The modules `forward` runs (not the codec or the text encoder, which run in `prepare` / `decode`)."""
        return [m for name, m in self.named_children() if name not in ("audio_codec", "text_encoder")]

    # ------------------------------------------------------------------ network
    def embed_inputs(self, noisy: torch.Tensor, mixture: torch.Tensor,
                     video_features: Optional[torch.Tensor] = None,
                     anchor_ids: Optional[torch.Tensor] = None,
                     anchor_alignment: Optional[torch.Tensor] = None,
                     padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """proj(cat(noisy, zeros, mixture duplicated)) plus the video / anchor paths -> [B, T, D].

        When the model has these paths and nothing is given, SAM Audio's own defaults apply: all-zero
        video features [B, vision_dim, T] and the "<null>" anchor (id 0) on every valid frame (padded
        frames point to the padding anchor, whose embedding is zero).
        """
        B, T, _ = noisy.shape
        features = torch.cat([mixture, mixture], dim=2)
        x = self.proj(torch.cat([noisy, torch.zeros_like(features), features], dim=2))
        if self.align_masked_video is not None:
            if video_features is None:
                video_features = x.new_zeros(B, self.config.vision_dim, T)
            x = self.align_masked_video(x, video_features)
        elif video_features is not None:
            raise ValueError("video_features: this model has no align_masked_video path")
        if self.embed_anchors is not None:
            if anchor_ids is None:
                anchor_ids = torch.tensor([[0, self.config.num_anchors]], device=x.device).expand(B, 2)
                anchor_alignment = torch.zeros(B, T, dtype=torch.long, device=x.device)
                if padding_mask is not None:
                    anchor_alignment[~padding_mask] = 1
            elif anchor_alignment is None:
                raise ValueError("anchor_alignment: required with anchor_ids")
            x = self.embed_anchors(x, anchor_ids, anchor_alignment)
        elif anchor_ids is not None:
            raise ValueError("anchor_ids: this model has no embed_anchors path")
        return x

    def forward(self, noisy: torch.Tensor, time: Union[torch.Tensor, float], mixture: torch.Tensor,
                memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None,
                video_features: Optional[torch.Tensor] = None,
                anchor_ids: Optional[torch.Tensor] = None,
                anchor_alignment: Optional[torch.Tensor] = None,
                start_layer: int = 0, hidden: Optional[torch.Tensor] = None,
                layer_inputs: Optional[list] = None) -> torch.Tensor:
        """One network evaluation.

        noisy [B, T, 2C] state x_t; time [B] (or a float) in [0, 1]; mixture [B, T, C] codec latent;
        memory [B, L, text_dim] text features (None: time embedding only); memory_mask [B, L] bool
        True = valid; padding_mask [B, T] bool True = valid frame. Returns the velocity [B, T, 2C].

        time, memory and memory_mask may also have batch 1 for a batch of rows that share them (one
        prompt, one evaluation): the conditioning is computed once and broadcast.
        Prefix reuse: ``start_layer`` = l > 0 with ``hidden`` [B, T, D], the recorded input of layer l,
        skips the input projection and layers 0..l-1 (``noisy`` and ``mixture`` are then only shape-checked).
        ``layer_inputs``: a list that receives the input of every layer that runs.
        """
        B, T, C2 = noisy.shape
        C = self.config.latent_dim
        if C2 != 2 * C or mixture.shape[1:] != (T, C) or mixture.shape[0] not in (1, B):
            raise ValueError(f"noisy must be [B, T, {2 * C}] and mixture [B or 1, T, {C}]; "
                             f"got {tuple(noisy.shape)} and {tuple(mixture.shape)}")
        if not torch.is_tensor(time):
            time = torch.tensor(float(time))
        if time.ndim == 0:
            time = time.expand(B)
        if time.ndim != 1 or time.shape[0] not in (1, B):
            raise ValueError(f"time must be a float or a tensor [B={B}] or [1], got shape {tuple(time.shape)}")
        time = time.to(device=noisy.device, dtype=torch.float32)
        if start_layer > 0:
            if hidden is None or hidden.shape != (B, T, self.config.dim):
                raise ValueError(f"hidden must be [B={B}, T={T}, {self.config.dim}] with start_layer > 0")
            x = None
            dtype = hidden.dtype
        else:
            if mixture.shape[0] != B:
                mixture = mixture.expand(B, -1, -1)
            x = self.embed_inputs(noisy, mixture, video_features, anchor_ids, anchor_alignment, padding_mask)
            dtype = x.dtype
        t_emb = self.timestep_emb(time)[:, None].to(dtype)  # [B or 1, 1, D]
        if memory is None:
            if memory_mask is not None:
                raise ValueError("memory_mask given without memory")
            memory = t_emb
        else:
            memory = self.memory_proj(memory) + t_emb
        return self.transformer(x, time, memory, memory_mask=memory_mask, padding_mask=padding_mask,
                                start_layer=start_layer, hidden=hidden, layer_inputs=layer_inputs)

    # ------------------------------------------------------------------ separation pipeline
    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    def _require_codec(self) -> AudioCodec:
        if self.audio_codec is None:
            raise RuntimeError("this model has no audio_codec attached; pass one to SAMAudio(...)")
        return self.audio_codec

    @torch.no_grad()
    def prepare(self, audio, sample_rate: int, prompt: Union[str, Sequence[str]], seed: int = 0) -> SeparationInputs:
        """Validate, downmix, resample and encode the audio; encode the prompts; draw the seeded noise.

        audio: [samples] (mono), [batch, samples] (mono batch) or [batch, channels, samples] (averaged to
        mono); torch tensor or numpy array of floats. prompt: one str (used for every row) or a list of
        str with one entry per row.
        """
        codec = self._require_codec()
        if self.text_encoder is None:
            raise RuntimeError("this model has no text_encoder attached; pass one to SAMAudio(...)")
        wave, squeeze = _check_audio(audio)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        sample_rate = int(sample_rate)
        prompts = _check_prompt(prompt, wave.shape[0])
        if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        num_samples = wave.shape[-1]
        codec_wave = _resample(wave, sample_rate, codec.sample_rate)
        if codec_wave.shape[-1] < codec.hop_length:
            raise ValueError(
                f"audio is shorter than one codec frame: {num_samples} samples at {sample_rate} Hz "
                f"< {codec.hop_length} samples at {codec.sample_rate} Hz"
            )
        mixture = codec.encode(codec_wave.to(self.device, _dtype_of(codec)))
        if mixture.ndim != 3 or mixture.shape[-1] != self.config.latent_dim:
            raise RuntimeError(f"codec returned latent {tuple(mixture.shape)}, expected [B, T, {self.config.latent_dim}]")
        text, text_mask = self.text_encoder(prompts)
        B, T, C = mixture.shape
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((B, T, 2 * C), generator=generator, dtype=torch.float32)
        return SeparationInputs(
            mixture=mixture.to(self.dtype), text=text.to(self.device, self.dtype),
            text_mask=text_mask.to(self.device), noise=noise.to(self.device, self.dtype),
            prompts=prompts, sample_rate=sample_rate, num_samples=num_samples, squeeze=squeeze,
        )

    def velocity_fn(self, inputs: SeparationInputs):
        """The ODE right-hand side for one prepared separation: fn(state, t: float, evaluation) -> velocity."""

        from ..numerics import check_finite, first_nonfinite_module

        def fn(state: torch.Tensor, t: float, evaluation: int) -> torch.Tensor:
            time = torch.full((state.shape[0],), t, dtype=torch.float32, device=state.device)
            v = self(state, time, inputs.mixture, inputs.text, inputs.text_mask)
            return check_finite(v, f"velocity at evaluation {evaluation} (t={t:.4f})", where=lambda: first_nonfinite_module(
                self, lambda: self(state, time, inputs.mixture, inputs.text, inputs.text_mask)))

        return fn

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, inputs: SeparationInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Final state [B, T, 2C] -> (target, residual) float32 CPU waveforms at the input's rate and length."""
        from ..numerics import check_finite

        codec = self._require_codec()
        C = self.config.latent_dim
        B = latent.shape[0]
        check_finite(latent, "final latent")
        waves = codec.decode(torch.cat([latent[..., :C], latent[..., C:]], dim=0).to(_dtype_of(codec)))  # [2B, S']
        waves = _resample(waves.float().cpu(), codec.sample_rate, inputs.sample_rate)
        n = inputs.num_samples
        if waves.shape[-1] < n:
            waves = torch.nn.functional.pad(waves, (0, n - waves.shape[-1]))
        waves = waves[..., :n]
        check_finite(waves, "decoded waveform")
        target, residual = waves[:B], waves[B:]
        if inputs.squeeze:
            target, residual = target[0], residual[0]
        return target, residual

    @torch.no_grad()
    def separate(self, audio, sample_rate: int, prompt: Union[str, Sequence[str]], steps: int = 16,
                 method: str = "midpoint", seed: int = 0, record: bool = False, lsac=None) -> SeparationResult:
        """Separate the prompted source from `audio`; see `prepare` for the accepted shapes.

        Deterministic: the noise comes from a CPU torch.Generator seeded with `seed` (float32), so two
        calls with the same arguments give bitwise equal results on the same device.
        lsac: a `latentflow_fast.lsac.LSACConfig` turns on Layer-Selective Attention Caching (see that module).
        """
        inputs = self.prepare(audio, sample_rate, prompt, seed)
        stats = None
        if lsac is None:
            result = sample_ode(self.velocity_fn(inputs), inputs.noise, steps=steps, method=method, record=record)
        else:
            from ..lsac import sample_with_lsac

            result, stats = sample_with_lsac(self, inputs, lsac, steps=steps, method=method, record=record)
        target, residual = self.decode(result.final, inputs)
        return SeparationResult(target=target, residual=residual, sample_rate=inputs.sample_rate,
                                latent=result.final, noise=inputs.noise, trajectory=result.trajectory,
                                lsac=stats)


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype a module computes in (float32 for modules without parameters)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_audio(audio) -> tuple[torch.Tensor, bool]:
    """-> (mono float32 CPU wave [B, S], input was 1-D)."""
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor or numpy array, got {type(audio).__name__}")
    if not audio.is_floating_point():
        raise TypeError(f"audio must hold floats, got {audio.dtype}")
    if audio.ndim not in (1, 2, 3):
        raise ValueError(f"audio must be [samples], [batch, samples] or [batch, channels, samples]; "
                         f"got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise ValueError(f"audio is empty (shape {tuple(audio.shape)})")
    wave = audio.detach().to("cpu", torch.float32)
    if not torch.isfinite(wave).all():
        raise ValueError("audio contains NaN or Inf values")
    squeeze = wave.ndim == 1
    if wave.ndim == 1:
        wave = wave[None]
    elif wave.ndim == 3:
        wave = wave.mean(dim=1)  # stereo / multichannel -> mono
    return wave.contiguous(), squeeze


def _check_prompt(prompt, batch: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * batch
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if len(prompt) != batch:
        raise ValueError(f"prompt has {len(prompt)} entries but audio has batch {batch}")
    return list(prompt)


def _resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    if orig == new:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, orig, new)
