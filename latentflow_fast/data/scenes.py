"""Seeded synthetic sound scenes for the `small` model: 11 spectrally distinct classes, phrase prompts.

Every clip is 4.0 s at 16 kHz and is fully determined by one integer seed
(``numpy.random.Generator(PCG64(seed))``); nothing else is random. The full specification is in
docs/small_model.md; in short:

* A mixture has 2 or 3 sources (equally likely) of distinct classes. Each source plays over one interval
  of 2.0-4.0 s (so any two sources overlap in time by construction) with 20 ms raised-cosine fades,
  is scaled to RMS 0.1 over its active interval, then by a gain uniform in [-6, +6] dB.
* Classes differ in spectrum and spectro-temporal pattern, never only in timing: a low tone
  (100-250 Hz) and a high tone (0.7-1.5 kHz) are different targets, as are rising and falling chirps.
* Every source is band-limited below 1.8 kHz, inside the small model's 0-2 kHz latent (its codec keeps
  the 80 lowest MDCT bins), so the codec round trip is exact on every source and every mixture.
* Each source gets a phrase of 3-6 words drawn from its class's grammar: a determiner, one or two
  adjectives (attribute words such as fast/slow follow the drawn parameters), a noun phrase. The prompt
  is the target's phrase; ``phrases`` holds one per source, for counterfactual prompts.
* Target = the prompted source, residual = the sum of the others, mixture = target + residual.

Seed ranges are disjoint: ``TRAIN_SEEDS`` = [0, 10_000_000) for training, ``EVAL_SEEDS`` =
[1_000_000_000, 2_000_000_000) held out for benchmarks, tests and the protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# the helpers the tiny model's generator uses too: one implementation of the fades, draws and seed check
from .synthetic import _check_seed, _log_uniform
from .synthetic import _fade_envelope as _fade

SAMPLE_RATE = 16_000
CLIP_SECONDS = 4.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)
ACTIVE_SECONDS = (2.0, 4.0)
FADE_SECONDS = 0.020
SOURCE_RMS = 0.1
GAIN_DB_RANGE = (-6.0, 6.0)

TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEEDS = range(1_000_000_000, 2_000_000_000)


# --------------------------------------------------------------------------------------------- rendering
def _band_noise(rng: np.random.Generator, n: int, low_hz: float, high_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0.0
    return np.fft.irfft(spectrum, n)


def _add_events(n: int, starts: np.ndarray, template: np.ndarray) -> np.ndarray:
    out = np.zeros(n)
    for s in starts:
        s = int(s)
        m = min(len(template), n - s)
        if m > 0:
            out[s:s + m] += template[:m]
    return out


def _tone(low: float, high: float):
    def render(rng, n):
        f = _log_uniform(rng, low, high)
        t = np.arange(n) / SAMPLE_RATE
        return np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)), {"frequency_hz": f}
    return render


BAND_LIMIT_HZ = 1800.0


def _buzz(rng, n):
    f0 = _log_uniform(rng, 70.0, 140.0)
    t = np.arange(n) / SAMPLE_RATE
    k = np.arange(1, int(1700.0 // f0) + 1)
    phases = rng.uniform(0, 2 * np.pi, size=len(k))
    x = (np.sin(2 * np.pi * f0 * np.outer(k, t) + phases[:, None]) / k[:, None]).sum(axis=0)
    return x, {"f0_hz": f0}


def _chirps(direction: int):
    """Repeated exponential sweeps between 200-350 Hz and 1.1-1.7 kHz, each with its own 5 ms fades."""
    def render(rng, n):
        low, high = _log_uniform(rng, 200.0, 350.0), _log_uniform(rng, 1100.0, 1700.0)
        period = int(rng.uniform(0.4, 1.0) * SAMPLE_RATE)
        f_start, f_end = (low, high) if direction > 0 else (high, low)
        tau = np.arange(period) / SAMPLE_RATE
        duration = period / SAMPLE_RATE
        ratio = f_end / f_start
        phase = 2 * np.pi * f_start * duration / np.log(ratio) * (ratio ** (tau / duration) - 1.0)
        sweep = np.sin(phase) * _fade(period, int(0.005 * SAMPLE_RATE))
        offset = int(rng.integers(0, period))
        starts = np.arange(offset - period, n, period)
        x = np.zeros(n + 2 * period)
        for s in starts:
            x[s + period:s + 2 * period] += sweep
        return x[period:period + n], {"f_start_hz": f_start, "f_end_hz": f_end, "period_s": duration}
    return render


def _clicks(rng, n):
    """Ticks: Gaussian tone bursts (600-1400 Hz, 1-2 ms wide: short but band-limited)."""
    rate = float(rng.uniform(3.0, 12.0))
    period = SAMPLE_RATE / rate
    starts = np.floor(np.arange(rng.uniform(0, period), n, period)).astype(np.int64)
    f = _log_uniform(rng, 600.0, 1400.0)
    width = float(rng.uniform(0.001, 0.002))
    length = int(8 * width * SAMPLE_RATE)
    tau = np.arange(length) / SAMPLE_RATE
    tick = np.sin(2 * np.pi * f * tau) * np.exp(-0.5 * ((tau - 4 * width) / width) ** 2)
    return _add_events(n, starts, tick), {"rate_hz": rate, "frequency_hz": f,
                                          "speed": "fast" if rate >= 7.0 else "slow"}


def _hiss(rng, n):
    return _band_noise(rng, n, 1300.0, 1750.0), {}


def _siren(rng, n):
    centre = _log_uniform(rng, 400.0, 750.0)
    depth = float(rng.uniform(0.15, 0.3))
    rate = float(rng.uniform(0.5, 2.0))
    t = np.arange(n) / SAMPLE_RATE
    freq = centre * (1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE), {"centre_hz": centre, "rate_hz": rate}


_BELL_RATIOS = np.array([1.0, 2.0, 2.76, 4.07])
_BELL_AMPS = np.array([1.0, 0.6, 0.5, 0.3])


def _bell(rng, n):
    f = _log_uniform(rng, 250.0, 420.0)
    interval = int(rng.uniform(0.5, 1.2) * SAMPLE_RATE)
    decay = float(rng.uniform(0.25, 0.5))
    length = min(n, int(5 * decay * SAMPLE_RATE))
    tau = np.arange(length) / SAMPLE_RATE
    partials = np.sin(2 * np.pi * f * np.outer(_BELL_RATIOS, tau))
    envelopes = np.exp(-tau[None, :] * np.sqrt(_BELL_RATIOS)[:, None] / decay)
    strike = (_BELL_AMPS[:, None] * partials * envelopes).sum(axis=0) * _fade(length, 16)
    starts = np.arange(int(rng.integers(0, interval // 2 + 1)), n, interval)
    return _add_events(n, starts, strike), {"frequency_hz": f, "interval_s": interval / SAMPLE_RATE}


def _drum(rng, n):
    interval = int(rng.uniform(0.3, 0.7) * SAMPLE_RATE)
    f_high, f_low = float(rng.uniform(100.0, 140.0)), float(rng.uniform(45.0, 70.0))
    decay = float(rng.uniform(0.08, 0.2))
    length = min(n, int(5 * decay * SAMPLE_RATE))
    tau = np.arange(length) / SAMPLE_RATE
    freq = f_low + (f_high - f_low) * np.exp(-tau / 0.03)
    hit = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.exp(-tau / decay) * _fade(length, 16)
    starts = np.arange(int(rng.integers(0, interval // 2 + 1)), n, interval)
    return _add_events(n, starts, hit), {"f_low_hz": f_low, "interval_s": interval / SAMPLE_RATE}


def _birds(rng, n):
    rate = float(rng.uniform(2.0, 6.0))
    count = max(1, int(round(rate * n / SAMPLE_RATE)))
    x = np.zeros(n)
    for _ in range(count):
        length = int(rng.uniform(0.04, 0.12) * SAMPLE_RATE)
        if length >= n:
            continue
        start = int(rng.integers(0, n - length))
        f_a = float(rng.uniform(1100.0, 1700.0))
        f_b = min(1750.0, f_a * float(rng.uniform(0.75, 1.3)))
        freq = np.linspace(f_a, f_b, length)
        x[start:start + length] += np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.hanning(length)
    return x, {"rate_hz": rate}


# ---------------------------------------------------------------------------------------------- classes
@dataclasses.dataclass(frozen=True)
class SoundClass:
    name: str  # also the canonical short name used in tables
    canonical_prompt: str
    render: Callable  # (rng, n) -> (signal [n], params)
    adjectives: tuple[str, ...]  # each one or two words
    nouns: tuple[str, ...]
    plural_nouns: tuple[str, ...] = ()
    # attribute adjectives chosen by a drawn parameter: {param name: {value: adjectives}}
    attribute_adjectives: tuple = ()


CLASSES: tuple[SoundClass, ...] = (
    SoundClass("low tone", "a low pitched sine tone", _tone(100.0, 250.0),
               ("low", "low pitched", "deep"), ("tone", "sine tone", "hum")),
    SoundClass("high tone", "a high pitched sine tone", _tone(700.0, 1500.0),
               ("high", "high pitched", "shrill"), ("tone", "sine tone", "whistle")),
    SoundClass("buzz", "a harsh electric buzz", _buzz,
               ("harsh", "electric", "droning"), ("buzz", "buzzing sound")),
    SoundClass("rising chirp", "a rising chirp", _chirps(+1),
               ("rising", "upward", "ascending"), ("chirp", "sweep", "sweeping tone")),
    SoundClass("falling chirp", "a falling chirp", _chirps(-1),
               ("falling", "downward", "descending"), ("chirp", "sweep", "sweeping tone")),
    SoundClass("clicks", "some sharp clicks", _clicks,
               ("sharp",), ("click train", "ticking sound"), plural_nouns=("clicks",),
               attribute_adjectives=(("speed", (("fast", ("fast", "rapid")), ("slow", ("slow", "sparse")))),)),
    SoundClass("hiss", "a steady hiss", _hiss,
               ("steady", "high", "airy"), ("hiss", "hissing noise")),
    SoundClass("siren", "a wailing siren", _siren,
               ("wailing", "police", "distant"), ("siren", "siren sound")),
    SoundClass("bell", "a ringing bell", _bell,
               ("ringing", "church", "small"), ("bell", "chime", "bell sound")),
    SoundClass("drum", "a deep drum beat", _drum,
               ("deep", "low", "steady"), ("drum", "drum beat", "thump")),
    SoundClass("birds", "a chirping bird", _birds,
               ("chirping", "singing", "small"), ("bird", "songbird"), plural_nouns=("birds",)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
_BY_NAME = {c.name: c for c in CLASSES}
MIN_WORDS, MAX_WORDS = 3, 6


def class_adjectives(cls: SoundClass, params: dict) -> tuple[str, ...]:
    """Adjectives allowed for one drawn source: the class's, plus attribute words matching its parameters."""
    words = list(cls.adjectives)
    for param, options in cls.attribute_adjectives:
        words += list(dict(options)[params[param]])
    return tuple(words)


