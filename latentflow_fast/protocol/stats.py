"""Statistics across clips: paired Wilcoxon signed-rank tests, bootstrap intervals, the 2x2 dissociation.

* `paired_wilcoxon(x, y)`: two-sided Wilcoxon signed-rank test of the paired differences x - y
  (scipy.stats.wilcoxon, zero differences dropped, exact distribution for small n). Pairs with a NaN are
  dropped. All differences zero -> statistic 0, p = 1 (no evidence of a difference); no pairs -> NaN.
* `bootstrap_ci(values)`: percentile bootstrap 95% interval of the mean, resampling clips with a seeded
  numpy Generator (PCG64(seed)), `resamples` draws. NaNs dropped; one value -> (v, v); none -> NaN.
* `dissociation(frame)`: the 2x2 double dissociation, probe type {additive, routing} x effect
  {semantic, acoustic}, over clips:
  - cells: per-clip values, their mean and bootstrap CI;
  - paired tests of additive vs routing on each effect (Wilcoxon);
  - per-clip contrasts C_E = (E_additive - E_routing) / (|E_additive| + |E_routing|) in [-1, 1] (0 when both
    are 0), which makes the two effects' different units comparable; the interaction is
    I = C_semantic - C_acoustic per clip, with its bootstrap CI and a Wilcoxon test against 0.
  The paper's claim predicts C_semantic > 0 (the additive part carries identity), C_acoustic < 0 (routing
  carries acoustic detail) and I > 0; `double_dissociation` is True only when both contrasts' CIs exclude
  0 with those signs.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats


def _clean_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def paired_wilcoxon(x, y) -> dict:
    """Two-sided paired Wilcoxon signed-rank test of x vs y (see the module docstring)."""
    x, y = _clean_pairs(x, y)
    d = x - y
    out = {"n": int(d.size), "n_nonzero": int(np.count_nonzero(d)),
           "median_difference": float(np.median(d)) if d.size else math.nan}
    if d.size == 0:
        return dict(out, statistic=math.nan, p_value=math.nan)
    if out["n_nonzero"] == 0:
        return dict(out, statistic=0.0, p_value=1.0)
    result = _scipy_stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return dict(out, statistic=float(result.statistic), p_value=float(result.pvalue))


def bootstrap_ci(values, resamples: int = 2000, seed: int = 0, level: float = 0.95,
                 statistic: Callable = np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the finite entries of `values`."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, v.size, size=(resamples, v.size))
    draws = statistic(v[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def summarize_values(values, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean, median, n and bootstrap 95% CI of the finite entries of `values`."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    lo, hi = bootstrap_ci(v, resamples, seed)
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else math.nan,
            "median": float(np.median(v)) if v.size else math.nan, "ci_low": lo, "ci_high": hi}


def contrast(a, b) -> np.ndarray:
    """(a - b) / (|a| + |b|) elementwise; 0 where both are 0, NaN where either is NaN."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.abs(a) + np.abs(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(den > 0, (a - b) / np.where(den > 0, den, 1.0), 0.0)
    return np.where(np.isfinite(a) & np.isfinite(b), c, np.nan)


def dissociation(frame: pd.DataFrame, type_column: str = "probe_type", additive: str = "additive",
                 routing: str = "routing", effects: tuple = ("semantic_effect", "acoustic_effect"),
                 resamples: int = 2000, seed: int = 0) -> dict:
    """The 2x2 double-dissociation summary of per-clip effects (module docstring).

    frame: one row per (clip_id, probe type) with the two effect columns (extra rows are ignored; a clip
    missing one of the two probe types is dropped).
    """
    for column in ("clip_id", type_column, *effects):
        if column not in frame.columns:
            raise ValueError(f"frame has no column {column!r}")
    semantic, acoustic = effects
    sub = frame[frame[type_column].isin([additive, routing])]
    wide = sub.pivot_table(index="clip_id", columns=type_column, values=list(effects), aggfunc="mean", dropna=False)
    clips = sorted(wide.index)
    result: dict = {"n_clips": len(clips), "cells": {}, "tests": {}}
    if not clips or (semantic, additive) not in wide.columns or (semantic, routing) not in wide.columns:
        result["double_dissociation"] = False
        return result
    wide = wide.loc[clips]
    for effect in effects:
        for kind in (additive, routing):
            values = wide[(effect, kind)].to_numpy()
            result["cells"][f"{kind}/{effect}"] = dict(summarize_values(values, resamples, seed),
                                                        per_clip=dict(zip(clips, values.tolist())))
        result["tests"][f"{additive}_vs_{routing}/{effect}"] = paired_wilcoxon(
            wide[(effect, additive)], wide[(effect, routing)])
    c_sem = contrast(wide[(semantic, additive)], wide[(semantic, routing)])
    c_ac = contrast(wide[(acoustic, additive)], wide[(acoustic, routing)])
    interaction = c_sem - c_ac
    result["contrast_semantic"] = summarize_values(c_sem, resamples, seed)
    result["contrast_acoustic"] = summarize_values(c_ac, resamples, seed)
    result["interaction"] = dict(summarize_values(interaction, resamples, seed),
                                 test=paired_wilcoxon(interaction, np.zeros_like(interaction)))
    cs, ca = result["contrast_semantic"], result["contrast_acoustic"]
    result["double_dissociation"] = bool(cs["ci_low"] > 0 and ca["ci_high"] < 0)
    return result


def by_group(frame: pd.DataFrame, column: str, fn: Callable[[pd.DataFrame], dict]) -> dict:
    """fn applied to each value of `column` (sorted), as {value: result}."""
    if column not in frame.columns:
        return {}
    return {str(g): fn(sub) for g, sub in sorted(frame.groupby(column), key=lambda kv: str(kv[0]))}


__all__ = ["bootstrap_ci", "by_group", "contrast", "dissociation", "paired_wilcoxon", "summarize_values"]
