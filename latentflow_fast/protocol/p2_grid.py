"""P2 layer x evaluation-window causal grid.

For every layer l and every window of ``config.window`` consecutive evaluations starting at
w = 0, window, 2*window, ... (the probe branches from the clean trajectory at evaluation w, is active at
evaluations w .. w+window-1 only, and the branch is integrated to t=1):

* ``additive`` / ``routing``: P1's swaps (time-mean / frame-varying part of the cross-attention output
  replaced by the counterfactual prompt's run) at layer l only;
* ``cross-attn ablation`` / ``self-attn ablation``: all heads of layer l's cross-/self-attention gated to 0;
* ``self-attn head ablation`` (only with ``per_head=True`` in `grid_probes`; off in the protocol run to keep
  its cost at 4 probes per cell): one self-attention head at a time; heatmaps average over heads.

Effects as in effects.py (semantic: toward the counterfactual source; acoustic: MR-STFT distance to the
identity-matched clean output). Heatmaps show the mean over clips for each (layer, window start).

Protocol v2 default (time budget, recorded as ``grid_reduction`` in the summary): the grid runs on layer
*groups* instead of single layers -- ``config.p2_layer_groups`` contiguous groups (2: the first and second
half of the layers, split where a site glob can name each group, e.g. 0-9 / 10-15 for 16 layers) -- with
windows of ``config.window`` evaluations (16: the first and second half of the 32 evaluations) and the
probe types ``config.p2_types`` (default: the full cross-attention patch c_A -> c_B, i.e. where and when
everything text conditioning carries matters; "additive" and "routing" add P1's swaps per cell); v2
effects (semantic_v2, acoustic_v2) as in P1. ``p2_layer_groups = 0`` runs v1's per-layer grid with all four
v1 probe types.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..probe import Probe
from ..sampler import num_evaluations
from .base import Experiment, ProtocolContext
from .effects import json_ready, make_end_metrics
from .clips import separation_gain_db
from .p1_pathways import COUNTERFACTUAL_RUN, prepare_runs, save_figure, tidy

PROBE_TYPES = ("full patch", "additive", "routing", "cross-attn ablation", "self-attn ablation",
               "self-attn head ablation")
EFFECTS = ("semantic_v2", "acoustic_v2")


def window_starts(num_evaluations: int, window: int) -> list[int]:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return list(range(0, num_evaluations, window))


def grid_probes(num_layers: int, num_heads: int, num_evaluations: int, window: int,
                per_head: bool = False) -> list[Probe]:
    probes = []
    for layer in range(num_layers):
        cross, self_ = f"layers.{layer}.cross_attn", f"layers.{layer}.self_attn"
        for start in window_starts(num_evaluations, window):
            common = dict(evaluation=start, window=window)
            probes += [
                Probe(site=cross, intervention="additive_swap", source=COUNTERFACTUAL_RUN, label="additive", **common),
                Probe(site=cross, intervention="routing_swap", source=COUNTERFACTUAL_RUN, label="routing", **common),
                Probe(site=cross, intervention="head_ablation", label="cross-attn ablation", **common),
                Probe(site=self_, intervention="head_ablation", label="self-attn ablation", **common),
            ]
            if per_head:
                probes += [Probe(site=self_, intervention="head_ablation", heads=(h,),
                                 label="self-attn head ablation", **common) for h in range(num_heads)]
    return probes


def range_pattern(lo: int, hi: int):
    """A glob character class naming layers lo..hi (inclusive) exactly, or None if one glob cannot."""
    if hi < 10:
        return f"[{lo}-{hi}]" if hi > lo else str(lo)
    if lo >= 10 and lo // 10 == hi // 10:
        return f"{lo // 10}[{lo % 10}-{hi % 10}]" if hi > lo else str(lo)
    return None


def layer_groups(num_layers: int, groups: int) -> list[tuple]:
    """[(first, last, glob), ...]: `groups` contiguous groups as near-equal as a single site glob allows."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    groups = min(groups, num_layers)
    if groups == 1:
        return [(0, num_layers - 1, "*")]
    if groups != 2:
        raise ValueError(f"p2_layer_groups must be 0 (per layer), 1 or 2, got {groups}")
    for split in sorted(range(1, num_layers), key=lambda s: (abs(2 * s - num_layers), s)):
        a, b = range_pattern(0, split - 1), range_pattern(split, num_layers - 1)
        if a is not None and b is not None:
            return [(0, split - 1, a), (split, num_layers - 1, b)]
    raise ValueError(f"no split of {num_layers} layers into two glob-named groups")


