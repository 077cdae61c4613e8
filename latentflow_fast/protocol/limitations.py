"""What a protocol run's numbers can and cannot support, generated from the run itself.

`limitations(summary)` returns short statements (topic, text) for summary.json, report.html and the CLI:

* sample size: n clips; the smallest p-value an exact two-sided Wilcoxon signed-rank test can give with n
  pairs (2 / 2^n: it cannot reach 0.05 below n = 6); how many distinct resamples a bootstrap over n clips
  has (C(2n-1, n): 3 for n = 2), so the "95% bootstrap CI" of a few clips is the spread of the data, not
  a calibrated interval;
* the stable / fast layer split: when k* (P3) is equal for every layer, which fallback produced the split,
  how many clips support it, and which experiments (P4, P6) build on it;
* timing: measured wall-time savings (P6) are single measurements on a possibly shared machine; a saving is
  called timing noise unless at least 3 clips all show it and their spread is smaller than it. The counted
  fraction of skipped self-attention calls is the exact figure.

* protocol v2: every definition is our reconstruction of a paper whose method is not public; P3's split
  when its criteria disagree (``split.no_split``: P4/P6's stable-vs-fast results then rest on a split the
  data do not support); how many clips the clean model separates (the second subset of every claim); the
  Holm family sizes of the scorecard.

Everything is derived from the summaries (no timings of this process), so a rerun writes the same text.
"""

from __future__ import annotations

import math

MIN_CLIPS_FOR_WILCOXON = 6  # smallest n whose exact two-sided signed-rank test can reach p < 0.05
MIN_CLIPS_FOR_TIMING = 3