def make_phrase(cls: SoundClass, params: dict, rng: np.random.Generator) -> str:
    """determiner + one or two distinct adjectives + noun phrase, 3-6 words."""
    adjectives = class_adjectives(cls, params)
    nouns = [(n, False) for n in cls.nouns] + [(n, True) for n in cls.plural_nouns]
    noun, plural = nouns[int(rng.integers(0, len(nouns)))]
    n_adj = 1 + int(rng.integers(0, 2)) if len(adjectives) > 1 else 1
    picked = [adjectives[int(i)] for i in rng.choice(len(adjectives), size=n_adj, replace=False)]
    if len(picked) == 2 and (set(picked[0].split()) & set(picked[1].split())
                             or len(" ".join(picked + [noun]).split()) > MAX_WORDS - 1):
        picked = picked[:1]  # no "high pitched high tone", and at most 6 words
    det = ("some", "the")[int(rng.integers(0, 2))] if plural else ("a", "the")[int(rng.integers(0, 2))]
    if det == "a" and picked[0][0] in "aeiou":
        det = "an"
    return " ".join([det] + picked + [noun])


def vocabulary() -> tuple[str, ...]:
    """Every word any phrase (or canonical prompt) can contain, sorted."""
    words = {"a", "an", "the", "some"}
    for c in CLASSES:
        for phrase in c.adjectives + c.nouns + c.plural_nouns + (c.canonical_prompt,):
            words.update(phrase.split())
        for _, options in c.attribute_adjectives:
            for _, adjectives in options:
                for a in adjectives:
                    words.update(a.split())
    return tuple(sorted(words))