GROUP_TYPES = {"full patch": "output_patch", "additive": "additive_swap", "routing": "routing_swap"}


def group_probes(num_layers: int, num_evaluations: int, window: int, groups: int,
                 types=("full patch",)) -> list[Probe]:
    """`types` (keys of GROUP_TYPES) at each layer group (all its cross-attention layers) per window."""
    unknown = [t for t in types if t not in GROUP_TYPES]
    if unknown or not types:
        raise ValueError(f"p2_types must be a non-empty subset of {sorted(GROUP_TYPES)}, got {tuple(types)}")
    probes = []
    for first, last, glob in layer_groups(num_layers, groups):
        site = f"layers.{glob}.cross_attn"
        for start in window_starts(num_evaluations, window):
            for name in types:
                probes.append(Probe(site=site, intervention=GROUP_TYPES[name], source=COUNTERFACTUAL_RUN,
                                    label=f"{name} L{first}-{last}", evaluation=start, window=window))
    return probes


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p2")
    engine = ctx.engine
    num_layers = engine.model.config.n_layers
    groups = int(getattr(ctx.config, "p2_layer_groups", 0))
    evaluations = num_evaluations(ctx.config.steps, ctx.config.method)
    if groups:
        probes = group_probes(num_layers, evaluations, ctx.config.window, groups,
                              tuple(getattr(ctx.config, "p2_types", ("full patch",))))
    else:
        probes = grid_probes(num_layers, engine.num_heads, evaluations, ctx.config.window)
    done = store.done_keys()
    for pclip in ctx.clips:
        if not pclip.counterfactual_prompt:
            continue
        if all((pclip.clip.clip_id, p.probe_id) in done for p in probes):
            continue  # stored: no clean / counterfactual runs needed
        clean, counterfactual = prepare_runs(ctx, pclip)
        engine.sweep(clean, probes, end_effect=True, store=store, progress=ctx.progress,
                     end_metrics=make_end_metrics(pclip, clean, counterfactual,
                                                  extra={"clean_si_sdri": separation_gain_db(clean.target, pclip)}))
        ctx.forget(pclip)
    return group_tidy(tidy(store.load()))


def group_tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Layer-group rows: probe_type without the " La-b" suffix, `layer` = the group's first layer."""
    if df.empty or "probe_type" not in df.columns:
        return df
    df = df.copy()
    grouped = df["probe_type"].str.contains(r" L\d+-\d+$", regex=True)
    if grouped.any():
        first = df.loc[grouped, "probe_type"].str.extract(r" L(\d+)-\d+$")[0].astype(int)
        df.loc[grouped, "layer"] = first
        df.loc[grouped, "layer_group"] = df.loc[grouped, "probe_type"].str.extract(r" (L\d+-\d+)$")[0]
        df.loc[grouped, "probe_type"] = df.loc[grouped, "probe_type"].str.replace(r" L\d+-\d+$", "", regex=True)
    return df


