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

Claims (protocol v2, issue 13)
------------------------------
Every claim of the scorecard is a paired, per-clip effect oriented so that positive = the direction the
paper's abstract predicts. `paired_claim(values, claim_id=..., claim=..., direction=+1, floor=None)`:

* test: two-sided exact Wilcoxon signed-rank test of the values against 0 (`exact_wilcoxon`). Zero values
  are dropped (Wilcoxon's convention). Without ties scipy's exact distribution is used; with tied |values|
  scipy's "exact" silently ignores the ties, so we enumerate the exact permutation (sign-flip) distribution
  of the tie-corrected rank sum ourselves (a small dynamic programme over doubled mid-ranks, exact for any n).
* interval: BCa bootstrap 95% interval of the mean (scipy.stats.bootstrap, seeded, `resamples` draws);
  degenerate samples give the point itself (one value, or all equal) or (min, max) for two values.
* mde, the smallest effect the test could detect at this n: the mean shift, in the values' own units,
  that the Wilcoxon test detects with 80% power at two-sided alpha, from the normal approximation with the
  Wilcoxon test's asymptotic relative efficiency 3/pi against the t test:
  ``mde = (z_{1-alpha/2} + z_{0.80}) * sd / sqrt(n * 3/pi)`` (sd = sample standard deviation), and
  ``mde_sd`` = the same in units of sd. If even the most extreme sign pattern of n clips cannot reach
  alpha (``2 / 2**n > alpha``, i.e. n < 6 at alpha = 0.05) the claim is not testable (power). Exact zeros
  do not make a claim untestable: with n >= 6 clips, mostly zero effects are "not supported".
* pre-Holm verdict:
  - "not testable" with reason "model" (the caller says the model cannot express the claim), "power" (n too
    small, above) or "floor" (a noise floor is given and the whole interval lies inside [-floor, floor]:
    the effect cannot be told from measurement noise);
  - "supported" if p < alpha and the rank sum leans positive (T+ > T-), "opposite" if p < alpha and it leans
    negative, else "not supported" (an effect in the paper's direction was not found).
* `holm(claims)`: Holm's step-down adjustment over the testable claims' p values (p_holm), and the final
  verdict: a significant pre-Holm verdict that loses significance after the adjustment becomes
  "not supported" (noted in ``verdict_note``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

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




VERDICTS = ("supported", "not supported", "opposite", "not testable")
NOT_TESTABLE_REASONS = ("power", "model", "floor")
POWER = 0.80


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def _signed_rank_distribution(doubled_ranks: np.ndarray) -> np.ndarray:
    """counts[s] = number of the 2**n sign patterns whose positive doubled-rank sum is s (exact, ties allowed).

    Doubled mid-ranks are integers, so the distribution is a polynomial product prod_i (1 + x**r_i); counts
    are kept as Python ints via object arrays only when they could overflow float64's exact range.
    """
    total = int(doubled_ranks.sum())
    use_object = doubled_ranks.size > 50  # 2**n beyond float64's 2**53 exact integers
    counts = np.zeros(total + 1, dtype=object if use_object else np.float64)
    counts[0] = 1
    for r in doubled_ranks.astype(np.int64):
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[: counts.size - r]
        counts = counts + shifted
    return counts


def exact_wilcoxon(values) -> dict:
    """Two-sided exact Wilcoxon signed-rank test of `values` (paired differences) against 0.

    Returns n (finite values), n_nonzero, statistic (T+ = sum of the ranks of the positive values, mid-ranks
    for ties), r_minus, p_value and method ("scipy-exact" without ties, "exact-ties" with tied |values|,
    "none" when nothing is left: p = 1 when every value is 0, NaN when there is no value).
    """
    v = _finite(values)
    d = v[v != 0]
    out = {"n": int(v.size), "n_nonzero": int(d.size)}
    if d.size == 0:
        return dict(out, statistic=0.0, r_minus=0.0, p_value=1.0 if v.size else math.nan, method="none")
    ranks = _scipy_stats.rankdata(np.abs(d))  # mid-ranks
    r_plus = float(ranks[d > 0].sum())
    r_minus = float(ranks[d < 0].sum())
    out.update(statistic=r_plus, r_minus=r_minus)
    if np.unique(np.abs(d)).size == d.size:
        res = _scipy_stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="exact")
        # scipy's statistic is min(T+, T-); the p value is that of the same exact null distribution
        return dict(out, p_value=float(min(1.0, res.pvalue)), method="scipy-exact")
    doubled = np.rint(2 * ranks).astype(np.int64)
    counts = _signed_rank_distribution(doubled)
    total = float(sum(counts)) if counts.dtype == object else float(counts.sum())
    centre = doubled.sum() / 2.0  # mean of the doubled T+ under the null
    observed = abs(2 * r_plus - centre)
    sums = np.arange(counts.size)
    extreme = np.abs(sums - centre) >= observed - 1e-9
    p = float(sum(counts[extreme])) / total
    return dict(out, p_value=float(min(1.0, p)), method="exact-ties")


def bca_interval(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """BCa bootstrap interval of the mean (scipy.stats.bootstrap); the point itself when degenerate."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = _finite(values)
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size < 3 or np.all(v == v[0]):
        # the jackknife acceleration is undefined (n < 3 or zero spread); the mean is all there is
        m = float(v.mean())
        return (m, m) if v.size == 1 or np.all(v == v[0]) else (float(v.min()), float(v.max()))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-degenerate BCa; NaN ends are handled below
        res = _scipy_stats.bootstrap((v,), np.mean, n_resamples=int(resamples), confidence_level=level,
                                     method="BCa", random_state=np.random.Generator(np.random.PCG64(seed)),
                                     vectorized=True)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = bootstrap_ci(v, resamples, seed, level)  # BCa failed (e.g. all resamples equal): percentile
    return (lo, hi)


def min_attainable_p(n_nonzero: int) -> float:
    """Smallest two-sided exact Wilcoxon p value with n nonzero values: all signs equal, 2 / 2**n."""
    return 1.0 if n_nonzero <= 0 else min(1.0, 2.0 / 2.0 ** n_nonzero)


def minimum_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = POWER) -> tuple[float, float]:
    """(mde, mde_sd): the mean shift detected with `power` at two-sided `alpha` (module docstring)."""
    if n < 1:
        return (math.nan, math.nan)
    z = _scipy_stats.norm.ppf(1 - alpha / 2) + _scipy_stats.norm.ppf(power)
    mde_sd = float(z / math.sqrt(n * 3.0 / math.pi))
    return (mde_sd * sd if math.isfinite(sd) else math.nan, mde_sd)


def paired_claim(values, *, claim_id: str, claim: str, direction: int = +1, floor: Optional[float] = None,
                 not_testable: Optional[str] = None, alpha: float = 0.05, resamples: int = 2000, seed: int = 0,
                 units: str = "", test: str = "", **extra) -> dict:
    """Evaluate one scorecard claim from per-clip effects (module docstring, "Claims").

    values: per-clip effects; multiplied by `direction` (+1 or -1) so positive = the paper's direction.
    floor: noise floor in the values' units (None = no floor). not_testable: a reason ("model", or a
    sentence starting with it) that overrides the test. extra: kept in the result (e.g. subset, experiment).
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if floor is not None and not (isinstance(floor, (int, float)) and floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"floor must be None or a finite number >= 0, got {floor!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    raw = np.asarray(values, dtype=np.float64).reshape(-1)
    v = direction * _finite(raw)
    test_result = exact_wilcoxon(v)
    n = int(v.size)
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    mde, mde_sd = minimum_detectable_effect(n, sd, alpha)
    lo, hi = bca_interval(v, resamples, seed)
    effect = float(v.mean()) if n else math.nan
    result = {
        "id": str(claim_id), "claim": str(claim), "direction": int(direction), "units": units,
        "test": test or "exact two-sided Wilcoxon signed-rank vs 0; BCa 95% CI of the mean",
        "n": n, "n_nonzero": test_result["n_nonzero"], "statistic": test_result["statistic"],
        "p": test_result["p_value"], "p_method": test_result["method"], "effect": effect,
        "median": float(np.median(v)) if n else math.nan, "ci_low": lo, "ci_high": hi,
        "mde": mde, "mde_sd": mde_sd, "min_p": min_attainable_p(test_result["n_nonzero"]),
        "floor": floor, "alpha": alpha, "values": [float(x) for x in v],
    }
    result.update(extra)
    reason = None
    if not_testable:
        reason = str(not_testable)
    elif n == 0:
        reason = "power: no finite per-clip value"
    elif min_attainable_p(n) > alpha:
        # judged on n, not on the nonzero count: many exact zeros are evidence of no effect, not of low power
        reason = f"power: {n} clips; the smallest attainable p is {min_attainable_p(n):.3g} > {alpha}"
    elif floor is not None and -floor <= lo and hi <= floor:
        reason = f"floor: the 95% interval [{lo:.3g}, {hi:.3g}] lies inside the noise floor +-{floor:.3g}"
    if reason is not None:
        result.update(verdict_pre_holm="not testable", reason=reason)
    elif result["p"] < alpha:
        lean = test_result["statistic"] - test_result["r_minus"]
        result.update(verdict_pre_holm="supported" if lean > 0 else "opposite", reason="")
    else:
        result.update(verdict_pre_holm="not supported", reason="")
    return result


def evaluate_claim(entry: dict, **defaults) -> dict:
    """An already-evaluated paired_claim dict unchanged, or {id, claim, values, direction, ...} evaluated."""
    if not isinstance(entry, dict):
        raise TypeError(f"a claim must be a dict, got {type(entry).__name__}")
    if "verdict_pre_holm" in entry:
        return dict(entry)
    for key in ("id", "claim", "values"):
        if key not in entry:
            raise ValueError(f"claim {entry.get('id', '?')!r} has no {key!r}")
    kwargs = {k: v for k, v in entry.items() if k not in ("id", "claim", "values")}
    return paired_claim(entry["values"], claim_id=entry["id"], claim=entry["claim"], **{**defaults, **kwargs})


def holm(claims: list, alpha: float = 0.05) -> list:
    """Holm step-down adjustment over the testable claims; adds p_holm, verdict and verdict_note (copies)."""
    out = [evaluate_claim(c) for c in claims]
    testable = [i for i, c in enumerate(out) if c["verdict_pre_holm"] != "not testable" and math.isfinite(c["p"])]
    m = len(testable)
    order = sorted(testable, key=lambda i: out[i]["p"])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * out[i]["p"]))  # monotone step-down
        out[i]["p_holm"] = running
    for c in out:
        c.setdefault("p_holm", math.nan)
        c["holm_family_size"] = m
        c["verdict"] = c["verdict_pre_holm"]
        c["verdict_note"] = ""
        if c["verdict_pre_holm"] in ("supported", "opposite") and not c["p_holm"] < alpha:
            c["verdict"] = "not supported"
            c["verdict_note"] = f"{c['verdict_pre_holm']} before the Holm correction (p = {c['p']:.3g}) only"
    return out


__all__ = ["bca_interval", "bootstrap_ci", "by_group", "contrast", "dissociation", "evaluate_claim",
           "exact_wilcoxon", "holm", "min_attainable_p", "minimum_detectable_effect", "paired_claim",
           "paired_wilcoxon", "summarize_values", "VERDICTS"]
