"""P5 temporal scaffold: how local self-attention is, how much it looks at the target, and when that settles.

Per clip, layer l and evaluation k, from the exact self-attention maps p [H, T, T] of the clean run
(materialised with MapRequest; computed in float64 by the reference, in chunks of evaluations):

* ``locality`` = mean over heads of sum_ij p_ij |i - j| / T: the expected query-key distance in latent
  frames (uniform attention over T frames gives about T/3); ``locality_fraction`` = locality / T.
* ``active_mass`` = mean over heads and queries of sum_{j in A} p_ij, A = latent frames where the target is
  active (clip.active_frames); ``active_fraction`` = |A| / T (what uniform attention would give);
  ``active_excess`` = active_mass - active_fraction.
* Settling: the evaluation from which a curve stays within 5% of its range (max - min over evaluations) of
  its final value (``locality_settle``, ``active_mass_settle``); a flat curve settles at 0.
* Layer groups: ``depth_group`` (early = first half of the layers, late = the rest) and
  ``convergence_group`` (stable / fast by P3's rule, fallback included, on this clip's k*_l, from the same
  run's captures).

Segmentation cue (rows with layer = -1): boundary contrast of an energy envelope at the target's on/off
boundaries. For a boundary at sample b (onsets and offsets at least 50 ms inside the clip), level
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

from ..probe import MapRequest, expand_sites
from .base import Experiment, ProtocolContext
from .effects import clip_columns, json_ready
from .p1_pathways import save_figure
from .p3_convergence import SELF_SITES, convergence_trajectory, layer_convergence, stable_fast

SETTLE_TOLERANCE = 0.05
MAP_MEMORY_BYTES = 256 * 2**20
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


def settle_index(values, tolerance: float = SETTLE_TOLERANCE) -> int:
    """First k from which |v[k'] - v[-1]| <= tolerance * (max - min) for every k' >= k."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        return -1
    bound = tolerance * (v.max() - v.min())
    k = v.size - 1
    while k > 0 and abs(v[k - 1] - v[-1]) <= bound:
        k -= 1
    return int(k)


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


def _map_chunks(num_sites: int, heads: int, frames: int, evaluations: int) -> list[tuple]:
    per_evaluation = max(1, num_sites * heads * frames * frames * 4)
    size = max(1, min(evaluations, MAP_MEMORY_BYTES // per_evaluation))
    return [tuple(range(s, min(s + size, evaluations))) for s in range(0, evaluations, size)]


def scaffold_rows(ctx: ProtocolContext, pclip) -> list[dict]:
    """All P5 rows of one clip."""
    cfg, engine = ctx.config, ctx.engine
    sites = expand_sites(SELF_SITES, engine.sites)
    num_layers = engine.model.config.n_layers
    clean = convergence_trajectory(ctx, pclip)  # shared with P3 (same cached run)
    kstar_table = layer_convergence(clean, cfg.tau)
    kstar = kstar_table.groupby("layer")["kstar"].first().to_dict()
    stable, _, _ = stable_fast(kstar, kstar_table.groupby("layer")["kstar_centered"].first().to_dict())
    E, T = clean.num_evaluations, clean.states[0].shape[1]
    active = pclip.active_frames
    if active is not None and active.numel() != T:
        raise ValueError(f"clip {pclip.clip.clip_id}: active_frames has {active.numel()} frames, model uses {T}")
    per_layer = {int(s.split(".")[1]): {"locality": [], "active_mass": []} for s in sites}
    for chunk in _map_chunks(len(sites), engine.num_heads, T, E):
        traj = engine.trajectory(pclip.clip, steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed,
                                 cache_heads=(), maps=[MapRequest(site=s, evaluations=chunk) for s in sites])
        for site in sites:
            layer = int(site.split(".")[1])
            for k in chunk:
                p = traj.maps[(site, k)]
                per_layer[layer]["locality"].append(locality(p))
                per_layer[layer]["active_mass"].append(active_mass(p, active) if active is not None else math.nan)
        del traj
    columns = clip_columns(pclip)
    fraction = float(active.double().mean()) if active is not None else math.nan
    rows = []
    for layer, curves in per_layer.items():
        loc_settle = settle_index(curves["locality"])
        mass_settle = settle_index(curves["active_mass"])
        for k in range(E):
            rows.append({
                "clip_id": pclip.clip.clip_id, "probe_id": f"l{layer:03d}-e{k:03d}", "layer": layer, "evaluation": k,
                "t": float(clean.schedule[k][1]), "locality": curves["locality"][k],
                "locality_fraction": curves["locality"][k] / T, "active_mass": curves["active_mass"][k],
                "active_fraction": fraction, "active_excess": curves["active_mass"][k] - fraction,
                "locality_settle": loc_settle, "active_mass_settle": mass_settle, "kstar": int(kstar[layer]),
                "depth_group": "early" if layer < num_layers / 2 else "late",
                "convergence_group": "stable" if layer in stable else "fast", **columns,
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
                 "predicted_contrast_settle": settle_index(predicted), **columns})
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


def _group_curves(layers: pd.DataFrame, column: str) -> dict:
    out = {}
    for group_column in ("depth_group", "convergence_group"):
        for group, sub in layers.groupby(group_column):
            per_clip_layer = sub.groupby(["clip_id", "layer"])
            settle_col = "locality_settle" if column == "locality" else "active_mass_settle"
            out[f"{group_column}:{group}"] = {
                "curve": sub.groupby("evaluation")[column].mean().tolist(),
                "mean_settle_evaluation": float(per_clip_layer[settle_col].first().mean()),
            }
    return out


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    if df.empty:
        return {"clips": 0}
    layers = df[df["layer"] >= 0]
    env = df[df["probe_id"] == "env-final"]
    predicted = df[df["probe_id"].str.startswith("env-e")]
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "locality": _group_curves(layers, "locality"),
        "active_mass": _group_curves(layers, "active_mass"),
        "active_excess_final_by_layer": layers[layers["evaluation"] == layers["evaluation"].max()]
        .groupby("layer")["active_excess"].mean().to_dict(),
        "locality_settle_by_layer": layers.groupby("layer")["locality_settle"].mean().to_dict(),
        "active_mass_settle_by_layer": layers.groupby("layer")["active_mass_settle"].mean().to_dict(),
        "boundary_contrast_db": {
            "output": float(env["output_contrast_db"].mean()),
            "reference": float(env["reference_contrast_db"].mean()),
            "mixture": float(env["mixture_contrast_db"].mean()),
            "clips_with_boundaries": int((env["num_boundaries"] > 0).sum()),
            "predicted_by_evaluation": predicted.groupby("evaluation")["predicted_contrast_db"].mean().tolist(),
            "predicted_settle_mean": float(env["predicted_contrast_settle"].replace(-1, np.nan).mean()),
        },
    }
    return json_ready(summary)


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return []
    layers = df[df["layer"] >= 0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, column, label in ((axes[0], "locality", "locality (expected |i-j|, frames)"),
                              (axes[1], "active_excess", "attention mass on target frames - uniform")):
        for (group, style) in (("early", "-"), ("late", "--")):
            for conv, color in (("stable", "C0"), ("fast", "C3")):
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
    axes[2].plot(pred.index, pred.values, "o-", color="C2", label="predicted output x1(k)")
    for key, color in (("reference", "k"), ("mixture", "C7"), ("output", "C2")):
        if env.get(key) is not None:
            axes[2].axhline(env[key], color=color, ls=":", label=f"{key} (final)" if key == "output" else key)
    axes[2].set_xlabel("evaluation")
    axes[2].set_ylabel("boundary contrast (dB)")
    axes[2].set_title("energy contrast at target on/off boundaries")
    axes[2].legend(fontsize=7)
    fig.suptitle("P5: temporal scaffold over evaluations (mean over clips)")
    path = save_figure(fig, Path(out_dir) / "p5_scaffold.png")
    caption = ("P5: self-attention locality (left) and excess attention mass on frames where the target is active "
               "(middle) per evaluation, by layer group (solid = early, dashed = late layers; blue = stable, red = fast "
               "by P3's rule); right: dB energy contrast at the target's onsets/offsets of the one-step predicted "
               "output at each evaluation, against the final output, the reference stem and the mixture.")
    return [(path, caption)]


EXPERIMENT = Experiment(name="p5", title="P5 Temporal scaffold (locality, target attention, boundaries)",
                        run=run, summarize=summarize, figures=figures)
