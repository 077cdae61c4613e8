"""P1 orthogonal pathway probe of text conditioning (docs/design.md, section 6).

Every cross-attention output c (per layer, per evaluation, per head) splits into its time-mean
m = mean_t c[t] (the "additive injection", the same vector at every frame) and the frame-varying rest
r = c - m (the "routing"). Two clean runs per clip share the seeded noise: prompt A (the clip's prompt)
and prompt B (the counterfactual prompt, another source of the same mix). Probes, each active from
evaluation 0 to the end (window None) and continued to t=1:

* ``additive``: m_A -> m_B (keep r_A), ``routing``: r_A -> r_B (keep m_A), both at all cross-attention layers at
  once ("all layers") and at one layer at a time ("layer l");
* ``full patch``: c_A -> c_B (upper reference: everything cross-attention carries);
* ``uniform``: cross-attention logits x 0 (uniform over text tokens: output = mean of V, no routing);
* ``text knockout``: every text token's logits set to -inf, so cross-attention outputs 0 (text cut);
* identity controls ``additive (identity)`` / ``routing (identity)``: the swaps with the clean A run itself as
  source; they must give exactly zero effects.

Effects are defined in effects.py (semantic: movement of the output toward B's source; acoustic:
MR-STFT distance to the identity-matched clean output). Statistic: the 2x2 dissociation of stats.py over
clips for the all-layer additive vs routing swaps, overall and per complexity group (number of sources,
gain spread), and per layer. A clip whose semantic effect is undefined (prompting B moves the output by
less than 1 dB of SI-SDR margin, see effects.py) drops out of the semantic cells, the semantic contrast and
the interaction; ``secondary_dissociation_db`` repeats the analysis with the raw margin shift in dB and the
log-mel distance, which are defined for every clip with stems.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..probe import Probe, expand_sites
from .base import Experiment, ProtocolContext
from .effects import json_ready, make_end_metrics
from .stats import by_group, dissociation, summarize_values

CLEAN_RUN = "clean"
COUNTERFACTUAL_RUN = "counterfactual"
CROSS_SITES = "layers.*.cross_attn"

# label -> Probe fields (the label is the probe type in the results)
VARIANTS = {
    "additive": {"intervention": "additive_swap", "source": COUNTERFACTUAL_RUN},
    "routing": {"intervention": "routing_swap", "source": COUNTERFACTUAL_RUN},
    "full patch": {"intervention": "output_patch", "source": COUNTERFACTUAL_RUN},
    "uniform": {"intervention": "logit_scale", "value": 0.0},
    "text knockout": {"intervention": "segment_knockout"},  # segments filled per clip
    "additive (identity)": {"intervention": "additive_swap", "source": CLEAN_RUN},
    "routing (identity)": {"intervention": "routing_swap", "source": CLEAN_RUN},
}
PER_LAYER = ("additive", "routing", "full patch", "uniform", "text knockout")


def layer_of(site: str) -> int:
    return int(site.split(".")[1])


def pathway_probes(sites, text_tokens: int, evaluation: int = 0, window=None, per_layer: bool = True,
                   variants=tuple(VARIANTS), label_prefix: str = "") -> list[Probe]:
    """P1's probe set over the cross-attention sites `sites` (all layers at once, and per layer)."""
    sites = list(sites)
    probes = []
    for name in variants:
        spec = dict(VARIANTS[name])
        if spec["intervention"] == "segment_knockout":
            spec["segments"] = tuple(range(text_tokens))
        common = dict(evaluation=evaluation, window=window, label=label_prefix + name, **spec)
        probes.append(Probe(site=CROSS_SITES, **common))  # every cross-attention layer at once
        if per_layer and name in PER_LAYER:
            probes.extend(Probe(site=s, **common) for s in sites)
    return probes


