"""P3 layerwise convergence of self-attention over sampling evaluations.

From the clean run of each clip (captures only, no intervention):

* Pooled map P_l[k]: the self-attention `segment_mass` capture of layer l at evaluation k ([H, T, G], the
  attention mass each query puts on each of G = ``config.time_bins`` contiguous time bins), averaged over
  heads and over the queries of each time bin -> a G x G map (bin-to-bin attention).
* ``sim_prev`` = cos(P_l[k], P_l[k-1]) and ``sim_final`` = cos(P_l[k], P_l[E-1]) (cosine of the flattened
  maps; E = number of evaluations; sim_prev is NaN at k = 0).
* ``rel_change_prev`` = ||o_l[k] - o_l[k-1]|| / ||o_l[k-1]||: relative change of the self-attention output
  (all head outputs [H, T, hd], Frobenius norm); ``rel_change_final`` likewise against the final evaluation.
* Convergence index k*_l = the first evaluation k such that sim_final >= tau (``config.tau``) at every
  evaluation from k on (the last evaluation always qualifies, so k*_l <= E-1).
* Secondary (not used for the split): ``sim_final_centered`` / ``sim_prev_centered`` = the same cosine after
  subtracting each map's mean (a Pearson correlation), and ``kstar_centered``. Raw cosines of non-negative
  attention maps share the uniform component, so they can sit near 1 from the start; the centred version
  shows whether the map's *structure* has converged.
* Stable vs fast layers (rule): per layer, the median of k*_l over clips; layers whose median k* is <= the
  median over layers are "stable", the others "fast" (with ties at the median, stable can hold more than
  half of the layers). If that leaves no fast layer (every layer has the same k*, e.g. all maps are
  within tau of their final value from the first evaluation on), the same rule is applied to the centred
  k* instead, and ``split_basis`` says so; if those tie as well, all layers are stable and none fast.
  (This is v1's criterion, kept as ``legacy``: the audit found its labels invert at 250 bins.)

Protocol v2 (issue 13): two criteria, each giving k*_l per clip (tau as above) and a stable/fast split
by the same median rule:
* ``map``: the exact self-attention map (every query x every key, float64 reference, head-averaged [T, T]),
  centred cosine (Pearson) to the final evaluation's map;
* ``output``: the self-attention output (all heads [H, T, hd]), centred cosine to the final evaluation's.
Agreement across criteria: the splits are equal (else ``split.no_split`` = true and the experiments that
use the split say so), plus the Spearman correlation of the per-layer median k*. Agreement across clips:
bootstrap stability, the fraction of clip resamples (seeded, up to 500) whose split equals the full-sample
split, and per layer the fraction labelled stable.
Claim (per criterion, cross-fitted so that the split is not judged on the clips that made it): clips are
halved by index parity; each half's split comes from the other half's clips; per clip the value is
mean k* of its fast layers minus mean k* of its stable layers (positive = the abstract's direction: some
layers settle early, others keep changing). NaN where the other half's split has no fast layer.

Summary interface (P4/P6 read it): ``criteria: {name: {"kstar": {layer: median k*}, "stable_layers",
"fast_layers", ...}}``, ``split: {"stable_layers", "fast_layers", "no_split"}`` (empty lists when no_split),
and the old top-level ``stable_layers`` / ``fast_layers`` = the agreed split, or the ``map`` criterion's
split when the criteria disagree (``split_basis`` says which).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..probe import expand_sites
from ..probe.probes import MapRequest
from .base import Experiment, ProtocolContext
from .clips import SEPARATED_DB, separation_gain_db
from .effects import clip_columns, json_ready
from .p1_pathways import save_figure
from .stats import paired_claim

CRITERIA = ("map", "output")
STABILITY_RESAMPLES = 500

SELF_SITES = "layers.*.self_attn"


def pooled_maps(segment_mass: torch.Tensor, boundaries) -> torch.Tensor:
    """[E, H, T, G] segment mass -> [E, G, G] head-averaged map pooled over the queries of each time bin."""
    if segment_mass.dim() != 4:
        raise ValueError(f"segment_mass must be [E, H, T, G], got shape {tuple(segment_mass.shape)}")
    mass = segment_mass.double().mean(dim=1)  # [E, T, G]
    rows = [mass[:, a:b].mean(dim=1) for a, b in zip(boundaries[:-1], boundaries[1:]) if b > a]
    return torch.stack(rows, dim=1)  # [E, G, G]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else float("nan")


def centered_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the maps after subtracting each one's mean (Pearson correlation of the entries)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return cosine(a - a.mean(), b - b.mean())


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    den = float(b.double().norm())
    return float((a.double() - b.double()).norm() / den) if den > 0 else float("nan")


def convergence_index(sim_final, tau: float) -> int:
    """First k with sim_final[k'] >= tau for every k' >= k (len - 1 at the latest)."""
    values = np.asarray(sim_final, dtype=np.float64)
    if values.size == 0:
        raise ValueError("sim_final must not be empty")
    k = values.size - 1
    while k > 0 and values[k - 1] >= tau:
        k -= 1
    return int(k)


def split_layers(kstar: dict) -> tuple[list, list]:
    """(stable, fast) layer lists by the rule of the module docstring; kstar: {layer: k*}."""
    if not kstar:
        return [], []
    median = float(np.median(list(kstar.values())))
    stable = sorted(l for l, k in kstar.items() if k <= median)
    return stable, sorted(l for l in kstar if l not in stable)


def stable_fast(kstar: dict, kstar_centered: dict) -> tuple[list, list, str]:
    """(stable, fast, basis): `split_layers` on k*, falling back to the centred k* when k* splits nothing."""
    stable, fast = split_layers(kstar)
    if fast or not kstar_centered:
        return stable, fast, "kstar"
    stable, fast = split_layers(kstar_centered)
    return stable, fast, "kstar_centered"


def layer_convergence(traj, tau: float) -> pd.DataFrame:
    """Per (layer, evaluation) convergence rows of one trajectory (needs segment_mass captures of the
    self-attention sites and their cached head outputs)."""
    rows = []
    sites = [s for s in traj.captures if s.endswith("self_attn")]
    if not sites:
        raise ValueError("traj has no self-attention segment_mass captures (capture=('segment_mass',))")
    for site in sites:
        layer = int(site.split(".")[1])
        maps = pooled_maps(traj.captures[site]["segment_mass"], traj.segments[site])
        outputs = traj.head_outputs.get(site)
        E = maps.shape[0]
        sim_final = [cosine(maps[k], maps[E - 1]) for k in range(E)]
        kstar = convergence_index(sim_final, tau)
        centered_final = [centered_cosine(maps[k], maps[E - 1]) for k in range(E)]
        kstar_centered = convergence_index(np.nan_to_num(centered_final, nan=-1.0), tau)
        for k in range(E):
            rows.append({
                "layer": layer, "evaluation": k, "t": float(traj.schedule[k][1]),
                "sim_prev": cosine(maps[k], maps[k - 1]) if k > 0 else float("nan"),
                "sim_final": sim_final[k],
                "rel_change_prev": relative_change(outputs[k], outputs[k - 1]) if outputs is not None and k > 0
                else float("nan"),
                "rel_change_final": relative_change(outputs[k], outputs[E - 1]) if outputs is not None else float("nan"),
                "kstar": kstar,
                "sim_prev_centered": centered_cosine(maps[k], maps[k - 1]) if k > 0 else float("nan"),
                "sim_final_centered": centered_final[k],
                "kstar_centered": kstar_centered,
            })
    return pd.DataFrame(rows)


def convergence_trajectory(ctx: ProtocolContext, pclip):
    """The clean trajectory with the self-attention captures P3 (and P5) need, cached on the context."""
    return ctx.trajectory(pclip, capture=("segment_mass",), capture_sites=SELF_SITES)


def v2_convergence(traj, tau: float) -> pd.DataFrame:
    """Per (layer, evaluation): the v2 criteria's centred cosines to the final evaluation and their k*
    (needs exact self-attention maps and cached self-attention head outputs in `traj`)."""
    rows = []
    sites = sorted({s for (s, _) in traj.maps if s.endswith("self_attn")}, key=lambda s: int(s.split(".")[1]))
    if not sites:
        raise ValueError("traj has no exact self-attention maps (maps=[MapRequest(site), ...])")
    E = traj.num_evaluations
    for site in sites:
        layer = int(site.split(".")[1])
        maps = [traj.maps[(site, k)].double().mean(dim=0) for k in range(E)]  # head-averaged [T, T]
        outputs = traj.head_outputs[site]
        map_final = [centered_cosine(maps[k], maps[E - 1]) for k in range(E)]
        out_final = [centered_cosine(outputs[k], outputs[E - 1]) for k in range(E)]
        k_map = convergence_index(np.nan_to_num(map_final, nan=-1.0), tau)
        k_out = convergence_index(np.nan_to_num(out_final, nan=-1.0), tau)
        for k in range(E):
            rows.append({"layer": layer, "evaluation": k, "map_sim_final": map_final[k], "kstar_map": k_map,
                         "output_sim_final": out_final[k], "kstar_output": k_out})
    return pd.DataFrame(rows)


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p3")
    done = store.done_keys()
    cfg = ctx.config
    sites = expand_sites(SELF_SITES, ctx.engine.sites)  # fails early on a model without self-attention sites
    from tqdm.auto import tqdm

    for pclip in tqdm(ctx.clips, desc="P3 exact maps", unit="clip", disable=not ctx.progress, dynamic_ncols=True):
        clip_id = pclip.clip.clip_id
        if any(c == clip_id for c, _ in done):
            continue  # a clip's rows are written in one shard: present = complete
        # one uncached run per clip (exact maps are ~T^2 per site and evaluation: dropped after use)
        traj = ctx.engine.trajectory(pclip.clip, steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed,
                                     capture=("segment_mass",), capture_sites=SELF_SITES, cache_heads=SELF_SITES,
                                     maps=[MapRequest(site) for site in sites])
        table = layer_convergence(traj, cfg.tau).merge(v2_convergence(traj, cfg.tau), on=["layer", "evaluation"])
        table.insert(0, "probe_id", [f"l{l:03d}-e{k:03d}" for l, k in zip(table["layer"], table["evaluation"])])
        table.insert(0, "clip_id", clip_id)
        table["clean_si_sdri"] = separation_gain_db(traj.target, pclip)
        for key, value in clip_columns(pclip).items():
            table[key] = value
        store.write(table.to_dict("records"))
        del traj
    return store.load().sort_values(["clip_id", "layer", "evaluation"], kind="stable").reset_index(drop=True)


def _kstar_table(df: pd.DataFrame, column: str) -> pd.DataFrame:
    return df.groupby(["clip_id", "layer"])[column].first().unstack("layer")  # clips x layers


def _median_split(table: pd.DataFrame) -> tuple[dict, list, list]:
    kstar = {int(l): float(table[l].median()) for l in table.columns}
    stable, fast = split_layers(kstar)
    return kstar, stable, fast


def criterion_summary(table: pd.DataFrame, resamples: int, seed: int) -> dict:
    """k* medians, split, agreement across clips (bootstrap stability) of one criterion's clips x layers table."""
    kstar, stable, fast = _median_split(table)
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(table)
    same, stable_count = 0, {l: 0 for l in kstar}
    for _ in range(resamples):
        sample = table.iloc[rng.integers(0, n, size=n)]
        _, s, _ = _median_split(sample)
        same += s == stable
        for l in s:
            stable_count[l] += 1
    per_clip_same = 0
    for _, row in table.iterrows():
        per_clip_same += split_layers({int(l): float(v) for l, v in row.items()})[0] == stable
    return {"kstar": kstar, "stable_layers": stable, "fast_layers": fast,
            "kstar_by_clip": {str(c): {int(l): int(v) for l, v in r.items()} for c, r in table.iterrows()},
            "bootstrap_stability": same / resamples if resamples else None,
            "stable_fraction": {l: c / resamples for l, c in stable_count.items()} if resamples else {},
            "clips_with_same_split": int(per_clip_same)}


def crossfit_values(table: pd.DataFrame) -> pd.Series:
    """Per clip: mean k* of the fast minus the stable layers, with the split from the other half of the
    clips (halves by index parity in sorted clip order); NaN where that split has no fast layer."""
    ids = sorted(table.index)
    halves = [ids[0::2], ids[1::2]]
    values = {}
    for mine, other in ((halves[0], halves[1]), (halves[1], halves[0])):
        if not other:
            continue
        _, stable, fast = _median_split(table.loc[other])
        for clip_id in mine:
            row = table.loc[clip_id]
            values[clip_id] = (float(np.mean([row[l] for l in fast])) - float(np.mean([row[l] for l in stable]))
                               if fast and stable else float("nan"))
    return pd.Series(values, dtype=float).sort_index()


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    if df.empty:
        return {"clips": 0, "claims": []}
    resamples = min(int(ctx.config.bootstrap), STABILITY_RESAMPLES)
    seed = ctx.config.noise_seed
    per_clip = _kstar_table(df, "kstar")
    per_clip_centered = _kstar_table(df, "kstar_centered")
    kstar_median = {int(l): float(per_clip[l].median()) for l in per_clip.columns}
    centered_median = {int(l): float(per_clip_centered[l].median()) for l in per_clip_centered.columns}
    legacy_stable, legacy_fast, legacy_basis = stable_fast(kstar_median, centered_median)
    criteria = {}
    tables = {}
    for name in CRITERIA:
        column = f"kstar_{name}"
        if column in df.columns:
            tables[name] = _kstar_table(df, column)
            criteria[name] = criterion_summary(tables[name], resamples, seed)
    names = list(criteria)
    agree = bool(names) and all(criteria[n]["stable_layers"] == criteria[names[0]]["stable_layers"] for n in names)
    any_fast = bool(names) and all(criteria[n]["fast_layers"] for n in names)
    no_split = not (agree and any_fast)
    reason = ("" if not no_split else "the criteria disagree on the split" if not agree
              else "a criterion separates no layers (every layer has the same median k*)")
    rho = None
    if len(names) >= 2:
        from scipy.stats import spearmanr

        a = [criteria[names[0]]["kstar"][l] for l in sorted(criteria[names[0]]["kstar"])]
        b = [criteria[names[1]]["kstar"][l] for l in sorted(criteria[names[1]]["kstar"])]
        rho = float(spearmanr(a, b).statistic) if len(set(a)) > 1 and len(set(b)) > 1 else None
    primary = criteria.get("map", {})
    if not no_split:
        top_stable, top_fast, basis = primary["stable_layers"], primary["fast_layers"], "criteria agree"
    elif primary:
        top_stable, top_fast, basis = primary["stable_layers"], primary["fast_layers"], "map criterion (no_split)"
    else:
        top_stable, top_fast, basis = legacy_stable, legacy_fast, f"legacy {legacy_basis}"
    gains = df.groupby("clip_id")["clean_si_sdri"].first() if "clean_si_sdri" in df.columns else pd.Series(dtype=float)
    separated = sorted(gains[gains >= SEPARATED_DB].index)
    claims = []
    for name, table in tables.items():
        values = crossfit_values(table)
        for subset, ids in (("all clips", None), ("separated", separated)):
            v = values if ids is None else values[values.index.isin(ids)]
            claims.append(paired_claim(
                v.to_numpy(), claim_id=f"P3.{name}",
                claim=f"Self-attention layers split into early-settling (stable) and late-settling (fast) ones "
                      f"({name} criterion; cross-fitted: mean k* of fast minus stable layers, split from the other "
                      f"half of the clips)", experiment="p3", subset=subset, clip_ids=list(v.index),
                units="evaluations", resamples=int(ctx.config.bootstrap), seed=seed))
    curves = df.groupby(["layer", "evaluation"])[
        [c for c in ("sim_prev", "sim_final", "rel_change_prev", "sim_final_centered", "map_sim_final",
                     "output_sim_final") if c in df.columns]].mean()
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "tau": float(ctx.config.tau),
        "num_evaluations": int(df["evaluation"].max() + 1),
        "criteria": criteria,
        "split": {"stable_layers": top_stable if not no_split else [],
                  "fast_layers": top_fast if not no_split else [], "no_split": no_split, "reason": reason},
        "criteria_agreement": {"same_split": agree, "spearman_median_kstar": rho},
        "stable_layers": top_stable,
        "fast_layers": top_fast,
        "split_basis": basis,
        "split_rule": "per criterion: stable = median over clips of k*_l <= median over layers of it; fast: the rest",
        "legacy": {"criterion": f"raw cosine of {ctx.config.time_bins}-bin pooled maps (v1)",
                   "kstar_median_by_layer": kstar_median, "kstar_centered_median_by_layer": centered_median,
                   "stable_layers": legacy_stable, "fast_layers": legacy_fast, "split_basis": legacy_basis},
        "kstar_median_by_layer": kstar_median,
        "separated_clips": separated,
        "claims": claims,
        "curves": {int(l): {col: curves.loc[l][col].tolist() for col in curves.columns}
                   for l in curves.index.get_level_values(0).unique()},
    }
    return json_ready(summary)


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return []
    stable = set(summary.get("stable_layers", []))
    mean = df.groupby(["layer", "evaluation"])[
        ["sim_prev", "sim_final", "rel_change_prev", "sim_final_centered"]].mean()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = (("sim_final", "cosine to final pooled map"), ("sim_prev", "cosine to previous pooled map"),
              ("rel_change_prev", "relative change of attention output"),
              ("sim_final_centered", "centred cosine to final map"))
    for ax, (column, label) in zip(axes, panels):
        for layer in mean.index.get_level_values(0).unique():
            curve = mean.loc[layer][column]
            style = dict(color="C0" if layer in stable else "C3", alpha=0.8)
            ax.plot(curve.index, curve.values, "-o", ms=2.5, label=f"L{layer} ({'stable' if layer in stable else 'fast'})",
                    **style)
        if column in ("sim_final", "sim_final_centered"):
            ax.axhline(summary.get("tau", 0.95), color="k", ls="--", lw=0.8)
        ax.set_xlabel("evaluation")
        ax.set_ylabel(label)
        ax.set_title(label)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) <= 24:
        axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("P3: layerwise convergence of self-attention (blue = stable, red = fast layers; mean over clips)")
    path = save_figure(fig, Path(out_dir) / "p3_convergence.png")
    produced = [(path, "P3 convergence curves per layer: cosine similarity of the head-averaged, time-bin pooled "
                       "self-attention map to the final (left, dashed = tau) and previous (middle) evaluation, and the "
                       "relative change of the self-attention output (third) and the centred (mean-subtracted) cosine to "
                       "the final map (right, secondary); blue = stable, red = fast layers by "
                       "the median-k* rule.")]
    kstar = summary.get("kstar_median_by_layer", {})
    if kstar:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        layers = sorted(int(l) for l in kstar)
        values = [kstar[l] if l in kstar else kstar[str(l)] for l in layers]
        ax.bar(layers, values, color=["C0" if l in stable else "C3" for l in layers])
        # markers too: a k* of 0 is a bar of height 0, which alone would look like an empty chart
        ax.scatter(layers, values, color=["C0" if l in stable else "C3" for l in layers], zorder=3)
        last = max(1, int(summary.get("num_evaluations", max(values) + 1)) - 1)
        ax.set_ylim(-0.5, last + 0.5)
        ax.set_xticks(layers)
        if len(set(values)) == 1:
            ax.text(0.5, 0.9, f"k* = {values[0]:g} for every layer: k* separates no layers\n"
                              f"(split basis: {summary.get('split_basis')})", transform=ax.transAxes,
                    ha="center", va="top", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("convergence index k* (evaluation)")
        ax.set_title(f"P3: k*_l (median over clips), tau = {summary.get('tau')}")
        produced.append((save_figure(fig, Path(out_dir) / "p3_kstar.png"),
                         "P3 convergence index per layer: first evaluation after which the pooled self-attention map "
                         "stays within cosine tau of its final value (median over clips); blue = stable layers "
                         "(k* <= median), red = fast layers."))
    return produced


EXPERIMENT = Experiment(name="p3", title="P3 Layerwise convergence (stable vs fast layers)",
                        run=run, summarize=summarize, figures=figures)