# ---------------------------------------------------------------------------------------------- mixtures
@dataclasses.dataclass(frozen=True)
class Mixture:
    """One scene. Waveforms are float32 numpy arrays of ``CLIP_SAMPLES`` samples."""

    seed: int
    mixture: np.ndarray  # [S]
    sources: np.ndarray  # [n_sources, S], gains applied
    classes: tuple[str, ...]
    phrases: tuple[str, ...]  # one prompt per source
    prompt: str  # = phrases[target_index]
    target_index: int
    target: np.ndarray
    residual: np.ndarray
    active_intervals: tuple[tuple[int, int], ...]
    gains_db: tuple[float, ...]
    params: tuple[dict, ...]
    sample_rate: int = SAMPLE_RATE

    @property
    def n_sources(self) -> int:
        return len(self.classes)

    @property
    def complexity(self) -> dict:
        gains = self.gains_db
        others = [g for i, g in enumerate(gains) if i != self.target_index]
        return {"n_sources": self.n_sources, "gain_spread_db": float(max(gains) - min(gains)),
                "target_gain_rel_db": float(gains[self.target_index] - max(others))}


@dataclasses.dataclass(frozen=True)
class MixtureBatch:
    seeds: tuple[int, ...]
    mixture: np.ndarray
    target: np.ndarray
    residual: np.ndarray
    prompts: tuple[str, ...]
    items: tuple[Mixture, ...]
    sample_rate: int = SAMPLE_RATE