def prepare_runs(ctx: ProtocolContext, pclip):
    """Clean and counterfactual trajectories of a clip, registered as the engine's patch sources."""
    clean = ctx.trajectory(pclip)
    counterfactual = ctx.trajectory(pclip, prompt=pclip.counterfactual_prompt)
    ctx.engine.add_run(CLEAN_RUN, clean)
    ctx.engine.add_run(COUNTERFACTUAL_RUN, counterfactual)
    return clean, counterfactual


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p1")
    engine = ctx.engine
    sites = expand_sites(CROSS_SITES, engine.sites)
    for pclip in ctx.clips:
        if not pclip.counterfactual_prompt:
            continue  # no counterfactual prompt: nothing to swap with
        clean, counterfactual = prepare_runs(ctx, pclip)
        tokens = len(clean.segments[sites[0]]) - 1
        probes = pathway_probes(sites, tokens)
        engine.sweep(clean, probes, end_effect=True, store=store, progress=ctx.progress,
                     end_metrics=make_end_metrics(pclip, clean, counterfactual))
    return tidy(store.load())


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Add `probe_type` (the label) and `scope` ("all layers" / "layer l") columns, stable row order."""
    if df.empty:
        return df
    df = df.copy()
    df["probe_type"] = df["label"].str.replace(r"^[a-z0-9]+:", "", regex=True)
    df["scope"] = np.where(df["layer"] < 0, "all layers", "layer " + df["layer"].astype(int).astype(str))
    return df.sort_values(["clip_id", "probe_type", "layer", "evaluation", "probe_id"], kind="stable").reset_index(drop=True)


EFFECTS = ("semantic_effect", "acoustic_effect")
SECONDARY = ("semantic_shift_db", "semantic_projection", "acoustic_logmel")


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    resamples, seed = ctx.config.bootstrap, ctx.config.noise_seed
    if df.empty:
        return {"clips": 0}
    df = tidy(df) if "probe_type" not in df.columns else df
    whole = df[df["scope"] == "all layers"]
    table = {}
    for probe_type, sub in whole.groupby("probe_type"):
        table[probe_type] = {col: summarize_values(sub[col], resamples, seed) for col in EFFECTS + SECONDARY}
        table[probe_type]["identity_flipped_fraction"] = float(pd.to_numeric(sub["identity_flipped"]).mean()) \
            if sub["identity_flipped"].notna().any() else None
    controls = whole[whole["probe_type"].str.contains("identity")]
    effect_columns = [c for c in EFFECTS + SECONDARY + ("local_effect",) if c in controls.columns]
    control_max = float(np.nanmax(np.abs(controls[effect_columns].to_numpy(dtype=float)))) if len(controls) else None

    def dis(frame):
        return dissociation(frame, resamples=resamples, seed=seed)

    per_layer = {}
    for layer, sub in df[df["layer"] >= 0].groupby("layer"):
        per_layer[int(layer)] = dis(sub)
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "clips_with_semantic_effect": int(whole.loc[whole["probe_type"] == "additive", "semantic_effect"].notna().sum()),
        "effects_all_layers": table,
        "identity_control_max_abs_effect": control_max,
        "dissociation": dis(whole),
        "dissociation_by_sources": by_group(whole, "group", dis),
        "dissociation_by_gain_spread": by_group(whole, "gain_group", dis),
        "dissociation_per_layer": per_layer,
        "secondary_dissociation_db": dissociation(
            whole, effects=("semantic_shift_db", "acoustic_logmel"), resamples=resamples, seed=seed),
    }
    return json_ready(summary)


# ---------------------------------------------------------------------------------------------- figures
INTEGER_AXIS_WORDS = ("layer", "evaluation", "k0", "k*", "step")


def integer_ticks(fig) -> None:
    """Axes that count layers, evaluations or steps get integer ticks (unless they have explicit tick labels)."""
    from matplotlib.ticker import AutoLocator, MaxNLocator

    for ax in fig.axes:
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if any(w in label.lower() for w in INTEGER_AXIS_WORDS) and isinstance(axis.get_major_locator(), AutoLocator):
                axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    integer_ticks(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _bars(ax, names, cells, title, ylabel):
    means = [cells.get(n, {}).get("mean") for n in names]
    lows = [cells.get(n, {}).get("ci_low") for n in names]
    highs = [cells.get(n, {}).get("ci_high") for n in names]
    x = np.arange(len(names))
    m = np.array([np.nan if v is None else v for v in means], dtype=float)
    lo = np.array([np.nan if v is None else v for v in lows], dtype=float)
    hi = np.array([np.nan if v is None else v for v in highs], dtype=float)
    err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
    ax.bar(x, np.nan_to_num(m), yerr=err, capsize=4, color=["C0", "C1", "C2", "C3", "C4", "C7"][: len(names)])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    produced = []
    if df.empty or not summary.get("dissociation", {}).get("cells"):
        return produced
    cells = summary["dissociation"]["cells"]
    n = int(summary.get("clips", df["clip_id"].nunique()))
    interval = f"bootstrap interval over n = {n} clips" + (" (see Limitations: not a calibrated 95% CI)" if n < 10 else "")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, effect, label in zip(axes, EFFECTS, ("semantic effect (0 = none, 1 = as prompting B)",
                                                 "acoustic effect (MR-STFT distance)")):
        _bars(ax, ["additive", "routing"], {k: cells.get(f"{k}/{effect}", {}) for k in ("additive", "routing")},
              effect.replace("_", " "), label)
    fig.suptitle(f"P1: additive vs routing swap, all cross-attention layers (mean, bootstrap 95% interval, n = {n})")
    produced.append((save_figure(fig, out_dir / "p1_dissociation.png"),
                     "P1 2x2 dissociation: semantic (left) and acoustic (right) effect of swapping the time-mean "
                     "('additive') or the frame-varying part ('routing') of every cross-attention output with the "
                     f"counterfactual prompt's run; bars = mean over clips, whiskers = {interval}."))

    table = summary.get("effects_all_layers", {})
    names = [n for n in ("additive", "routing", "full patch", "uniform", "text knockout") if n in table]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, effect in zip(axes, EFFECTS):
        _bars(ax, names, {n: table[n][effect] for n in names}, effect.replace("_", " "), effect.split("_")[0])
    fig.suptitle("P1: all probe variants (all cross-attention layers at once)")
    produced.append((save_figure(fig, out_dir / "p1_variants.png"),
                     "P1 variants: semantic and acoustic effects of the additive and routing swaps, the full "
                     "cross-attention patch, uniform cross-attention and text-token knockout (mean over clips, "
                     f"{interval})."))

    layered = df[df["layer"] >= 0]
    if not layered.empty:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, effect in zip(axes, EFFECTS):
            for probe_type, color in (("additive", "C0"), ("routing", "C1")):
                sub = layered[layered["probe_type"] == probe_type].groupby("layer")[effect].mean()
                ax.plot(sub.index, sub.values, "o-", color=color, label=probe_type)
            ax.set_xlabel("layer")
            ax.set_ylabel(effect.replace("_", " "))
            ax.set_title(f"{effect.split('_')[0]} effect per layer")
            ax.legend()
        fig.suptitle("P1: single-layer swaps (mean over clips)")
        produced.append((save_figure(fig, out_dir / "p1_per_layer.png"),
                         "P1 per layer: semantic and acoustic effect of swapping the additive or the routing "
                         "component of one cross-attention layer at a time (mean over clips)."))
    return produced


EXPERIMENT = Experiment(name="p1", title="P1 Orthogonal pathway probe (additive injection vs routing)",
                        run=run, summarize=summarize, figures=figures)
