"""P5 temporal scaffold: how local self-attention is, how much it looks at the target, whether it follows the
target's on/off segmentation, and when that settles -- all from ONE clean trajectory per clip.

The clip's clean trajectory (`ProtocolContext.clean_trajectory`, shared with P4 and P6) carries per-evaluation
reductions (`probe.Reduction`) of the exact self-attention map p [H, T, T] of every layer: the map is
materialised at one site and evaluation, reduced to the numbers below and dropped.

* ``locality`` = mean over heads of sum_ij p_ij |i - j| / T: the expected query-key distance in latent
  frames (uniform attention over T frames gives about T/3); ``locality_fraction`` = locality / T.
* ``active_mass`` = mean over heads and queries of sum_{j in A} p_ij, A = latent frames where the target is
  active (clip.active_frames); ``active_fraction`` = |A| / T (what uniform attention would give);
  ``active_excess`` = active_mass - active_fraction.
* ``segment_affinity`` (the segmentation cue): frames split into the target's active part A and the rest;
  mean over heads and queries i of the mass on keys in i's own part, minus what uniform attention would
  put there (mean over i of |part(i)| / T). 0 = attention blind to the target's on/off segmentation,
  > 0 = attention stays inside the segment. NaN when A is empty or every frame.
* Settling: the evaluation from which a curve stays within 5% of its range (max - min over evaluations) of
  its final value. A curve whose range is below SETTLE_MIN_RANGE (absolute, per measure) is flat: its
  settle index is NaN (noise-level wiggles on a flat curve would otherwise give an arbitrary index).
* Layer groups: ``depth_group`` (early = first half of the layers, late = the rest) and
  ``convergence_group`` (stable / fast of P3's agreed split, "none" under no split or without P3).
* Claims (the abstract: "the model attenuates temporal segmentation cues to keep the flow stable"), per
  clip, positive = the paper's direction:
  - ``P5.segmentation_over_evaluations``: segment affinity averaged over layers, mean over the
    first quarter of the evaluations minus mean over the last quarter;
  - ``P5.segmentation_with_depth``: segment affinity averaged over evaluations, early layers
    minus late layers. Each on all clips and on the separated subset (protocol.stats.paired_claim).

Segmentation cue in the output (rows with layer = -1): boundary contrast of an energy envelope at the target's
on/off boundaries. For a boundary at sample b (onsets and offsets at least 50 ms inside the clip), level
L = 10 log10(mean x^2 + floor) over 40 ms on each side, leaving a 10 ms guard around b (the sources' fade
length); contrast = L(inside the target interval) - L(outside), averaged over the target's boundaries;
floor = 1e-6 x the signal's mean power over the target interval (so contrast is capped near 60 dB).
Reported for the final output (``output_contrast_db``), the reference stem (``reference_contrast_db``), the
mixture (``mixture_contrast_db``) and, per evaluation k, for the one-step prediction of the output
x1 = x_k + (1 - t_k) v_k decoded (``predicted_contrast_db``). Clips without stems/intervals give NaN.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..probe import Reduction
from .base import Experiment, ProtocolContext
from .effects import clip_columns, json_ready
from .clips import separation_gain_db
from .layer_sets import claim, p3_split, separated_ids
from .p1_pathways import save_figure

SELF_SITES = "layers.*.self_attn"
SETTLE_TOLERANCE = 0.05
SETTLE_MIN_RANGE = {"locality_fraction": 0.005, "active_mass": 0.005, "segment_affinity": 0.005,
                    "predicted_contrast_db": 0.5}
MEASURES = ("locality", "active_mass", "segment_affinity")  # the reduction's vector, in this order
GUARD_S, SPAN_S = 0.010, 0.040


def locality(p: torch.Tensor) -> float:
    """mean_h sum_ij p[h,i,j] |i-j| / T for maps [H, T, T]."""
    T = p.shape[-1]
    idx = torch.arange(T, dtype=torch.float64)
    distance = (idx[:, None] - idx[None, :]).abs()
    return float((p.double() * distance).sum(dim=(-2, -1)).mean() / p.shape[-2])


def active_mass(p: torch.Tensor, active: torch.Tensor) -> float:
    """mean over heads and queries of the attention mass on the keys where `active` is True."""
    return float(p.double()[..., active].sum(-1).mean())


def segment_affinity(p: torch.Tensor, active: torch.Tensor) -> float:
    """Mass on keys in the query's own part (A or not A) minus uniform attention's (module docstring)."""
    a = active.bool()
    n = int(a.sum())
    if n == 0 or n == a.numel():
        return math.nan
    p = p.double()
    same = torch.where(a, p[..., a].sum(-1), p[..., ~a].sum(-1))  # [H, T]: mass on the query's own part
    uniform = torch.where(a, torch.tensor(n / a.numel()), torch.tensor(1 - n / a.numel())).double()
    return float((same - uniform).mean())


def scaffold_reductions(pclip) -> list:
    """The P5 reduction of one clip: [locality, active_mass, segment_affinity] per site and evaluation."""
    active = pclip.active_frames

    def reduce(p, site, evaluation):
        if active is None:
            return torch.tensor([locality(p), math.nan, math.nan], dtype=torch.float64)
        if active.numel() != p.shape[-1]:
            raise ValueError(f"clip {pclip.clip.clip_id}: active_frames has {active.numel()} frames, "
                             f"the model uses {p.shape[-1]}")
        return torch.tensor([locality(p), active_mass(p, active), segment_affinity(p, active)], dtype=torch.float64)

    return [Reduction("p5", SELF_SITES, reduce)]


def settle_index(values, tolerance: float = SETTLE_TOLERANCE, min_range: float = 0.0) -> float:
    """First k from which |v[k'] - v[-1]| <= tolerance * (max - min) for every k' >= k; NaN when the curve
    is flat (max - min < min_range) or not finite."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all() or (v.max() - v.min()) < min_range:
        return math.nan
    bound = tolerance * (v.max() - v.min())
    k = v.size - 1
    while k > 0 and abs(v[k - 1] - v[-1]) <= bound:
        k -= 1
    return float(k)


def boundaries_of(interval, num_samples: int, sample_rate: int) -> list[tuple[int, str]]:
    """The target's onset/offset samples that lie at least guard + span inside the clip."""
    margin = int(round((GUARD_S + SPAN_S) * sample_rate))
    start, end = interval
    out = []
    if start >= margin and start + margin <= num_samples:
        out.append((start, "onset"))
    if end >= margin and end + margin <= num_samples:
        out.append((end, "offset"))
    return out


def boundary_contrast(wave, boundaries, interval, sample_rate: int) -> float:
    """Mean dB contrast (inside - outside the target interval) at `boundaries` (module docstring)."""
    x = torch.as_tensor(wave, dtype=torch.float64).reshape(-1)
    if not boundaries or interval[1] <= interval[0]:
        return math.nan
    guard, span = int(round(GUARD_S * sample_rate)), int(round(SPAN_S * sample_rate))
    floor = 1e-6 * float((x[interval[0]:interval[1]] ** 2).mean()) + 1e-20

    def level(a, b):
        return 10.0 * math.log10(float((x[a:b] ** 2).mean()) + floor)

    contrasts = []
    for b, kind in boundaries:
        before = level(b - guard - span, b - guard)
        after = level(b + guard, b + guard + span)
        contrasts.append(after - before if kind == "onset" else before - after)
    return float(np.mean(contrasts))


def scaffold_rows(ctx: ProtocolContext, pclip) -> list[dict]:
    """All P5 rows of one clip, read from the clip's one clean trajectory."""
    clean = ctx.clean_trajectory(pclip)
    reduced = clean.reductions["p5"]  # site -> [E, 3]
    num_layers = ctx.engine.model.config.n_layers
    split = p3_split(ctx)
    E, T = clean.num_evaluations, clean.states[0].shape[1]
    active = pclip.active_frames
    columns = clip_columns(pclip)
    fraction = float(active.double().mean()) if active is not None else math.nan
    rows = []
    for site, values in sorted(reduced.items(), key=lambda kv: int(kv[0].split(".")[1])):
        layer = int(site.split(".")[1])
        curves = {m: values[:, i].tolist() for i, m in enumerate(MEASURES)}
        settle = {"locality_settle": settle_index(np.asarray(curves["locality"]) / T,
                                                  min_range=SETTLE_MIN_RANGE["locality_fraction"]),
                  "active_mass_settle": settle_index(curves["active_mass"], min_range=SETTLE_MIN_RANGE["active_mass"]),
                  "segment_affinity_settle": settle_index(curves["segment_affinity"],
                                                          min_range=SETTLE_MIN_RANGE["segment_affinity"])}
        group = ("none" if split["no_split"] else
                 "stable" if layer in split["stable_layers"] else "fast" if layer in split["fast_layers"] else "none")
        for k in range(E):
            rows.append({
                "clip_id": pclip.clip.clip_id, "probe_id": f"l{layer:03d}-e{k:03d}", "layer": layer, "evaluation": k,
                "t": float(clean.schedule[k][1]), "locality": curves["locality"][k],
                "locality_fraction": curves["locality"][k] / T, "active_mass": curves["active_mass"][k],
                "active_fraction": fraction, "active_excess": curves["active_mass"][k] - fraction,
                "segment_affinity": curves["segment_affinity"][k], **settle,
                "depth_group": "early" if layer < num_layers / 2 else "late", "convergence_group": group, **columns,
            })
    rows.extend(_envelope_rows(ctx, pclip, clean, columns))
    return rows


def _envelope_rows(ctx, pclip, clean, columns) -> list[dict]:
    interval = pclip.meta.get("target_interval")
    sr = pclip.clip.sample_rate
    n = pclip.clip.mixture.shape[-1]
    bounds = boundaries_of(interval, n, sr) if interval is not None else []
    contrast = (lambda w: boundary_contrast(w, bounds, interval, sr)) if bounds else (lambda w: math.nan)
    model = ctx.engine.model
    predicted = []
    for k, (_, t) in enumerate(clean.schedule):
        x1 = clean.states[k] + (1.0 - t) * clean.velocities[k]
        target, _ = model.decode(x1, clean.inputs)
        predicted.append(contrast(target.reshape(-1)))
    output = contrast(clean.target)
    reference = contrast(pclip.clip.target) if pclip.clip.target is not None else math.nan
    rows = [{"clip_id": pclip.clip.clip_id, "probe_id": f"env-e{k:03d}", "layer": -1, "evaluation": k,
             "t": float(clean.schedule[k][1]), "predicted_contrast_db": value, **columns}
            for k, value in enumerate(predicted)]
    rows.append({"clip_id": pclip.clip.clip_id, "probe_id": "env-final", "layer": -1, "evaluation": len(predicted),
                 "t": 1.0, "output_contrast_db": output, "reference_contrast_db": reference,
                 "mixture_contrast_db": contrast(pclip.clip.mixture), "num_boundaries": len(bounds),
                 "clean_si_sdri_db": separation_gain_db(clean.target, pclip),
                 "predicted_contrast_settle": settle_index(predicted, min_range=SETTLE_MIN_RANGE["predicted_contrast_db"]), **columns})
    return rows


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p5")
    done = {c for c, _ in store.done_keys()}
    for pclip in ctx.clips:
        if pclip.clip.clip_id not in done:  # a clip's rows are written in one shard: present = complete
            store.write(scaffold_rows(ctx, pclip))
    df = store.load()
    return df.sort_values(["clip_id", "layer", "evaluation", "probe_id"], kind="stable").reset_index(drop=True) \
        if not df.empty else df


SETTLE_COLUMN = {"locality": "locality_settle", "active_mass": "active_mass_settle",
                 "segment_affinity": "segment_affinity_settle"}


def _group_curves(layers: pd.DataFrame, column: str) -> dict:
    out = {}
    for group_column in ("depth_group", "convergence_group"):
        for group, sub in layers.groupby(group_column):
            settle = sub.groupby(["clip_id", "layer"])[SETTLE_COLUMN[column]].first()
            out[f"{group_column}:{group}"] = {
                "curve": sub.groupby("evaluation")[column].mean().tolist(),
                # over (clip, layer) curves that are not flat; flat ones are counted, not given an index
                "mean_settle_evaluation": float(settle.mean()) if settle.notna().any() else None,
                "flat_curves": int(settle.isna().sum()), "curves": int(settle.size),
            }
    return out


def segmentation_claims(ctx: ProtocolContext, layers: pd.DataFrame, separated: list) -> list:
    """The two claims of the module docstring, from the segment-affinity rows."""
    E = int(layers["evaluation"].max()) + 1
    quarter = max(1, E // 4)
    per_clip_eval = layers.groupby(["clip_id", "evaluation"])["segment_affinity"].mean().unstack("evaluation")
    over_time = per_clip_eval.iloc[:, :quarter].mean(axis=1) - per_clip_eval.iloc[:, -quarter:].mean(axis=1)
    no_segments = None if over_time.notna().any() else \
        "model: no clip has a target that is active on some but not all latent frames"
    out = claim(ctx, "p5", "P5.segmentation_over_evaluations",
                "self-attention follows the target's on/off segmentation less as sampling proceeds (segment "
                f"affinity, mean over layers: first {quarter} minus last {quarter} evaluations)", over_time,
                separated, units="attention mass", not_testable=no_segments)
    by_depth = layers.groupby(["clip_id", "depth_group"])["segment_affinity"].mean().unstack("depth_group")
    if {"early", "late"} <= set(by_depth.columns):
        depth, reason = by_depth["early"] - by_depth["late"], no_segments
    else:
        depth, reason = pd.Series(dtype=float), "model: a single layer has no depth"
    out += claim(ctx, "p5", "P5.segmentation_with_depth",
                 "deeper self-attention layers follow the target's on/off segmentation less (segment affinity, "
                 "mean over evaluations: early minus late layers)", depth, separated, units="attention mass",
                 not_testable=reason)
    return out


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    if df.empty:
        return {"clips": 0}
    layers = df[df["layer"] >= 0]
    env = df[df["probe_id"] == "env-final"]
    predicted = df[df["probe_id"].str.startswith("env-e")]
    last = layers[layers["evaluation"] == layers["evaluation"].max()]
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "settle_min_range": SETTLE_MIN_RANGE,
        "locality": _group_curves(layers, "locality"),
        "active_mass": _group_curves(layers, "active_mass"),
        "segment_affinity": _group_curves(layers, "segment_affinity"),
        "active_excess_final_by_layer": last.groupby("layer")["active_excess"].mean().to_dict(),
        "segment_affinity_by_layer": layers.groupby("layer")["segment_affinity"].mean().to_dict(),
        "locality_settle_by_layer": layers.groupby("layer")["locality_settle"].mean().to_dict(),
        "active_mass_settle_by_layer": layers.groupby("layer")["active_mass_settle"].mean().to_dict(),
        "boundary_contrast_db": {
            "output": float(env["output_contrast_db"].mean()),
            "reference": float(env["reference_contrast_db"].mean()),
            "mixture": float(env["mixture_contrast_db"].mean()),
            "clips_with_boundaries": int((env["num_boundaries"] > 0).sum()),
            "predicted_by_evaluation": predicted.groupby("evaluation")["predicted_contrast_db"].mean().tolist(),
            "predicted_settle_mean": float(env["predicted_contrast_settle"].mean()),
            "predicted_flat_clips": int(env["predicted_contrast_settle"].isna().sum()),
        },
    }
    gains = env.set_index("clip_id")["clean_si_sdri_db"] if "clean_si_sdri_db" in env else pd.Series(dtype=float)
    summary["separated_clips"] = separated_ids(ctx, gains)
    summary["claims"] = segmentation_claims(ctx, layers, summary["separated_clips"])
    return json_ready(summary)


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return []
    layers = df[df["layer"] >= 0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, column, label in ((axes[0], "locality", "locality (expected |i-j|, frames)"),
                              (axes[1], "active_excess", "attention mass on target frames - uniform"),
                              (axes[2], "segment_affinity", "segment affinity (segmentation cue)")):
        for (group, style) in (("early", "-"), ("late", "--")):
            for conv, color in (("stable", "C0"), ("fast", "C3"), ("none", "C7")):
                sub = layers[(layers["depth_group"] == group) & (layers["convergence_group"] == conv)]
                if sub.empty:
                    continue
                curve = sub.groupby("evaluation")[column].mean()
                ax.plot(curve.index, curve.values, style, color=color, label=f"{group} / {conv}")
        ax.set_xlabel("evaluation")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend(fontsize=7)
    pred = df[df["probe_id"].str.startswith("env-e")].groupby("evaluation")["predicted_contrast_db"].mean()
    env = summary.get("boundary_contrast_db", {})
    axes[3].plot(pred.index, pred.values, "o-", color="C2", label="predicted output x1(k)")
    for key, color in (("reference", "k"), ("mixture", "C7"), ("output", "C2")):
        if env.get(key) is not None:
            axes[3].axhline(env[key], color=color, ls=":", label=f"{key} (final)" if key == "output" else key)
    axes[3].set_xlabel("evaluation")
    axes[3].set_ylabel("boundary contrast (dB)")
    axes[3].set_title("energy contrast at target on/off boundaries")
    axes[3].legend(fontsize=7)
    fig.suptitle("P5: temporal scaffold over evaluations (mean over clips)")
    path = save_figure(fig, Path(out_dir) / "p5_scaffold.png")
    caption = ("P5: self-attention locality (left) and excess attention mass on frames where the target is active "
               "and the segment affinity (third) per evaluation, by layer group (solid = early, dashed = late layers; blue = stable, red = fast "
               "by P3's rule); right: dB energy contrast at the target's onsets/offsets of the one-step predicted "
               "output at each evaluation, against the final output, the reference stem and the mixture.")
    return [(path, caption)]


EXPERIMENT = Experiment(name="p5", title="P5 Temporal scaffold (locality, target attention, boundaries)",
                        run=run, summarize=summarize, figures=figures)
