"""DAC-VAE, the codec of SAM Audio (48 kHz mono, hop 1920, 128-channel latent), written after the
layout of facebookresearch/dacvae as SAM Audio wraps it (`audio_codec.{encoder,quantizer,decoder}.*`).

Encoder: conv -> 4 strided blocks of dilated residual units with Snake activations -> conv; the VAE
bottleneck's `in_proj` gives (mean, scale) and SAM Audio uses the mean as the latent. Decoder: `out_proj`,
conv, 4 transposed-conv blocks, then the built-in watermarker, whose first layers also produce the waveform.
Weight-normalised convolutions keep the `weight_g` / `weight_v` parameters of torch's legacy weight_norm.

Unverified against real weights (none can be fetched here): key names and shapes follow the public code.
Deviation: the watermark message is a fixed bit vector (default all zeros) instead of random bits per call,
so decoding is deterministic.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codecs import AudioCodec


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class _PaddedConvMixin:
    """Weight norm as parameters weight_g / weight_v (dim 0), and the 'auto' (causal) padding rule."""

    def _setup(self, weight_norm: bool, causal: bool, auto_pad: bool):
        self.causal, self.auto_pad, self.weight_norm = causal, auto_pad, weight_norm
        if weight_norm:
            w = self.weight.detach()
            del self.weight
            self.weight_g = nn.Parameter(torch.norm_except_dim(w, 2, 0))
            self.weight_v = nn.Parameter(w.clone())

    def current_weight(self) -> torch.Tensor:
        if self.weight_norm:
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        return self.weight


class Conv(_PaddedConvMixin, nn.Conv1d):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 weight_norm: bool = True, causal: bool = False, auto_pad: bool = False):
        pad = 0 if auto_pad else (kernel - stride) * dilation // 2
        nn.Conv1d.__init__(self, cin, cout, kernel, stride=stride, padding=pad, dilation=dilation)
        self._setup(weight_norm, causal, auto_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.auto_pad:
            k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
            eff = (k - 1) * d + 1
            total = eff - s
            frames = (x.shape[-1] - eff + total) / s + 1
            extra = (math.ceil(frames) - 1) * s + (k - total) - x.shape[-1]
            if self.causal:
                x = F.pad(x, (total, extra))
            else:
                right = extra // 2
                x = F.pad(x, (total - right, right + extra))
        return self._conv_forward(x, self.current_weight(), self.bias)


class ConvTranspose(_PaddedConvMixin, nn.ConvTranspose1d):
    def __init__(self, cin: int, cout: int, stride: int, weight_norm: bool = True, causal: bool = False,
                 auto_pad: bool = False):
        pad, out_pad = (0, 0) if auto_pad else ((stride + 1) // 2, stride % 2)
        nn.ConvTranspose1d.__init__(self, cin, cout, 2 * stride, stride=stride, padding=pad, output_padding=out_pad)
        self._setup(weight_norm, causal, auto_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.current_weight(), self.bias, self.stride, self.padding,
                               self.output_padding, self.groups, self.dilation)
        if self.auto_pad:
            total = self.kernel_size[0] - self.stride[0]
            if self.causal:
                y = y[..., : y.shape[-1] - total]
            else:
                right = total // 2
                y = y[..., total - right: y.shape[-1] - right]
        return y


class ResidualUnit(nn.Module):
    """Snake flavour: Snake, conv k (dilated, weight-normed), Snake, conv 1. ELU flavour (watermark path):
    ELU, causal conv k to dim/compress, ELU, causal conv 1 back, no weight norm."""

    def __init__(self, dim: int, kernel: int = 7, dilation: int = 1, elu: bool = False, compress: int = 1):
        super().__init__()
        hidden = dim // compress
        act = (lambda c: nn.ELU(1.0)) if elu else Snake
        wn, causal, auto = (False, True, True) if elu else (True, False, False)
        self.block = nn.Sequential(
            act(dim), Conv(dim, hidden, kernel, dilation=dilation, weight_norm=wn, causal=causal, auto_pad=auto),
            act(dim), Conv(hidden, dim, 1, weight_norm=wn, causal=causal, auto_pad=auto),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        return y + (x[..., crop:-crop] if crop > 0 else x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(dim // 2, 7, 1), ResidualUnit(dim // 2, 7, 3), ResidualUnit(dim // 2, 7, 9),
            Snake(dim // 2), Conv(dim // 2, dim, 2 * stride, stride=stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, d_model: int, strides: Sequence[int], d_latent: int):
        super().__init__()
        layers = [Conv(1, d_model, 7)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride))
        layers += [Snake(d_model), Conv(d_model, d_latent, 3)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """`block` holds 12 layers; the decoder runs 0,1,4,5,8,9 and the watermarker the others:
    up = [7, 10, 11] (to lower rate, more channels), down = [2, 3, 6] (back to the full rate)."""

    def __init__(self, cin: int, cout: int, stride: int, wm_stride: int, factor: int = 3):
        super().__init__()
        self.block = nn.ModuleList([
            Snake(cin), ConvTranspose(cin, cout, stride),
            nn.ELU(1.0), ConvTranspose(cin // factor, cout // factor, wm_stride, weight_norm=False, causal=True,
                                       auto_pad=True),
            ResidualUnit(cout, 7, 1), ResidualUnit(cout, 7, 3),
            ResidualUnit(cout // factor, 3, elu=True, compress=2), ResidualUnit(cout // factor, 3, elu=True, compress=2),
            ResidualUnit(cout, 7, 9), nn.Identity(),
            nn.ELU(1.0), Conv(cout // factor, cin // factor, 2 * wm_stride, stride=wm_stride, weight_norm=False,
                              causal=True, auto_pad=True),
        ])

    def _run(self, x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        for i in idx:
            x = self.block[i](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, (0, 1, 4, 5, 8, 9))

    def watermark_up(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, (7, 10, 11))

    def watermark_down(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, (2, 3, 6))


class LSTMBlock(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        x = x.permute(2, 0, 1)
        y, _ = self.lstm(x)
        return (y + x).permute(1, 2, 0)


class MsgProcessor(nn.Module):
    def __init__(self, nbits: int, dim: int):
        super().__init__()
        self.nbits = nbits
        self.msg_processor = nn.Embedding(2 * nbits, dim)

    def forward(self, h: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        idx = 2 * torch.arange(msg.shape[-1], device=h.device) + msg.long()
        return h + self.msg_processor(idx).sum(dim=-2)[..., None]


class WatermarkEncoderBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, channels: int, hidden: int, lstm_layers: int = 2):
        super().__init__()
        self.pre = nn.Sequential(Snake(in_dim), Conv(in_dim, 1, 7), nn.Tanh(),
                                 Conv(1, channels, 7, weight_norm=False, causal=True, auto_pad=True))
        self.post = nn.Sequential(LSTMBlock(hidden, lstm_layers), nn.ELU(1.0),
                                  Conv(hidden, out_dim, 7, weight_norm=False, causal=True, auto_pad=True))


class WatermarkDecoderBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, channels: int, hidden: int, lstm_layers: int = 2):
        super().__init__()
        self.pre = nn.Sequential(Conv(in_dim, hidden, 7, weight_norm=False, causal=True, auto_pad=True),
                                 LSTMBlock(hidden, lstm_layers))
        self.post = nn.Sequential(nn.ELU(1.0), Conv(channels, out_dim, 7, weight_norm=False, causal=True,
                                                    auto_pad=True))


class Watermarker(nn.Module):
    def __init__(self, dim: int, channels: int, hidden: int, d_latent: int = 128, nbits: int = 16):
        super().__init__()
        self.encoder_block = WatermarkEncoderBlock(dim, d_latent, channels, hidden)
        self.msg_processor = MsgProcessor(nbits, d_latent)
        self.decoder_block = WatermarkDecoderBlock(d_latent, 1, channels, hidden)


class Decoder(nn.Module):
    def __init__(self, d_latent: int, channels: int, rates: Sequence[int], wm_rates: Sequence[int]):
        super().__init__()
        layers = [Conv(d_latent, channels, 7)]
        for i, (rate, wm_rate) in enumerate(zip(rates, wm_rates)):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), rate, wm_rate))
        self.model = nn.ModuleList(layers)
        out_dim = channels // 2 ** len(rates)
        self.wm_model = Watermarker(out_dim, out_dim // 3, channels // 3)
        self.alpha = (out_dim // 3) / 128  # wm_channels / d_latent

    def forward(self, x: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        for layer in self.model:
            x = layer(x)
        wm = self.wm_model
        h = wm.encoder_block.pre(x)
        for block in reversed(self.model[1:]):
            h = block.watermark_up(h)
        h = wm.encoder_block.post(h)
        h = wm.msg_processor(h, message.to(h.device).expand(x.shape[0], -1))
        h = wm.decoder_block.pre(h)
        for block in self.model[1:]:
            h = block.watermark_down(h)
        h = wm.decoder_block.post(h)
        audio = wm.encoder_block.pre[:3](x)  # Snake, conv to 1 channel, tanh: the waveform
        return audio + self.alpha * h


class VAEBottleneck(nn.Module):
    def __init__(self, dim: int, latent_dim: int):
        super().__init__()
        self.in_proj = Conv(dim, 2 * latent_dim, 1)
        self.out_proj = Conv(latent_dim, dim, 1)


class DACVAE(AudioCodec):
    """SAM Audio's codec. encode: wave [B, S] at 48 kHz -> mean latent [B, ceil(S / 1920), 128];
    decode: latent [B, T, 128] -> wave [B, T * 1920]."""

    def __init__(self, encoder_dim: int = 64, encoder_rates: Sequence[int] = (2, 8, 10, 12), latent_dim: int = 1024,
                 decoder_dim: int = 1536, decoder_rates: Sequence[int] = (12, 10, 8, 2), codebook_dim: int = 128,
                 sample_rate: int = 48_000, wm_rates: Sequence[int] = (8, 5, 4, 2),
                 watermark_message: Optional[Sequence[int]] = None, **unused):
        super().__init__()
        unknown = set(unused) - {"n_codebooks", "codebook_size", "quantizer_dropout", "mean", "std"}
        if unknown:
            raise ValueError(f"DACVAE: unknown config fields {sorted(unknown)}")
        self._sample_rate = int(sample_rate)
        self._hop = int(math.prod(encoder_rates))
        self._latent_dim = int(codebook_dim)
        self.encoder = Encoder(encoder_dim, encoder_rates, latent_dim)
        self.quantizer = VAEBottleneck(latent_dim, codebook_dim)
        self.decoder = Decoder(latent_dim, decoder_dim, decoder_rates, wm_rates)
        bits = (0,) * 16 if watermark_message is None else tuple(int(b) for b in watermark_message)
        if len(bits) != 16 or not set(bits) <= {0, 1}:
            raise ValueError("watermark_message must be 16 bits (0 or 1)")
        self.watermark_message = bits  # plain tuple: no buffer, nothing to initialise on the meta device

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def hop_length(self) -> int:
        return self._hop

    @property
    def latent_dim(self) -> int:
        return self._latent_dim

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        rest = wave.shape[-1] % self._hop
        if rest:  # SAM Audio pads the tail to a whole frame by reflection
            wave = F.pad(wave, (0, self._hop - rest), mode="reflect")
        z = self.encoder(wave[:, None])
        mean, _ = self.quantizer.in_proj(z).chunk(2, dim=1)
        return mean.transpose(1, 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        emb = self.quantizer.out_proj(latent.transpose(1, 2))
        message = torch.tensor(self.watermark_message, dtype=torch.float32, device=emb.device)[None]
        return self.decoder(emb, message)[:, 0]
