"""P6 Layer-Selective Attention Caching (LSAC) against naive step reduction at equal self-attention compute.

Definitions
-----------
* Full run: config.steps midpoint steps (E = 2 * steps evaluations), nothing cached: the reference
  "full-step clean output". Every run of this experiment is a plain `model.separate`-style sampling at batch
  size 1 (`latentflow_fast.lsac.sample_with_cache`), so wall times are what a user would see.
* LSAC(S, N): the self-attention of the stable layers S (P3's split, see p4_freezing.layer_split) is
  recomputed at evaluations 0, N, 2N, ... and reused in between, for every N in config.lsac_refresh.
  Control: the same with the fast layers ("LSAC-fast"), to see whether choosing the stable layers matters.
* Self-attention compute = number of self-attention calls (one layer at one evaluation), counted by the
  cache and checked against the formula: LSAC makes L*E - |S|*(E - ceil(E/N)) calls, i.e. saves
  |S|*(E - ceil(E/N))/(L*E) = |S|/L*(1 - 1/N) when N divides E. Wall time = the sampling loop's time
  (decoding excluded), one measurement per run on a shared CPU: treat small differences as noise.
* Naive step reduction: s' midpoint steps (2*s'*L self-attention calls). Matching rule: for each LSAC run,
  s' = the step count whose call count is nearest to LSAC's (ties: the larger s', i.e. the more generous
  to naive). Naive runs also cover steps/2 and 3*steps/4 to draw the quality-vs-compute curve. Note that at
  equal self-attention compute, naive also skips the FFN / cross-attention of the dropped evaluations, so
  its total compute (and wall time) is lower than LSAC's.
* Quality, per clip against the reference stem: SI-SDR (dB), SI-SDR improvement over the mixture;
  against the full-step clean output: MR-STFT distance and SI-SDR to it (fidelity).
* Degradation of a variant = mean over clips of SI-SDR(full, ref) - SI-SDR(variant, ref) in dB (negative =
  the variant scored higher). Quality retention ratio = degradation(naive) / degradation(LSAC), where each
  degradation is floored at DEGRADATION_FLOOR_DB (0.01 dB) so that a zero or negative LSAC degradation gives
  a finite ratio (flagged `lsac_degradation_at_floor`); `retention_ratio_mrstft` is the same ratio on the
  MR-STFT distance to the full output (floor 1e-6), which is zero only for an identical output.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import metrics
from ..lsac import LSACConfig, expected_saved_fraction, lsac_policy, sample_with_cache
from ..sampler import METHODS
from .base import Experiment, ProtocolContext
from .p4_freezing import condition_id, layer_split

DEGRADATION_FLOOR_DB = 0.01
MRSTFT_FLOOR = 1e-6


def matched_steps(calls: int, n_layers: int, max_steps: int, per_step: int) -> int:
    """Naive step count whose self-attention calls are nearest to `calls` (ties: more steps)."""
    best = None
    for s in range(1, max_steps + 1):
        gap = abs(s * per_step * n_layers - calls)
        if best is None or gap <= best[0]:
            best = (gap, s)
    return best[1]


def conditions(ctx: ProtocolContext, split: dict) -> list[dict]:
    cfg = ctx.config
    L = ctx.model.config.n_layers
    per_step = METHODS[cfg.method]
    E = cfg.steps * per_step
    out = [{"variant": "full", "steps": cfg.steps, "layers": (), "refresh": 1}]
    naive_steps = {max(1, cfg.steps // 2), max(1, (3 * cfg.steps) // 4)}
    for N in sorted({int(n) for n in cfg.lsac_refresh}):
        for name, layers in (("lsac", split["stable_layers"]), ("lsac_fast", split["fast_layers"])):
            if not layers:
                continue
            lsac = LSACConfig(layers=tuple(layers), refresh=N)
            calls = expected_saved_fraction(L, E, lsac)["self_attention_calls"]
            out.append({"variant": name, "steps": cfg.steps, "layers": tuple(lsac.layers), "refresh": N,
                        "expected_calls": calls})
            if name == "lsac":
                naive_steps.add(matched_steps(calls, L, cfg.steps, per_step))
    for s in sorted(naive_steps - {cfg.steps}):
        out.append({"variant": "naive", "steps": s, "layers": (), "refresh": 1})
    for c in out:
        c["probe_id"] = condition_id("p6", c["variant"], c["steps"], list(c["layers"]), c["refresh"])
    return out


@torch.no_grad()
def _run_one(ctx: ProtocolContext, pclip, c: dict) -> tuple[torch.Tensor, dict]:
    model, cfg = ctx.model, ctx.config
    clip = pclip.clip
    inputs = model.prepare(clip.mixture, clip.sample_rate, clip.prompt, seed=cfg.noise_seed)
    if c["layers"]:
        config = LSACConfig(layers=c["layers"], refresh=c["refresh"])
        config.check(model.config.n_layers)
        policy = lsac_policy(config)
    else:
        policy = lambda layer, evaluation: False  # noqa: E731
    result, stats = sample_with_cache(model, inputs, policy, steps=c["steps"], method=cfg.method)
    target, _ = model.decode(result.final, inputs)
    return target.reshape(-1), stats.as_dict()


def run(ctx: ProtocolContext) -> pd.DataFrame:
    from tqdm.auto import tqdm

    cfg = ctx.config
    L = ctx.model.config.n_layers
    per_step = METHODS[cfg.method]
    E_full = cfg.steps * per_step
    split = layer_split(ctx)
    todo_conditions = conditions(ctx, split)
    store = ctx.store("p6")
    done = store.done_keys()
    total = sum((p.clip.clip_id, c["probe_id"]) not in done for p in ctx.clips for c in todo_conditions)
    bar = tqdm(total=total, unit="run", desc="p6 lsac", disable=not ctx.progress, dynamic_ncols=True)
    try:
        for pclip in ctx.clips:
            todo = [c for c in todo_conditions if (pclip.clip.clip_id, c["probe_id"]) not in done]
            if not todo:
                continue
            # The full run is the reference of every other row: always (re)computed, stored if missing.
            full_c = todo_conditions[0]
            full, full_stats = _run_one(ctx, pclip, full_c)
            ref = pclip.clip.target
            ref = None if ref is None else torch.as_tensor(ref, dtype=torch.float32).reshape(-1)
            mixture = pclip.clip.mixture.reshape(-1)
            rows = []
            for c in todo:
                out, stats = (full, full_stats) if c is full_c else _run_one(ctx, pclip, c)
                row = {
                    "clip_id": pclip.clip.clip_id, "probe_id": c["probe_id"], "group": pclip.group,
                    "gain_group": pclip.meta.get("gain_group", ""), "variant": c["variant"], "steps": c["steps"],
                    "evaluations": c["steps"] * per_step, "layers": ",".join(map(str, c["layers"])),
                    "refresh": c["refresh"],
                    "self_attention_calls": stats["self_attention_computed"],
                    "self_attention_skipped": stats["self_attention_skipped"],
                    "expected_calls": c.get("expected_calls", L * c["steps"] * per_step),
                    "compute_fraction": stats["self_attention_computed"] / (L * E_full),
                    "wall_seconds": stats["wall_seconds"], "full_wall_seconds": full_stats["wall_seconds"],
                    "mrstft_to_full": float(metrics.multi_resolution_stft_distance(out, full)),
                    "si_sdr_to_full_db": float(metrics.si_sdr(out, full)),
                }
                if ref is not None:
                    row["si_sdr_db"] = float(metrics.si_sdr(out, ref))
                    row["full_si_sdr_db"] = float(metrics.si_sdr(full, ref))
                    row["si_sdri_db"] = float(metrics.si_sdr_improvement(out, ref, mixture))
                else:
                    row["si_sdr_db"] = row["full_si_sdr_db"] = row["si_sdri_db"] = math.nan
                row["degradation_db"] = row["full_si_sdr_db"] - row["si_sdr_db"]
                rows.append(row)
                bar.update(1)
            store.write(rows)
    finally:
        bar.close()
    return store.load()


def _mean(series) -> Optional[float]:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _variant_summary(part: pd.DataFrame) -> dict:
    return {
        "steps": int(part["steps"].iloc[0]), "self_attention_calls": int(part["self_attention_calls"].iloc[0]),
        "compute_fraction": float(part["compute_fraction"].iloc[0]),
        "mean_si_sdr_db": _mean(part["si_sdr_db"]), "median_si_sdri_db": (
            float(part["si_sdri_db"].median()) if part["si_sdri_db"].notna().any() else None),
        "mean_degradation_db": _mean(part["degradation_db"]), "mean_mrstft_to_full": _mean(part["mrstft_to_full"]),
        "wall_ratio_to_full": float(part["wall_seconds"].sum() / part["full_wall_seconds"].sum()),
        # per clip (in clip order): the spread tells a real saving from timing noise (protocol.limitations)
        "wall_ratio_by_clip": [float(w / f) for _, w, f in sorted(
            zip(part["clip_id"], part["wall_seconds"], part["full_wall_seconds"]))],
    }


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    split = layer_split(ctx)
    if df.empty:
        return {**split, "rows": 0}
    cfg = ctx.config
    L = ctx.model.config.n_layers
    per_step = METHODS[cfg.method]
    E = cfg.steps * per_step
    summary: dict = {**split, "rows": int(len(df)), "clips": int(df["clip_id"].nunique()),
                     "degradation_floor_db": DEGRADATION_FLOOR_DB}
    full = df[df["variant"] == "full"]
    summary["full"] = _variant_summary(full) if len(full) else None
    naive = {int(s): _variant_summary(p) for s, p in df[df["variant"] == "naive"].groupby("steps")}
    summary["naive"] = {str(s): v for s, v in naive.items()}
    results = {}
    for (variant, N), part in df[df["variant"].isin(["lsac", "lsac_fast"])].groupby(["variant", "refresh"]):
        entry = _variant_summary(part)
        layers = [int(x) for x in str(part["layers"].iloc[0]).split(",") if x != ""]
        expected = expected_saved_fraction(L, E, LSACConfig(layers=tuple(layers), refresh=int(N)))
        counted_saved = float(part["self_attention_skipped"].iloc[0] / (L * E))
        entry.update(layers=layers, refresh=int(N), counted_saved_fraction=counted_saved,
                     expected_saved_fraction_exact=expected["exact"], paper_formula_saved_fraction=expected["paper"],
                     count_matches_formula=bool(abs(counted_saved - expected["exact"]) < 1e-12),
                     measured_wall_saved_fraction=1.0 - entry["wall_ratio_to_full"])
        if variant == "lsac":
            s = matched_steps(entry["self_attention_calls"], L, cfg.steps, per_step)
            match = naive.get(s) if s != cfg.steps else summary["full"]
            entry["matched_naive_steps"] = s
            if match is not None:
                d_lsac, d_naive = entry["mean_degradation_db"], match["mean_degradation_db"]
                if d_lsac is not None and d_naive is not None:
                    entry["matched_naive_degradation_db"] = d_naive
                    entry["retention_ratio"] = max(d_naive, DEGRADATION_FLOOR_DB) / max(d_lsac, DEGRADATION_FLOOR_DB)
                    entry["lsac_degradation_at_floor"] = bool(d_lsac <= DEGRADATION_FLOOR_DB)
                m_lsac, m_naive = entry["mean_mrstft_to_full"], match["mean_mrstft_to_full"]
                entry["matched_naive_mrstft_to_full"] = m_naive
                entry["retention_ratio_mrstft"] = max(m_naive, MRSTFT_FLOOR) / max(m_lsac, MRSTFT_FLOOR)
                entry["matched_naive_calls"] = match["self_attention_calls"]
                entry["matched_naive_wall_ratio_to_full"] = match["wall_ratio_to_full"]
        results[f"{variant}_N{int(N)}"] = entry
    summary["lsac"] = results
    lsac_only = {k: v for k, v in results.items() if k.startswith("lsac_N")}
    if lsac_only:
        ratios = [v.get("retention_ratio") for v in lsac_only.values() if v.get("retention_ratio") is not None]
        summary["max_retention_ratio"] = max(ratios) if ratios else None
        summary["all_counts_match_formula"] = all(v["count_matches_formula"] for v in results.values())
        parts = []
        for v in sorted(lsac_only.values(), key=lambda v: v["refresh"]):
            parts.append(
                f"N={v['refresh']}: {100 * v['counted_saved_fraction']:.1f}% fewer self-attention calls, "
                f"degradation {_num(v['mean_degradation_db'])} dB vs naive {v['matched_naive_steps']} steps "
                f"{_num(v.get('matched_naive_degradation_db'))} dB (retention {_num(v.get('retention_ratio'), '.2f')})")
        summary["headline"] = f"LSAC on stable layers {split['stable_layers']}: " + "; ".join(parts)
    return summary


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return []
    made = []
    agg = df.groupby(["variant", "steps", "refresh", "layers"], as_index=False).agg(
        compute=("compute_fraction", "mean"), sdr=("si_sdr_db", "mean"), mrstft=("mrstft_to_full", "mean"),
        wall=("wall_seconds", "sum"), full_wall=("full_wall_seconds", "sum"))
    agg["wall_ratio"] = agg["wall"] / agg["full_wall"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"full": ("k", "*"), "naive": ("tab:blue", "o"), "lsac": ("tab:red", "s"), "lsac_fast": ("tab:gray", "^")}
    labels = {"full": "full steps", "naive": "naive step reduction", "lsac": "LSAC (stable layers)",
              "lsac_fast": "LSAC on fast layers (control)"}
    for ax, column, title in ((axes[0], "sdr", "mean SI-SDR to reference (dB)"),
                              (axes[1], "mrstft", "MR-STFT distance to full-step output")):
        naive_curve = agg[agg["variant"].isin(["naive", "full"])].sort_values("compute")
        ax.plot(naive_curve["compute"], naive_curve[column], color="tab:blue", lw=1, alpha=0.6)
        for variant, part in agg.groupby("variant"):
            color, marker = styles.get(variant, ("tab:green", "x"))
            ax.scatter(part["compute"], part[column], color=color, marker=marker, label=labels.get(variant, variant),
                       zorder=3)
            if variant.startswith("lsac"):
                for _, r in part.iterrows():
                    ax.annotate(f"N={int(r['refresh'])}", (r["compute"], r[column]), fontsize=7,
                                textcoords="offset points", xytext=(4, 3))
        ax.set_xlabel("self-attention calls / full run")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "p6_quality_vs_compute.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append((str(path), "P6: quality vs self-attention compute (mean over clips). Blue: naive step "
                 "reduction (fewer midpoint steps); red: LSAC over P3's stable layers with refresh N; grey: the "
                 "same caching on the fast layers (control). Left: SI-SDR to the reference stem; right: distance "
                 "to the full-step output."))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    order = agg.sort_values("compute")
    xs = np.arange(len(order))
    ax.bar(xs - 0.2, 1 - order["compute"], width=0.4, label="self-attention calls saved (counted)")
    ax.bar(xs + 0.2, 1 - order["wall_ratio"], width=0.4, label="sampling wall time saved (measured)")
    names = [f"{r.variant}\n{'N=' + str(int(r.refresh)) if r.variant.startswith('lsac') else str(int(r.steps)) + ' st'}"
             for r in order.itertuples()]
    ax.set_xticks(xs, names, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("fraction saved vs full run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "p6_compute_saved.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append((str(path), "P6: compute saved by each variant relative to the full run: counted self-attention "
                 "calls vs measured wall time of the sampling loop (single measurements on a shared CPU)."))
    return made


EXPERIMENT = Experiment(name="p6", title="P6 Layer-Selective Attention Caching vs naive step reduction", run=run,
                        summarize=summarize, figures=figures)
