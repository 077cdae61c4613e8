"""The protocol's clips: a fixed seeded set of held-out synthetic mixtures, or the user's audio files.

Default set (`default_clips`)
-----------------------------
* Seeds are scanned in order from ``EVAL_SEEDS.start + config.clip_seed_offset``; a mixture is kept while
  its source count still has room, so the set holds ``ceil(n/2)`` 2-source and ``floor(n/2)`` 3-source
  mixtures (the first ones found). Same config -> same clips.
* Data: the generator the model was trained on (`data.dataset_for`): the small model's 4 s phrase-prompted
  scenes, or the tiny model's 2 s clips (also without a model).
* Counterfactual prompt (P1): the prompt (scenes: the phrase; tiny data: the class) of the source that
  follows the target in the mixture's source order, ``(target_index + 1) % n_sources`` -- always another
  source present in the same mix.
* Groups (acoustic complexity): ``group`` = "2 sources" / "3 sources"; ``meta["gain_group"]`` =
  "gain spread < 6 dB" / "gain spread >= 6 dB" (spread = max - min source gain, from [-6, +6] dB draws;
  6 dB is half the possible range, a fixed rule, not a data-dependent median).
* ``active_frames``: latent frames whose centre time lies inside the target's active interval.

User files (`clips_from_files`)
-------------------------------
Audio read with soundfile (downmixed to mono). There are no stems: metrics that need the reference
sources (SI-SDR margins, identity, boundary sharpness of the reference) are NaN, and the semantic effect
falls back to the waveform projection between the clean and counterfactual outputs (see effects.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..data import dataset_for, synthetic
from ..probe import Clip
from .base import ProtocolClip

GAIN_SPREAD_SPLIT_DB = 6.0
MAX_SEED_SCAN = 100_000


def codec_frame_geometry(model=None) -> tuple[int, int]:
    """(hop_length, codec sample rate) of the model's codec; the tiny codec's (64, 16000) without a model."""
    if model is None:
        return 64, 16_000
    codec = model.audio_codec
    return int(codec.hop_length), int(codec.sample_rate)


def active_frames(interval: tuple[int, int], num_samples: int, sample_rate: int, model=None) -> torch.Tensor:
    """bool [T]: latent frames (of the model's codec) whose centre lies in [start, end) samples."""
    hop, codec_rate = codec_frame_geometry(model)
    codec_samples = int(math.ceil(num_samples * codec_rate / sample_rate))
    num_frames = int(math.ceil(codec_samples / hop))
    centres = (torch.arange(num_frames, dtype=torch.float64) + 0.5) * hop / codec_rate  # seconds
    start, end = interval[0] / sample_rate, interval[1] / sample_rate
    return (centres >= start) & (centres < end)


def _clip_from_mixture(mix, seconds: Optional[float], model) -> ProtocolClip:
    total = mix.mixture.shape[-1]
    start, end = mix.active_intervals[mix.target_index]
    n = total if seconds is None else min(total, int(round(seconds * mix.sample_rate)))
    # A cropped window starts a quarter window before the target's onset, so the target plays in it.
    offset = min(max(start - n // 4, 0), total - n)
    window = slice(offset, offset + n)
    sources = torch.from_numpy(np.ascontiguousarray(mix.sources[:, window]))
    target = sources[mix.target_index].clone()
    residual = torch.from_numpy(np.ascontiguousarray(mix.residual[window]))
    cf_index = (mix.target_index + 1) % mix.n_sources
    interval = (min(max(start - offset, 0), n), min(max(end - offset, 0), n))
    spread = mix.complexity["gain_spread_db"]
    clip = Clip(
        clip_id=f"seed{mix.seed}",
        mixture=torch.from_numpy(np.ascontiguousarray(mix.mixture[window])),
        sample_rate=mix.sample_rate,
        prompt=mix.prompt,
        target=target,
        residual=residual,
        meta={"seed": mix.seed},
    )
    return ProtocolClip(
        clip=clip,
        sources=sources,
        classes=tuple(mix.classes),
        target_index=mix.target_index,
        counterfactual_prompt=mix.phrases[cf_index] if hasattr(mix, "phrases") else mix.classes[cf_index],
        counterfactual_index=cf_index,
        group=f"{mix.n_sources} sources",
        active_frames=active_frames(interval, n, mix.sample_rate, model),
        meta={
            "seed": mix.seed,
            "gain_spread_db": spread,
            "gain_group": "gain spread < 6 dB" if spread < GAIN_SPREAD_SPLIT_DB else "gain spread >= 6 dB",
            "target_interval": interval,
            "num_samples": n,
            "crop_offset": offset,
        },
    )


def default_clips(config, model=None, seconds: Optional[float] = None) -> list[ProtocolClip]:
    """The fixed seeded clip set of `config` (num_clips, clip_seed_offset); see the module docstring.

    model: used only for the codec frame rate of `active_frames` (tiny codec if None).
    seconds: crop every clip to `seconds` (small test configurations), from a quarter window before the
        target's onset (or the clip's end, whichever comes first); None = the full 2 s clips.
    """
    count = int(config.num_clips)
    if count < 1:
        raise ValueError(f"config.num_clips must be >= 1, got {config.num_clips}")
    if config.clip_seed_offset < 0:
        raise ValueError(f"config.clip_seed_offset must be >= 0, got {config.clip_seed_offset}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    quota = {2: (count + 1) // 2, 3: count // 2}
    chosen = []
    # the data the model was trained on: the small model's 4 s scenes, the tiny model's 2 s clips
    data = synthetic if model is None else dataset_for(model)
    seed = data.EVAL_SEEDS.start + int(config.clip_seed_offset)
    for seed in range(seed, seed + MAX_SEED_SCAN):
        mix = data.make_mixture(seed)
        if quota[mix.n_sources] > 0:
            quota[mix.n_sources] -= 1
            chosen.append(_clip_from_mixture(mix, seconds, model))
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not find enough mixtures of each source count")  # pragma: no cover


def clips_from_files(paths: Sequence, prompts: Sequence[str], counterfactual_prompts: Optional[Sequence] = None,
                     model=None) -> list[ProtocolClip]:
    """Clips from audio files (read with soundfile, downmixed to mono) with one prompt each.

    counterfactual_prompts: one per file (None entries allowed; P1/P2 skip such clips).
    No stems are known: stem-based metrics become NaN (module docstring). `model` is accepted for symmetry
    with `default_clips` and to check the prompts with its text encoder when it has one.
    """
    import soundfile as sf

    paths = [Path(p) for p in paths]
    if isinstance(prompts, str) or len(prompts) != len(paths):
        raise ValueError(f"prompts must be a list with one prompt per path ({len(paths)})")
    if counterfactual_prompts is None:
        counterfactual_prompts = [None] * len(paths)
    if isinstance(counterfactual_prompts, str) or len(counterfactual_prompts) != len(paths):
        raise ValueError(f"counterfactual_prompts must be a list with one entry per path ({len(paths)})")
    encoder = getattr(model, "text_encoder", None)
    clips = []
    for index, (path, prompt, cf) in enumerate(zip(paths, prompts, counterfactual_prompts)):
        if not path.is_file():
            raise ValueError(f"paths[{index}]: no such file {path}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{index}] must be a non-empty string")
        if cf is not None and (not isinstance(cf, str) or not cf.strip()):
            raise ValueError(f"counterfactual_prompts[{index}] must be None or a non-empty string")
        if encoder is not None and hasattr(encoder, "tokenize"):
            for text in (prompt, cf):
                if text is not None:
                    encoder.tokenize(text)  # raises ValueError naming the unknown words
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        wave = torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))
        clip = Clip(clip_id=f"{index:03d}-{path.stem}", mixture=wave, sample_rate=int(rate), prompt=prompt,
                    meta={"path": str(path)})
        clips.append(ProtocolClip(clip=clip, classes=(), counterfactual_prompt=cf, group="user audio",
                                  meta={"path": str(path), "gain_group": "unknown", "num_samples": wave.numel()}))
    return clips


__all__ = ["active_frames", "clips_from_files", "default_clips", "GAIN_SPREAD_SPLIT_DB"]
