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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..probe import expand_sites
from .base import Experiment, ProtocolContext
from .effects import clip_columns, json_ready
from .p1_pathways import save_figure

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


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p3")
    done = store.done_keys()
    expand_sites(SELF_SITES, ctx.engine.sites)  # fails early on a model without self-attention sites
    for pclip in ctx.clips:
        clip_id = pclip.clip.clip_id
        if any(c == clip_id for c, _ in done):
            continue  # a clip's rows are written in one shard: present = complete
        table = layer_convergence(convergence_trajectory(ctx, pclip), ctx.config.tau)
        table.insert(0, "probe_id", [f"l{l:03d}-e{k:03d}" for l, k in zip(table["layer"], table["evaluation"])])
        table.insert(0, "clip_id", clip_id)
        for key, value in clip_columns(pclip).items():
            table[key] = value
        store.write(table.to_dict("records"))
    return store.load().sort_values(["clip_id", "layer", "evaluation"], kind="stable").reset_index(drop=True)


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    if df.empty:
        return {"clips": 0}
    per_clip = df.groupby(["clip_id", "layer"])["kstar"].first().unstack("layer")  # clips x layers
    per_clip_centered = df.groupby(["clip_id", "layer"])["kstar_centered"].first().unstack("layer")
    kstar_median = {int(l): float(per_clip[l].median()) for l in per_clip.columns}
    centered_median = {int(l): float(per_clip_centered[l].median()) for l in per_clip_centered.columns}
    stable, fast, basis = stable_fast(kstar_median, centered_median)
    agreement = []
    for clip_id in per_clip.index:
        s, _, _ = stable_fast({int(l): float(v) for l, v in per_clip.loc[clip_id].items()},
                              {int(l): float(v) for l, v in per_clip_centered.loc[clip_id].items()})
        agreement.append(s == stable)
    curves = df.groupby(["layer", "evaluation"])[
        ["sim_prev", "sim_final", "rel_change_prev", "sim_final_centered"]].mean()
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "tau": float(ctx.config.tau),
        "num_evaluations": int(df["evaluation"].max() + 1),
        "kstar_median_by_layer": kstar_median,
        "kstar_by_clip": {str(c): {int(l): int(v) for l, v in r.items()} for c, r in per_clip.iterrows()},
        "kstar_centered_median_by_layer": centered_median,
        "stable_layers": stable,
        "fast_layers": fast,
        "split_basis": basis,
        "clips_with_same_split": int(sum(agreement)),
        "split_rule": "stable: median over clips of k*_l <= median over layers of it; fast: the rest "
                      "(centred k* when k* splits nothing)",
        "mean_sim_final_by_layer": {int(l): g["sim_final"].mean() for l, g in df.groupby("layer")},
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
