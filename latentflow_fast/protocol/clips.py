"""The protocol's clips: a fixed seeded set of held-out synthetic mixtures, or the user's audio files.

Default set (`default_clips`): a balanced design (protocol v2)
---------------------------------------------------------------
* Data: the generator the model was trained on (`data.dataset_for`): the small model's 4 s phrase-prompted
  scenes, or the tiny model's 2 s clips (also without a model).
* ``ceil(n/2)`` 2-source and ``floor(n/2)`` 3-source mixtures. Each clip is a slot (target class A,
  counterfactual class B[, a third class C]); the counterfactual prompt names B, another source present in
  the same mix.
* Balance: slots come in twins that swap the prompt order, (A, B) and (B, A) on the same class set, so
  every class pair is probed in both directions. Class pairs are picked greedily so that every class is
  used about equally often (least-used pair first; ties in a fixed order shuffled by
  ``config.clip_seed_offset``); a 3-source twin adds the least-used class compatible with both.
* Excluded: a pair of classes that differ only in timing (`TIMING_ONLY_PAIRS`: the tiny data's
  "white noise" and "noise bursts" are the same noise gated in time) never share a mixture; the scenes
  classes differ in spectrum by construction. For the values/weights swap of P1 the target and
  counterfactual prompts must have the same number of text tokens (words): slot i scans seeds
  ``EVAL_SEEDS.start + offset + 1000 i + j`` (j = 0, 1, ...) for the first mixture, rendered with the
  slot's classes (`make_mixture(seed, classes, target_index=0)`), whose two phrases have equal length;
  with fixed class-name prompts (tiny data) pairs of different word counts are left out of the design.
* Groups (acoustic complexity): ``group`` = "2 sources" / "3 sources"; ``meta["gain_group"]`` =
  "gain spread < 6 dB" / "gain spread >= 6 dB" (spread = max - min source gain, from [-6, +6] dB draws;
  6 dB is half the possible range, a fixed rule, not a data-dependent median).
* ``active_frames``: latent frames whose centre time lies inside the target's active interval;
  ``meta["counterfactual_interval"]`` is the counterfactual source's interval (P1's active frames).
* Same config -> same clips (the design is a pure function of num_clips and clip_seed_offset).

Which clips the clean model separates (SI-SDRi >= `SEPARATED_DB` = 3 dB) is measured from the clean run
(`separation_gain_db`); experiments report on all clips and on that subset.

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


def _clip_from_mixture(mix, seconds: Optional[float], model, counterfactual_index: Optional[int] = None) -> ProtocolClip:
    total = mix.mixture.shape[-1]
    start, end = mix.active_intervals[mix.target_index]
    n = total if seconds is None else min(total, int(round(seconds * mix.sample_rate)))
    # A cropped window starts a quarter window before the target's onset, so the target plays in it.
    offset = min(max(start - n // 4, 0), total - n)
    window = slice(offset, offset + n)
    sources = torch.from_numpy(np.ascontiguousarray(mix.sources[:, window]))
    target = sources[mix.target_index].clone()
    residual = torch.from_numpy(np.ascontiguousarray(mix.residual[window]))
    cf_index = (mix.target_index + 1) % mix.n_sources if counterfactual_index is None else counterfactual_index

    def crop(iv):
        return (min(max(iv[0] - offset, 0), n), min(max(iv[1] - offset, 0), n))

    interval = crop((start, end))
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
            "counterfactual_interval": crop(mix.active_intervals[cf_index]),
            "num_samples": n,
            "crop_offset": offset,
        },
    )


SEPARATED_DB = 3.0  # SI-SDR improvement of the clean output above which a clip counts as "separated"
DESIGN_SEED_STRIDE = 1000  # seeds scanned per slot (token-count match), disjoint between slots
# pairs of classes that differ only in timing, per dataset module name (never in the same mixture)
TIMING_ONLY_PAIRS = {
    "synthetic": {frozenset({"white noise", "noise bursts"})},
    "scenes": set(),  # the scene classes differ in spectrum by construction (data/scenes.py)
}


def _dataset_key(data) -> str:
    return data.__name__.rsplit(".", 1)[-1]


def _class_names(data) -> tuple:
    return tuple(getattr(data, "CLASS_NAMES", None) or data.CLASSES)


def _compatible(a: str, b: str, data) -> bool:
    if a == b or frozenset({a, b}) in TIMING_ONLY_PAIRS.get(_dataset_key(data), set()):
        return False
    return True


def _probe_pair_ok(a: str, b: str, data) -> bool:
    """Target/counterfactual pair: compatible, and (fixed class-name prompts) of equal word count."""
    if not _compatible(a, b, data):
        return False
    has_phrases = _dataset_key(data) == "scenes"
    return has_phrases or len(a.split()) == len(b.split())


def clip_design(count: int, offset: int = 0, data=None) -> list[tuple]:
    """The balanced slots [(target class, counterfactual class[, third class]), ...] (module docstring)."""
    data = synthetic if data is None else data
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    names = _class_names(data)
    rng = np.random.Generator(np.random.PCG64(int(offset)))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if _probe_pair_ok(a, b, data)]
    pairs = [pairs[int(i)] for i in rng.permutation(len(pairs))]  # the fixed tie-break order
    tie = {c: int(r) for r, c in enumerate(rng.permutation(len(names)))}
    tie = {names[k]: v for k, v in tie.items()}
    use = {c: 0 for c in names}
    pair_use = {p: 0 for p in pairs}
    slots: list = []
    quota = {2: (count + 1) // 2, 3: count // 2}
    for n_sources in (2, 3):
        made = 0
        while made < quota[n_sources]:
            # least-used pair, then least-used classes, then the shuffled order
            a, b = min(pairs, key=lambda p: (pair_use[p], use[p[0]] + use[p[1]], max(use[p[0]], use[p[1]])))
            pair_use[(a, b)] += 1
            extra = ()
            if n_sources == 3:
                third = [c for c in names if c not in (a, b) and _compatible(c, a, data) and _compatible(c, b, data)]
                if not third:
                    continue  # pragma: no cover - every dataset has a compatible third class
                c = min(third, key=lambda x: (use[x], tie[x]))
                extra = (c,)
                use[c] += 2
            use[a] += 2
            use[b] += 2
            for target, cf in ((a, b), (b, a)):
                if made < quota[n_sources]:
                    slots.append((target, cf) + extra)
                    made += 1
    return slots


def _design_mixture(data, slot: tuple, index: int, offset: int):
    base = data.EVAL_SEEDS.start + int(offset) + DESIGN_SEED_STRIDE * index
    for seed in range(base, base + DESIGN_SEED_STRIDE):
        mix = data.make_mixture(seed, classes=slot, target_index=0)
        phrases = getattr(mix, "phrases", mix.classes)
        if len(phrases[0].split()) == len(phrases[1].split()):
            return mix
    raise RuntimeError(f"no seed in [{base}, {base + DESIGN_SEED_STRIDE}) gives equal-length prompts for {slot}")


def default_clips(config, model=None, seconds: Optional[float] = None) -> list[ProtocolClip]:
    """The fixed balanced clip set of `config` (num_clips, clip_seed_offset); see the module docstring.

    model: picks the data (`data.dataset_for`) and the codec frame rate of `active_frames` (tiny data and
        codec if None).
    seconds: crop every clip to `seconds` (small test configurations), from a quarter window before the
        target's onset (or the clip's end, whichever comes first); None = the full clips.
    """
    count = int(config.num_clips)
    if count < 1:
        raise ValueError(f"config.num_clips must be >= 1, got {config.num_clips}")
    if config.clip_seed_offset < 0:
        raise ValueError(f"config.clip_seed_offset must be >= 0, got {config.clip_seed_offset}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    # the data the model was trained on: the small model's 4 s scenes, the tiny model's 2 s clips
    data = synthetic if model is None else dataset_for(model)
    slots = clip_design(count, config.clip_seed_offset, data)
    clips = []
    for index, slot in enumerate(slots):
        mix = _design_mixture(data, slot, index, config.clip_seed_offset)
        pclip = _clip_from_mixture(mix, seconds, model, counterfactual_index=1)
        pclip.meta["design_slot"] = index
        clips.append(pclip)
    return clips


def separation_gain_db(output, pclip) -> float:
    """SI-SDR improvement (dB) of a clean output over the mixture, against the clip's target stem (NaN
    without stems)."""
    from .. import metrics

    ref = pclip.clip.target
    if ref is None:
        return math.nan
    ref = torch.as_tensor(ref, dtype=torch.float32).reshape(1, -1)
    out = torch.as_tensor(output, dtype=torch.float32).reshape(1, -1)
    mix = torch.as_tensor(pclip.clip.mixture, dtype=torch.float32).reshape(1, -1)
    return float(metrics.si_sdr(out, ref)[0] - metrics.si_sdr(mix, ref)[0])


def separated_clip_ids(ctx):
    """Clip ids the clean model separates, from the first of P0/P1/P3 that ran in this protocol run (their
    summaries' ``separated_clips``); None when none of them ran (then compute `separation_gain_db` of your
    own clean runs)."""
    summaries = getattr(ctx, "summaries", None) or {}
    for name in ("p0", "p1", "p3"):
        if "separated_clips" in (summaries.get(name) or {}):
            return list(summaries[name]["separated_clips"])
    return None


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


__all__ = ["active_frames", "clip_design", "clips_from_files", "default_clips", "separated_clip_ids",
           "separation_gain_db",
           "GAIN_SPREAD_SPLIT_DB", "SEPARATED_DB", "TIMING_ONLY_PAIRS"]
