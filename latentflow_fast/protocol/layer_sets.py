"""P3's layer split as P4, P5 and P6 read it, and the layer sets they intervene on.

P3's summary (protocol v2) holds ``criteria: {name: {"kstar": {layer: k}, "stable_layers": [...],
"fast_layers": [...]}}`` and ``split: {"stable_layers", "fast_layers", "no_split": bool}`` (the split the
criteria agree on, or "no split" where they disagree), and top-level ``stable_layers`` / ``fast_layers``
= the agreed split or, under no split, P3's primary criterion's (``split_basis`` says which). The sets used
here ("stable" / "fast") are those top-level ones; under no split every summary of P4-P6 says so
(``no_split``, ``split_note``) and the claims' statements name the basis. A P3 summary of the earlier
format (top-level lists and ``kstar_median_by_layer`` only) is read as one criterion, "pooled_map".
Without P3 in the run there are no sets (``split_source`` says why); only "all" and single layers remain.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import ProtocolContext
from .clips import SEPARATED_DB, separated_clip_ids
from .stats import paired_claim


def _ints(values) -> list:
    return sorted(int(v) for v in values or ())


def p3_split(ctx: ProtocolContext) -> dict:
    """{"criteria": {name: {"kstar", "stable_layers", "fast_layers"}}, "stable_layers", "fast_layers",
    "no_split", "split_source"} from P3's summary in this run (module docstring)."""
    p3 = ctx.summaries.get("p3") or {}
    criteria = {}
    if isinstance(p3.get("criteria"), dict):
        for name, c in p3["criteria"].items():
            criteria[str(name)] = {"kstar": {int(l): int(round(float(k))) for l, k in (c.get("kstar") or {}).items()},
                                   "stable_layers": _ints(c.get("stable_layers")),
                                   "fast_layers": _ints(c.get("fast_layers"))}
        split = p3.get("split") or {}
        no_split = bool(split.get("no_split", False))
        # under no split: P3's primary criterion's sets (its top-level lists), flagged
        stable = _ints(p3.get("stable_layers") if no_split else split.get("stable_layers"))
        fast = _ints(p3.get("fast_layers") if no_split else split.get("fast_layers"))
        basis = str(p3.get("split_basis") or ("criteria agree" if not no_split else "primary criterion"))
        return {"criteria": criteria, "stable_layers": stable, "fast_layers": fast, "no_split": no_split,
                "split_basis": basis, "split_source": f"p3 ({basis})"}
    if "stable_layers" in p3 and "fast_layers" in p3:
        kstar = {int(l): int(round(float(k))) for l, k in (p3.get("kstar_median_by_layer") or {}).items()}
        criteria["pooled_map"] = {"kstar": kstar, "stable_layers": _ints(p3["stable_layers"]),
                                  "fast_layers": _ints(p3["fast_layers"])}
        stable, fast = _ints(p3["stable_layers"]), _ints(p3["fast_layers"])
        return {"criteria": criteria, "stable_layers": stable, "fast_layers": fast,
                "no_split": not (stable and fast), "split_basis": "pooled_map",
                "split_source": "p3 (single criterion)"}
    return {"criteria": {}, "stable_layers": [], "fast_layers": [], "no_split": True, "split_basis": "none",
            "split_source": "none: P3 was not part of this run"}


SET_KINDS = ("split", "criteria", "all", "single")


def group_sets(ctx: ProtocolContext, split: dict, kinds=("split", "criteria", "all")) -> dict:
    """name -> layers, for the `kinds` of SET_KINDS: "split" = "stable" / "fast" (the agreed split, or under
    no split P3's primary criterion's, see the module docstring); "criteria" = each criterion's stable and
    fast sets ("<criterion>:stable"), listed only where they differ from a set already listed; "all";
    "single" = every layer alone ("L3")."""
    unknown = [k for k in kinds if k not in SET_KINDS]
    if unknown:
        raise ValueError(f"layer set kinds: unknown {unknown}; known: {list(SET_KINDS)}")
    L = ctx.model.config.n_layers
    sets: dict = {}
    seen = set()

    def add(name, layers):
        layers = tuple(sorted(int(l) for l in layers))
        if layers and layers not in seen:
            sets[name] = layers
            seen.add(layers)

    if "split" in kinds:
        add("stable", split["stable_layers"])
        add("fast", split["fast_layers"])
    if "criteria" in kinds:
        for name, c in sorted(split["criteria"].items()):
            add(f"{name}:stable", c["stable_layers"])
            add(f"{name}:fast", c["fast_layers"])
    if "all" in kinds:
        add("all", range(L))
    if "single" in kinds:
        for l in range(L):
            add(f"L{l}", (l,))
    return sets


def self_sites(layers) -> tuple:
    return tuple(f"layers.{int(l)}.self_attn" for l in layers)


def warmup_starts(split: dict, layers, criterion: str | None, num_evaluations: int) -> tuple:
    """Cache start of each layer at its convergence point k*_l: under `criterion`, or (None) the latest
    k*_l over all criteria, i.e. the point where the layer has converged by every criterion (0 = unknown)."""
    names = [criterion] if criterion else sorted(split["criteria"])
    starts = []
    for l in layers:
        ks = [split["criteria"][n]["kstar"].get(int(l)) for n in names if n in split["criteria"]]
        ks = [k for k in ks if k is not None]
        starts.append(min(max(0, max(ks, default=0)), num_evaluations))
    return tuple(starts)


def separated_ids(ctx: ProtocolContext, clean_gains: pd.Series) -> list:
    """Clips the clean model separates: from P0/P1/P3's summaries when one ran, else from `clean_gains`
    (clip_id -> clean SI-SDRi in dB, as the experiment recorded it) with the same rule."""
    ids = separated_clip_ids(ctx)
    if ids is not None:
        return [str(i) for i in ids]
    return sorted(str(c) for c, g in clean_gains.items() if np.isfinite(g) and g >= SEPARATED_DB)


def split_note(split: dict) -> str | None:
    """The sentence P4-P6 summaries and claims carry when P3 reports no split."""
    if not split["no_split"]:
        return None
    return (f"no split: P3's criteria disagree (or P3 did not run); the stable / fast sets come from "
            f"{split['split_basis']}, a split the data do not support")


def claim(ctx: ProtocolContext, experiment: str, claim_id: str, text: str, per_clip: pd.Series, separated: list,
          units: str = "", floor: float | None = None, not_testable: str | None = None) -> list:
    """One scorecard claim on all clips and on the separated subset: `per_clip` (clip_id -> effect, sign
    positive = the paper's direction) evaluated by protocol.stats.paired_claim (exact Wilcoxon, BCa
    interval, smallest detectable effect, verdict before Holm; the report applies Holm per subset)."""
    per_clip = pd.to_numeric(per_clip, errors="coerce").dropna()
    out = []
    for subset, keep in (("all clips", None), ("separated", set(separated))):
        v = per_clip if keep is None else per_clip[[str(c) in keep for c in per_clip.index]]
        out.append(paired_claim(v.to_numpy(), claim_id=claim_id, claim=text, experiment=experiment, subset=subset,
                                clip_ids=[str(c) for c in v.index], units=units, floor=floor,
                                not_testable=not_testable, resamples=int(ctx.config.bootstrap)))
    return out
