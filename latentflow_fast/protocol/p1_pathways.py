"""P1 orthogonal pathway probe of text conditioning (docs/design.md, section 6; protocol v2, issue 13).

Two clean runs per clip share the seeded noise: prompt A (the clip's prompt) and prompt B (the
counterfactual prompt, another source of the same mix, with as many words as A: clips.py). Every probe acts
at every cross-attention layer from evaluation 0 to the end (window None) and is continued to t = 1.

First decomposition, additive vs routing: each cross-attention output c (per layer, evaluation, head)
splits into its time-mean m = mean_t c[t] (the "additive injection") and the frame-varying rest r = c - m
(the "routing"):
* ``additive``: m_A -> m_B (keep r_A); ``routing``: r_A -> r_B (keep m_A);
* ``full patch``: c_A -> c_B (everything cross-attention carries).

Second decomposition, values vs weights (text_swap.py): ``weights swap`` = softmax(q K_B) V_A (the
weights B's text gives these queries, A's values), ``values swap`` = softmax(q K_A) V_B.

Identity controls (every swap with A's own run as source, "<type> (identity)") run on the first
``IDENTITY_CONTROL_CLIPS`` clips and must give exactly zero effects.

Effects (effects.py, "Protocol v2 effects"): ``semantic_v2`` = movement of the output's position on the
A-B identity axis (least-squares waveform projection on the stems, active samples), ``acoustic_v2`` =
relative size of the change orthogonal to the stems' plane. v1's margin-ratio and MR-STFT effects are kept
as secondary columns.

Claims (per clip, positive = the abstract's direction as we reconstruct it; exact Wilcoxon, BCa, Holm in
the scorecard): additive minus routing on semantic_v2 > 0 (identity travels in the additive injection),
routing minus additive on acoustic_v2 > 0 (acoustic detail in the routing), and for the second
decomposition values minus weights on semantic_v2 > 0 and weights minus values on acoustic_v2 > 0 (our
mapping: the time-mean of an output is a weighted mean of values; its frame variation comes from the
weights). Each on all clips and on the clips the clean model separates (SI-SDRi >= 3 dB).

Budget reduction (recorded in the summary): v1's single-layer swaps, uniform attention and text knockout
are not run; only the all-layer probes above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..probe import Probe, expand_sites
from .base import Experiment, ProtocolContext
from .clips import SEPARATED_DB, separation_gain_db
from .effects import json_ready, make_end_metrics
from .stats import by_group, dissociation, paired_claim, summarize_values
from .text_swap import TextSwapEngine, swap_probe

CLEAN_RUN = "clean"
COUNTERFACTUAL_RUN = "counterfactual"
CROSS_SITES = "layers.*.cross_attn"
IDENTITY_CONTROL_CLIPS = 2

# label -> Probe fields (the label is the probe type in the results); v1's per-layer / uniform / knockout
# variants stay available to `pathway_probes` callers (P2 uses the swaps per layer group)
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
V2_PROBES = ("additive", "routing", "full patch", "weights swap", "values swap")
V2_CONTROLS = ("additive (identity)", "routing (identity)", "weights swap (identity)", "values swap (identity)")
EFFECTS = ("semantic_v2", "acoustic_v2")
SECONDARY = ("semantic_effect", "acoustic_effect", "semantic_shift_db", "semantic_projection", "acoustic_logmel")
REDUCTION = ("all-layer probes only: v1's single-layer swaps, uniform attention and text knockout are not run "
             "(time budget); identity controls on the first {n} clips")


def layer_of(site: str) -> int:
    return int(site.split(".")[1])


def pathway_probes(sites, text_tokens: int, evaluation: int = 0, window=None, per_layer: bool = True,
                   variants=tuple(VARIANTS), label_prefix: str = "") -> list[Probe]:
    """Probes of `variants` over the cross-attention sites `sites` (all layers at once, and per layer);
    the values/weights swaps ("weights swap", "values swap", with " (identity)") all layers at once."""
    sites = list(sites)
    probes = []
    for name in variants:
        if name.replace(" (identity)", "") in ("weights swap", "values swap", "text swap"):
            source = CLEAN_RUN if name.endswith("(identity)") else COUNTERFACTUAL_RUN
            probes.append(swap_probe(name, source, CROSS_SITES, evaluation, window, label_prefix))
            continue
        spec = dict(VARIANTS[name])
        if spec["intervention"] == "segment_knockout":
            spec["segments"] = tuple(range(text_tokens))
        common = dict(evaluation=evaluation, window=window, label=label_prefix + name, **spec)
        probes.append(Probe(site=CROSS_SITES, **common))  # every cross-attention layer at once
        if per_layer and name in PER_LAYER:
            probes.extend(Probe(site=s, **common) for s in sites)
    return probes


def prepare_runs(ctx: ProtocolContext, pclip):
    """Clean and counterfactual trajectories of a clip, registered as the engine's patch sources (P2)."""
    clean = ctx.trajectory(pclip)
    counterfactual = ctx.trajectory(pclip, prompt=pclip.counterfactual_prompt)
    ctx.engine.add_run(CLEAN_RUN, clean)
    ctx.engine.add_run(COUNTERFACTUAL_RUN, counterfactual)
    return clean, counterfactual


