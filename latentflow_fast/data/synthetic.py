"""Seeded synthetic mixtures for the tiny default model (docs/design.md, section 5).

Every clip is 2.0 s at 16 kHz and is fully determined by one integer seed
(``numpy.random.Generator(PCG64(seed))``); nothing else is random.

Rules
-----
* Six source classes, each named by its prompt:
  ``"sine tone"`` (frequency log-uniform in 200-2000 Hz, random phase),
  ``"square wave"`` (fundamental log-uniform in 100-800 Hz, naive sign(sin), random phase),
  ``"white noise"`` (Gaussian),
  ``"click train"`` (unit impulses, rate uniform in 4-20 Hz, random phase of the first click),
  ``"chirp"`` (linear sweep between two frequencies drawn uniformly from 200-4000 Hz),
  ``"noise bursts"`` (2-6 white-noise bursts, each 50-200 ms long, start uniform inside the
  active interval; bursts may overlap and have their own 10 ms fades).
* Each source is active over one interval: duration uniform in [0.6 s, 2.0 s], start uniform so
  that the interval fits inside the clip; 10 ms raised-cosine fades at both ends, silence outside.
* A mixture has 2 or 3 sources (equally likely) of distinct classes (drawn without replacement).
* Level: each source is scaled to RMS 0.1 **measured over its own active interval** (fades
  included, silence outside excluded), then multiplied by a gain drawn uniformly in [-6, +6] dB.
  Measuring over the active interval makes the level independent of how long a source plays.
* The prompt names one source, drawn uniformly; target = that source,
  residual = the sum of the other sources (in order), mixture = target + residual (exactly, float32).

Seed ranges (disjoint)
----------------------
* ``TRAIN_SEEDS``: ``[0, 10_000_000)`` -- the training script draws only from here.
* ``EVAL_SEEDS``: ``[1_000_000_000, 2_000_000_000)`` -- held out; benchmarks and tests use these.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SAMPLE_RATE = 16_000
CLIP_SECONDS = 2.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)
MIN_ACTIVE_SECONDS = 0.6
FADE_SECONDS = 0.010
SOURCE_RMS = 0.1
GAIN_DB_RANGE = (-6.0, 6.0)

CLASSES: tuple[str, ...] = (
    "sine tone",
    "square wave",
    "white noise",
    "click train",
    "chirp",
    "noise bursts",
)

TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEEDS = range(1_000_000_000, 2_000_000_000)
EVAL_SEED_START = EVAL_SEEDS.start


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One synthetic example. Waveforms are float32 numpy arrays of ``CLIP_SAMPLES`` samples."""

    seed: int
    mixture: np.ndarray  # [S]
    sources: np.ndarray  # [n_sources, S], each already scaled by its gain
    classes: tuple[str, ...]  # class (= prompt text) of each source
    prompt: str
    target_index: int
    target: np.ndarray  # [S] = sources[target_index]
    residual: np.ndarray  # [S] = sum of the other sources
    active_intervals: tuple[tuple[int, int], ...]  # [start, end) sample indices per source
    gains_db: tuple[float, ...]
    params: tuple[dict, ...]  # class parameters actually drawn, per source
    sample_rate: int = SAMPLE_RATE

    @property
    def n_sources(self) -> int:
        return len(self.classes)

    @property
    def complexity(self) -> dict:
        """Grouping keys for benchmarks: number of sources and gain spread (max - min, dB)."""
        gains = self.gains_db
        others = [g for i, g in enumerate(gains) if i != self.target_index]
        return {
            "n_sources": self.n_sources,
            "gain_spread_db": float(max(gains) - min(gains)),
            "target_gain_rel_db": float(gains[self.target_index] - max(others)),
        }