def render_source(name: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int], dict]:
    """A full-length float64 source of class ``name`` at RMS 0.1 over its active interval (no gain)."""
    cls = _BY_NAME[name]
    low, high = (int(round(s * SAMPLE_RATE)) for s in ACTIVE_SECONDS)
    length = int(rng.integers(low, high + 1))
    start = int(rng.integers(0, CLIP_SAMPLES - length + 1))
    raw, params = cls.render(rng, length)
    raw = raw * _fade(length, int(round(FADE_SECONDS * SAMPLE_RATE)))
    rms = float(np.sqrt(np.mean(raw * raw)))
    if rms > 0:
        raw = raw * (SOURCE_RMS / rms)
    out = np.zeros(CLIP_SAMPLES)
    out[start:start + length] = raw
    return out, (start, start + length), params


def make_mixture(seed: int, classes: Sequence[str] | None = None, target_index: int | None = None) -> Mixture:
    """The scene of ``seed``. ``classes`` / ``target_index`` fix the classes (in order) and the prompted
    source instead of drawing them (the protocol's balanced clip sets); everything else still comes from
    the seed."""
    seed = _check_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    n_sources = int(rng.integers(2, 4))
    drawn = rng.choice(len(CLASSES), size=n_sources, replace=False)
    if classes is None:
        classes = tuple(CLASS_NAMES[int(i)] for i in drawn)
    else:
        classes = tuple(classes)
        unknown = [c for c in classes if c not in _BY_NAME]
        if unknown or not 1 <= len(classes) <= len(CLASSES) or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names from {CLASS_NAMES}, got {classes}")
        n_sources = len(classes)
    sources, intervals, gains, params, phrases = [], [], [], [], []
    for name in classes:
        signal, interval, p = render_source(name, rng)
        gain_db = float(rng.uniform(*GAIN_DB_RANGE))
        sources.append((signal * 10.0 ** (gain_db / 20.0)).astype(np.float32))
        intervals.append(interval)
        gains.append(gain_db)
        params.append(p)
        phrases.append(make_phrase(_BY_NAME[name], p, rng))
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
    return Mixture(
        seed=seed, mixture=target + residual, sources=np.stack(sources), classes=classes,
        phrases=tuple(phrases), prompt=phrases[target_index], target_index=target_index, target=target,
        residual=residual, active_intervals=tuple(intervals), gains_db=tuple(gains), params=tuple(params),
    )


def make_batch(seeds: Sequence[int]) -> MixtureBatch:
    if isinstance(seeds, (int, np.integer)):
        raise TypeError("seeds must be a sequence of ints, not a single int")
    items = tuple(make_mixture(s) for s in seeds)
    if not items:
        raise ValueError("seeds must not be empty")
    return MixtureBatch(
        seeds=tuple(m.seed for m in items), mixture=np.stack([m.mixture for m in items]),
        target=np.stack([m.target for m in items]), residual=np.stack([m.residual for m in items]),
        prompts=tuple(m.prompt for m in items), items=items,
    )


def eval_seeds(count: int, offset: int = 0) -> list[int]:
    if count < 0 or offset < 0:
        raise ValueError("count and offset must be >= 0")
    return [EVAL_SEEDS.start + offset + i for i in range(count)]