def smallest_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p of an exact Wilcoxon signed-rank test with n non-zero paired differences."""
    return 1.0 if n <= 0 else min(1.0, 2.0 ** (1 - n))


def distinct_bootstrap_resamples(n: int) -> int:
    """Number of distinct multisets a bootstrap resample of n values can be: C(2n - 1, n)."""
    return math.comb(2 * n - 1, n) if n > 0 else 0


def _sample_size(summary: dict) -> list:
    n = len(summary.get("clips", []))
    out = []
    p_min = smallest_wilcoxon_p(n)
    text = (f"n = {n} clip{'s' if n != 1 else ''}. An exact two-sided Wilcoxon signed-rank test over {n} pairs "
            f"cannot give p below {p_min:.3g}")
    if n < MIN_CLIPS_FOR_WILCOXON:
        text += (f", so no p-value in this report can reach 0.05 (that needs >= {MIN_CLIPS_FOR_WILCOXON} clips); "
                 "read the p-values as descriptive only")
    out.append({"topic": "sample size", "text": text + "."})
    if n < 10:
        out.append({"topic": "sample size",
                    "text": f"Bootstrap intervals resample {n} clip{'s' if n != 1 else ''}: only "
                            f"{distinct_bootstrap_resamples(n)} distinct resamples exist, so a \"95% bootstrap CI\" "
                            "here is the spread of these clips, not a calibrated 95% confidence interval."})
    return out


def _layer_split(summary: dict) -> list:
    experiments = summary.get("experiments", {})
    p3 = (experiments.get("p3") or {}).get("summary") or {}
    users = [name.upper() for name in ("p4", "p6") if name in experiments]
    out = []
    if p3.get("kstar_median_by_layer"):
        kstar = {int(l): v for l, v in p3["kstar_median_by_layer"].items()}
        values = sorted(set(kstar.values()))
        if len(values) == 1:
            text = (f"P3: the convergence index k* is {values[0]:g} for every layer (every pooled map is within "
                    f"cosine tau = {p3.get('tau')} of its final map from evaluation {values[0]:g} on), so k* "
                    "separates no layers")
            basis = p3.get("split_basis")
            if basis == "kstar_centered":
                text += ("; the stable/fast split comes from the fallback rule on the centred (mean-subtracted) "
                         "k*")
            elif not p3.get("fast_layers"):
                text += "; with the centred k* tied as well, every layer counts as stable and none as fast"
            out.append({"topic": "layer split", "text": text + "."})
        clips, same = p3.get("clips"), p3.get("clips_with_same_split")
        if clips and same is not None and same < clips:
            out.append({"topic": "layer split",
                        "text": f"P3: the split stable {p3.get('stable_layers')} / fast {p3.get('fast_layers')} "
                                f"is what {same} of {clips} clips give on their own; the others split differently."})
        if users:
            out.append({"topic": "layer split",
                        "text": f"{' and '.join(users)} use this split (stable {p3.get('stable_layers')}, fast "
                                f"{p3.get('fast_layers')}); their stable-vs-fast results inherit its uncertainty."})
    for name in ("p4", "p6"):
        result = (experiments.get(name) or {}).get("summary") or {}
        source = str(result.get("split_source", ""))
        if source.startswith("fallback"):
            out.append({"topic": "layer split",
                        "text": f"{name.upper()}: P3 was not part of this run; the layer split comes from the "
                                f"{source} with k* {result.get('fallback_convergence_index')}."})
        if result and not result.get("fast_layers", [None]):
            out.append({"topic": "layer split",
                        "text": f"{name.upper()}: no fast layers, so its stable-vs-fast comparison is not defined."})
    return out


def _timing(summary: dict) -> list:
    p6 = ((summary.get("experiments", {}).get("p6") or {}).get("summary")) or {}
    entries = p6.get("lsac") or {}
    if not entries:
        return []
    noise, signal = [], []
    for name, entry in sorted(entries.items()):
        saved = entry.get("measured_wall_saved_fraction")
        ratios = [r for r in entry.get("wall_ratio_by_clip") or [] if r is not None]
        if saved is None:
            continue
        spread = (max(ratios) - min(ratios)) if ratios else math.inf
        consistent = bool(ratios) and (all(r < 1 for r in ratios) or all(r > 1 for r in ratios))
        if len(ratios) >= MIN_CLIPS_FOR_TIMING and consistent and spread < abs(saved):
            signal.append(f"{name} ({100 * saved:.0f}%)")
        else:
            noise.append(f"{name} ({100 * saved:.0f}%, spread over clips "
                         f"{'n/a' if not math.isfinite(spread) else f'{100 * spread:.0f}%'})")
    out = [{"topic": "timing",
            "text": "P6 wall times are single measurements of the sampling loop on this machine (other load "
                    "changes them between identical runs); the counted fraction of skipped self-attention "
                    "calls is the exact, reproducible saving."}]
    if noise:
        out.append({"topic": "timing",
                    "text": "Timing noise, not findings (fewer than 3 clips, clips disagreeing, or a spread "
                            "larger than the saving): measured wall-time savings of " + "; ".join(noise) + "."})
    if signal:
        out.append({"topic": "timing", "text": "Measured wall-time savings consistent over clips: "
                                               + "; ".join(signal) + "."})
    return out


def _protocol_v2(summary: dict) -> list:
    experiments = summary.get("experiments", {})
    out = [{"topic": "reconstruction",
            "text": "Only the paper's abstract (and the first paragraph of its introduction) is public: every probe, "
                    "effect and threshold here is our reconstruction, so each verdict holds on this reconstruction, "
                    "this model and these clips only."}]
    p3 = (experiments.get("p3") or {}).get("summary") or {}
    split = p3.get("split") or {}
    if split.get("no_split"):
        crits = "; ".join(f"{name}: stable {c.get('stable_layers')}, fast {c.get('fast_layers')}"
                          for name, c in (p3.get("criteria") or {}).items())
        users = [name.upper() for name in ("p4", "p6") if name in experiments]
        text = f"P3 gives no stable/fast split ({split.get('reason', '')}; {crits})"
        if users:
            text += (f"; {' and '.join(users)} results that compare stable with fast layers rest on a split the "
                     "data do not support")
        out.append({"topic": "layer split", "text": text + "."})
    for name in ("p0", "p1", "p3"):
        result = (experiments.get(name) or {}).get("summary") or {}
        if "separated_clips" in result:
            n = len(summary.get("clips", []))
            k = len(result["separated_clips"])
            out.append({"topic": "clips",
                        "text": f"The clean model separates {k} of {n} clips (SI-SDRi >= 3 dB); claims are reported "
                                f"on all clips and on these {k} (own Holm family)."})
            break
    card = summary.get("scorecard") or []
    if card:
        sizes = {}
        for c in card:
            sizes[c.get("holm_family", c.get("subset"))] = c.get("holm_family_size")
        out.append({"topic": "multiple testing",
                    "text": "Holm's correction over the testable claims of each family: "
                            + ", ".join(f"{k} ({v} tests)" for k, v in sizes.items()) + "."})
    return out


def limitations(summary: dict) -> list:
    """[{"topic", "text"}] for this run (see the module docstring)."""
    return _sample_size(summary) + _protocol_v2(summary) + _layer_split(summary) + _timing(summary)


__all__ = ["distinct_bootstrap_resamples", "limitations", "smallest_wilcoxon_p"]