@dataclasses.dataclass(frozen=True)
class MixtureBatch:
    """Stacked examples: arrays are float32 ``[B, S]``; ``sources`` stays a per-item list."""

    seeds: tuple[int, ...]
    mixture: np.ndarray
    target: np.ndarray
    residual: np.ndarray
    prompts: tuple[str, ...]
    items: tuple[Mixture, ...]
    sample_rate: int = SAMPLE_RATE


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _fade_envelope(length: int, fade: int) -> np.ndarray:
    """Ones with raised-cosine ramps of ``fade`` samples at both ends."""
    env = np.ones(length)
    fade = min(fade, length // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)
        env[:fade] = ramp
        env[length - fade:] = ramp[::-1]
    return env


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _render(cls: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Raw (unnormalised) signal of class ``cls`` over ``n`` samples, plus its parameters."""
    sr = SAMPLE_RATE
    t = np.arange(n) / sr
    if cls == "sine tone":
        f = _log_uniform(rng, 200.0, 2000.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        return np.sin(2 * np.pi * f * t + phase), {"frequency_hz": f}
    if cls == "square wave":
        f0 = _log_uniform(rng, 100.0, 800.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        return np.sign(np.sin(2 * np.pi * f0 * t + phase) + 1e-12), {"f0_hz": f0}
    if cls == "white noise":
        return rng.standard_normal(n), {}
    if cls == "click train":
        rate = float(rng.uniform(4.0, 20.0))
        period = sr / rate
        first = rng.uniform(0.0, period)
        positions = np.floor(np.arange(first, n, period)).astype(np.int64)
        x = np.zeros(n)
        x[positions[positions < n]] = 1.0
        return x, {"rate_hz": rate, "n_clicks": int(len(positions))}
    if cls == "chirp":
        f_start, f_end = (float(v) for v in rng.uniform(200.0, 4000.0, size=2))
        duration = n / sr
        phase = rng.uniform(0.0, 2 * np.pi)
        inst = 2 * np.pi * (f_start * t + 0.5 * (f_end - f_start) / duration * t * t)
        return np.sin(inst + phase), {"f_start_hz": f_start, "f_end_hz": f_end}
    if cls == "noise bursts":
        count = int(rng.integers(2, 7))
        x = np.zeros(n)
        bursts = []
        fade = int(round(FADE_SECONDS * sr))
        for _ in range(count):
            length = int(rng.integers(int(0.050 * sr), int(0.200 * sr) + 1))
            start = int(rng.integers(0, n - length + 1))
            x[start:start + length] += rng.standard_normal(length) * _fade_envelope(length, fade)
            bursts.append((start, length))
        return x, {"n_bursts": count, "bursts": bursts}
    raise ValueError(f"cls must be one of {CLASSES}, got {cls!r}")


def _make_source(cls: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int], dict]:
    """A full-length float64 source at RMS 0.1 over its active interval (gain not applied)."""
    min_len = int(round(MIN_ACTIVE_SECONDS * SAMPLE_RATE))
    length = int(rng.integers(min_len, CLIP_SAMPLES + 1))
    start = int(rng.integers(0, CLIP_SAMPLES - length + 1))
    raw, params = _render(cls, length, rng)
    raw = raw * _fade_envelope(length, int(round(FADE_SECONDS * SAMPLE_RATE)))
    rms = float(np.sqrt(np.mean(raw * raw)))
    if rms > 0:
        raw = raw * (SOURCE_RMS / rms)
    out = np.zeros(CLIP_SAMPLES)
    out[start:start + length] = raw
    return out, (start, start + length), params


def make_mixture(seed: int, classes: Sequence[str] | None = None, target_index: int | None = None) -> Mixture:
    """The mixture of seed ``seed`` (deterministic; see the module docstring for the rules).

    ``classes`` / ``target_index`` fix the classes (in order) and the prompted source instead of drawing
    them (the protocol's balanced clip sets); the draws are still made, so everything else (intervals,
    gains, signals) comes from the seed as usual and the default path is unchanged."""
    seed = _check_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    n_sources = int(rng.integers(2, 4))
    class_ids = rng.choice(len(CLASSES), size=n_sources, replace=False)
    if classes is None:
        classes = tuple(CLASSES[int(i)] for i in class_ids)
    else:
        classes = tuple(classes)
        if (any(c not in CLASSES for c in classes) or not 1 <= len(classes) <= len(CLASSES)
                or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must be distinct names from {CLASSES}, got {classes}")
        n_sources = len(classes)
    sources, intervals, gains, params = [], [], [], []
    for cls in classes:
        signal, interval, p = _make_source(cls, rng)
        gain_db = float(rng.uniform(*GAIN_DB_RANGE))
        sources.append((signal * 10.0 ** (gain_db / 20.0)).astype(np.float32))
        intervals.append(interval)
        gains.append(gain_db)
        params.append(p)
    drawn_target = int(rng.integers(0, n_sources))
    if target_index is None:
        target_index = drawn_target
    elif not 0 <= target_index < n_sources:
        raise ValueError(f"target_index must be in [0, {n_sources}), got {target_index}")
    target = sources[target_index]
    residual = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    for i, s in enumerate(sources):
        if i != target_index:
            residual = residual + s
    mixture = target + residual
    return Mixture(
        seed=seed,
        mixture=mixture,
        sources=np.stack(sources),
        classes=classes,
        prompt=classes[target_index],
        target_index=target_index,
        target=target,
        residual=residual,
        active_intervals=tuple(intervals),
        gains_db=tuple(gains),
        params=tuple(params),
    )


def make_batch(seeds: Sequence[int]) -> MixtureBatch:
    """Stack ``make_mixture(s)`` for every seed in ``seeds``."""
    if isinstance(seeds, (int, np.integer)):
        raise TypeError("seeds must be a sequence of ints, not a single int")
    items = tuple(make_mixture(s) for s in seeds)
    if not items:
        raise ValueError("seeds must not be empty")
    return MixtureBatch(
        seeds=tuple(m.seed for m in items),
        mixture=np.stack([m.mixture for m in items]),
        target=np.stack([m.target for m in items]),
        residual=np.stack([m.residual for m in items]),
        prompts=tuple(m.prompt for m in items),
        items=items,
    )


def eval_seeds(count: int, offset: int = 0) -> list[int]:
    """The first ``count`` held-out evaluation seeds (after skipping ``offset``)."""
    if count < 0 or offset < 0:
        raise ValueError("count and offset must be >= 0")
    return [EVAL_SEED_START + offset + i for i in range(count)]