def grid_means(df: pd.DataFrame, probe_type: str, effect: str) -> pd.DataFrame:
    """Mean over clips (and heads) of `effect`: rows = layer, columns = window start evaluation."""
    sub = df[df["probe_type"] == probe_type]
    return sub.pivot_table(index="layer", columns="evaluation", values=effect, aggfunc="mean", dropna=False)


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    if df.empty:
        return {"clips": 0}
    df = group_tidy(tidy(df) if "probe_type" not in df.columns else df)
    grids = {}
    for probe_type in PROBE_TYPES:
        entry = {}
        for effect in EFFECTS:
            g = grid_means(df, probe_type, effect)
            if g.empty:
                continue
            values = g.to_numpy(dtype=float)
            cell = {}
            if np.isfinite(values).any():
                i, j = np.unravel_index(np.nanargmax(np.abs(values)), values.shape)
                cell = {"layer": int(g.index[i]), "window_start": int(g.columns[j]), "value": float(values[i, j])}
            entry[effect] = {"layers": [int(x) for x in g.index], "window_starts": [int(x) for x in g.columns],
                             "mean": values.tolist(), "largest_cell": cell,
                             "mean_by_window": np.nanmean(values, axis=0).tolist() if np.isfinite(values).any() else [],
                             "mean_by_layer": np.nanmean(values, axis=1).tolist() if np.isfinite(values).any() else []}
        grids[probe_type] = entry
    groups = int(getattr(ctx.config, "p2_layer_groups", 0))
    reduction = (f"layer groups instead of single layers ({groups} groups"
                 f"{': ' + ', '.join(sorted(df['layer_group'].dropna().unique())) if 'layer_group' in df.columns else ''}),"
                 f" windows of {ctx.config.window} evaluations, probe types "
                 f"{', '.join(getattr(ctx.config, 'p2_types', ()))} only (time budget)"
                 if groups else "")
    return json_ready({"clips": int(df["clip_id"].nunique()), "window": int(ctx.config.window), "grids": grids,
                       "grid_reduction": reduction})


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = summary.get("grids", {})
    types = [t for t in PROBE_TYPES if grids.get(t)]
    if not types:
        return []
    def as_array(cell):
        return np.array([[np.nan if v is None else v for v in r] for r in cell["mean"]], dtype=float)

    # One colour scale per effect across all rows, so probe types can be compared by colour.
    bounds = {}
    for effect in EFFECTS:
        stacked = [as_array(grids[t][effect]) for t in types if grids[t].get(effect)]
        finite = np.concatenate([a[np.isfinite(a)] for a in stacked]) if stacked else np.array([])
        bounds[effect] = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig, axes = plt.subplots(len(types), 2, figsize=(9, 2.3 * len(types) + 0.6), squeeze=False)
    for row, probe_type in enumerate(types):
        for col, effect in enumerate(EFFECTS):
            ax = axes[row][col]
            cell = grids[probe_type].get(effect)
            if not cell:
                ax.axis("off")
                continue
            values = as_array(cell)
            if effect.startswith("semantic"):
                image = ax.imshow(values, aspect="auto", origin="lower", cmap="RdBu_r",
                                  vmin=-bounds[effect], vmax=bounds[effect])
            else:
                image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=bounds[effect])
            ax.set_xticks(range(len(cell["window_starts"])), cell["window_starts"])
            ax.set_yticks(range(len(cell["layers"])), cell["layers"])
            ax.set_xlabel("window start (evaluation)")
            ax.set_ylabel("layer")
            ax.set_title(f"{probe_type}: {effect.split('_')[0]}", fontsize=9)
            fig.colorbar(image, ax=ax)
    fig.suptitle(f"P2: layer x evaluation-window grid (window = {summary.get('window')} evaluations)")
    path = save_figure(fig, Path(out_dir) / "p2_grid.png")
    caption = ("P2 heatmaps: mean over clips of the semantic (left; red = toward the counterfactual source) and "
               "acoustic (right; MR-STFT distance) effect of each probe applied at one layer (y) during one window "
               "of evaluations starting at x; rows: additive swap, routing swap, cross- and self-attention "
               "ablation (and single self-attention heads, averaged over heads, when run). One colour scale per effect "
               "for all rows.")
    return [(path, caption)]


EXPERIMENT = Experiment(name="p2", title="P2 Layer x evaluation-window causal grid",
                        run=run, summarize=summarize, figures=figures)