def swap_engine(ctx: ProtocolContext) -> TextSwapEngine:
    return TextSwapEngine(ctx.model, backend=ctx.config.backend, time_bins=ctx.config.time_bins)


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p1")
    engine = swap_engine(ctx)
    cfg = ctx.config
    cross = expand_sites(CROSS_SITES, engine.sites)
    done = store.done_keys()
    for index, pclip in enumerate(ctx.clips):
        if not pclip.counterfactual_prompt:
            continue  # no counterfactual prompt: nothing to swap with
        variants = V2_PROBES + (V2_CONTROLS if index < IDENTITY_CONTROL_CLIPS else ())
        probes = pathway_probes(cross, 0, per_layer=False, variants=variants)
        if all((pclip.clip.clip_id, p.probe_id) in done for p in probes):
            continue
        run_kwargs = dict(steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed, cache_heads=CROSS_SITES)
        clean = engine.record_text(CLEAN_RUN, pclip.clip, **run_kwargs)
        counterfactual = engine.record_text(COUNTERFACTUAL_RUN, pclip.clip, prompt=pclip.counterfactual_prompt,
                                            **run_kwargs)
        if clean.inputs.text.shape[1] != counterfactual.inputs.text.shape[1]:
            probes = [p for p in probes if "swap" not in p.label]  # values/weights need equal token counts
        gain = separation_gain_db(clean.target, pclip)
        engine.sweep(clean, probes, end_effect=True, store=store, progress=ctx.progress,
                     end_metrics=make_end_metrics(pclip, clean, counterfactual, extra={"clean_si_sdri": gain}))
        engine.forget(CLEAN_RUN)
        engine.forget(COUNTERFACTUAL_RUN)
    return tidy(store.load())


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Add `probe_type` (the label) and `scope` ("all layers" / "layer l") columns, stable row order."""
    if df.empty:
        return df
    df = df.copy()
    df["probe_type"] = df["label"].str.replace(r"^[a-z0-9]+:", "", regex=True)
    df["scope"] = np.where(df["layer"] < 0, "all layers", "layer " + df["layer"].astype(int).astype(str))
    return df.sort_values(["clip_id", "probe_type", "layer", "evaluation", "probe_id"], kind="stable").reset_index(drop=True)


def separated_ids(df: pd.DataFrame) -> list:
    """Clips whose clean output improves SI-SDR by >= SEPARATED_DB (column clean_si_sdri)."""
    if "clean_si_sdri" not in df.columns:
        return []
    gains = df.groupby("clip_id")["clean_si_sdri"].first()
    return sorted(gains[gains >= SEPARATED_DB].index)


# (claim id, statement, probe type whose effect should be larger, the other, effect column)
CLAIMS = (
    ("P1.additive_semantic", "Identity is carried by the additive injection: swapping the time-mean of every "
     "cross-attention output moves the output toward the other source more than swapping its frame-varying "
     "part (semantic_v2, additive - routing)", "additive", "routing", "semantic_v2"),
    ("P1.routing_acoustic", "Acoustic detail is carried by the routing: swapping the frame-varying part changes "
     "the output off the identity axis more than swapping the time-mean (acoustic_v2, routing - additive)",
     "routing", "additive", "acoustic_v2"),
    ("P1.values_semantic", "Identity travels in the values (our mapping of the additive pathway): a values "
     "swap moves the identity more than a weights swap (semantic_v2, values - weights)",
     "values swap", "weights swap", "semantic_v2"),
    ("P1.weights_acoustic", "Acoustic detail travels in the weights (our mapping of the routing): a weights "
     "swap changes the output off the identity axis more than a values swap (acoustic_v2, weights - values)",
     "weights swap", "values swap", "acoustic_v2"),
)


def paired_differences(whole: pd.DataFrame, first: str, second: str, effect: str) -> pd.Series:
    """Per clip: effect of probe type `first` minus that of `second` (clips having both)."""
    wide = whole[whole["probe_type"].isin([first, second])].pivot_table(
        index="clip_id", columns="probe_type", values=effect, aggfunc="mean")
    if first not in wide.columns or second not in wide.columns:
        return pd.Series(dtype=float)
    return (wide[first] - wide[second]).dropna().sort_index()


def claims(whole: pd.DataFrame, separated: list, resamples: int, seed: int) -> list:
    out = []
    for claim_id, text, first, second, effect in CLAIMS:
        diffs = paired_differences(whole, first, second, effect)
        for subset, ids in (("all clips", None), ("separated", separated)):
            values = diffs if ids is None else diffs[diffs.index.isin(ids)]
            out.append(paired_claim(values.to_numpy(), claim_id=claim_id, claim=text, experiment="p1",
                                    subset=subset, clip_ids=list(values.index), resamples=resamples, seed=seed,
                                    units=effect))
    return out


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    resamples, seed = ctx.config.bootstrap, ctx.config.noise_seed
    if df.empty:
        return {"clips": 0, "claims": []}
    df = tidy(df) if "probe_type" not in df.columns else df
    whole = df[df["scope"] == "all layers"]
    effect_columns = [c for c in EFFECTS + SECONDARY if c in whole.columns]
    table = {}
    for probe_type, sub in whole.groupby("probe_type"):
        table[probe_type] = {col: summarize_values(sub[col], resamples, seed) for col in effect_columns}
    controls = whole[whole["probe_type"].str.contains("identity")]
    control_columns = [c for c in effect_columns + ["local_effect"] if c in controls.columns]
    control_max = float(np.nanmax(np.abs(controls[control_columns].to_numpy(dtype=float)))) if len(controls) else None
    separated = separated_ids(whole)

    def dis(frame, additive="additive", routing="routing"):
        return dissociation(frame, additive=additive, routing=routing, effects=EFFECTS, resamples=resamples, seed=seed)

    gains = whole.groupby("clip_id")["clean_si_sdri"].first() if "clean_si_sdri" in whole.columns else pd.Series(dtype=float)
    summary = {
        "clips": int(df["clip_id"].nunique()),
        "separated_clips": separated,
        "separated_rule": f"clean SI-SDRi >= {SEPARATED_DB:g} dB",
        "clean_si_sdri": {str(k): float(v) for k, v in gains.items()},
        "grid_reduction": REDUCTION.format(n=IDENTITY_CONTROL_CLIPS),
        "effects_all_layers": table,
        "identity_control_max_abs_effect": control_max,
        "dissociation": dis(whole),
        "dissociation_separated": dis(whole[whole["clip_id"].isin(separated)]),
        "dissociation_values_weights": dis(whole, "values swap", "weights swap"),
        "dissociation_by_sources": by_group(whole, "group", dis),
        "secondary_dissociation_v1": dissociation(whole, effects=("semantic_effect", "acoustic_effect"),
                                                  resamples=resamples, seed=seed),
        "claims": claims(whole, separated, resamples, seed),
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
    for ax, effect, label in zip(axes, EFFECTS, ("semantic_v2 (identity position shift, A=0 -> B=1)",
                                                 "acoustic_v2 (change off the identity plane)")):
        _bars(ax, ["additive", "routing"], {k: cells.get(f"{k}/{effect}", {}) for k in ("additive", "routing")},
              effect.replace("_", " "), label)
    fig.suptitle(f"P1: additive vs routing swap, all cross-attention layers (mean, bootstrap 95% interval, n = {n})")
    produced.append((save_figure(fig, out_dir / "p1_dissociation.png"),
                     "P1 2x2 dissociation: semantic (left) and acoustic (right) effect of swapping the time-mean "
                     "('additive') or the frame-varying part ('routing') of every cross-attention output with the "
                     f"counterfactual prompt's run; bars = mean over clips, whiskers = {interval}."))

    table = summary.get("effects_all_layers", {})
    names = [n for n in ("additive", "routing", "weights swap", "values swap", "full patch", "uniform",
                         "text knockout") if n in table]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, effect in zip(axes, EFFECTS):
        _bars(ax, names, {n: table[n][effect] for n in names}, effect.replace("_", " "), effect.split("_")[0])
    fig.suptitle("P1: all probe variants (all cross-attention layers at once)")
    produced.append((save_figure(fig, out_dir / "p1_variants.png"),
                     "P1 variants: semantic_v2 and acoustic_v2 effects of the additive and routing swaps, the "
                     "weights and values swaps and the full cross-attention patch (mean over clips, "
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
