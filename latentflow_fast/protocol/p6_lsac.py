"""P6 Layer-Selective Attention Caching (LSAC) as a quality-vs-compute frontier against naive step reduction.

Definitions
-----------
* Full run: the clip's clean trajectory (config.steps steps of config.method, E evaluations), shared with
  P4 and P5 (`ProtocolContext.clean_trajectory`); its decoded target is the "full-step output".
* Noise floor: the same full run with another noise seed (config.noise_seed + 1). Per clip, the SI-SDR
  floor is |SI-SDR(other seed) - SI-SDR(full)| and the MR-STFT floor is the MR-STFT distance between the
  two outputs: what changing nothing but the noise does.
* LSAC(S, kind, start, N): the self-attention of the layers S recomputes at evaluations e < start_l and
  e = start_l + jN, and reuses in between (kind "output": the per-head output; "map": the attention map,
  applied to the current values). Layer sets S: the stable set of P3's agreed split and each criterion's
  stable set (deduplicated); start "warmup" = each layer's convergence point k*_l (the latest over the
  criteria for the agreed set, the criterion's own for a criterion's set), or a fixed evaluation (0).
  Each is a `probe.Reuse` row run by the probe engine from the clean trajectory.
* Naive step reduction: the full sampler with fewer steps, midpoint (config.naive_midpoint_steps) and
  Euler (config.naive_euler_steps).
* Compute, counted three ways, each as a fraction of the full run:
  - self-attention calls: L E - (calls answered from the cache) for LSAC, L E' for E' evaluations;
  - FLOPs: SAMAudioConfig.flops_per_evaluation(T, text tokens) per evaluation, minus per cached call what
    the engine skips: 4 T^2 D (q.k and p.v) for outputs, 2 T^2 D (q.k) for maps; the projections still run;
  - wall time of the sampling loop (decoding excluded): naive and noise-floor runs are timed whole (the
    noise-floor run gives the full run's time); an LSAC row is timed from its branch evaluation b on, plus
    b evaluations at the full run's per-evaluation time. Single measurements at batch 1 on a shared CPU.
* Quality per clip: SI-SDR to the reference stem, MR-STFT distance and SI-SDR to the full-step output;
  degradation = SI-SDR(full) - SI-SDR(variant) (positive = worse).
* Retention at equal compute (FLOPs): the naive midpoint frontier (its runs and the full run) linearly
  interpolated to the LSAC variant's FLOPs. When both degradations (LSAC and interpolated naive) are below
  the noise floor, the verdict is "indistinguishable" and no ratio is given; otherwise "lsac_better" /
  "naive_better", with the ratio naive / LSAC only when both are above the floor.
* Claims (positive = the paper's direction, LSAC beats naive step reduction at equal compute), for the
  primary variant (first layer set, first kind, first start, smallest N): per clip, SI-SDR(LSAC) minus the
  interpolated naive SI-SDR at equal FLOPs, and the same at equal self-attention calls; and the
  interpolated naive MR-STFT-to-full minus LSAC's at equal FLOPs. protocol.stats.paired_claim evaluates
  each on all clips and on the separated subset with the noise floor of its units: an interval inside
  +-floor is "not testable (floor)", i.e. indistinguishable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import metrics
from ..probe import Reuse
from ..sampler import METHODS
from .base import Experiment, ProtocolContext
from .clips import separation_gain_db
from .layer_sets import claim, p3_split, self_sites, separated_ids, split_note, warmup_starts
from .stats import bootstrap_ci

FULL_GRID = {"lsac_refresh": [2, 3, 4, 8], "lsac_starts": ["warmup", 0], "reuse_kinds": ["output", "map"],
             "lsac_sets": ["split", "criteria"], "naive_midpoint_steps": [8, 12], "naive_euler_steps": [16, 24]}


# ---------------------------------------------------------------------------------------------- grid
def lsac_sets(split: dict, kinds=("split", "criteria")) -> dict:
    """name -> (layers, criterion for warm-up or None = latest over criteria): the "stable" set of P3's
    split ("split"; under no split P3's primary criterion's, flagged) and each criterion's ("criteria")."""
    sets, seen = {}, set()
    if "split" in kinds and split["stable_layers"]:
        sets["stable"] = (tuple(split["stable_layers"]), None)
        seen.add(tuple(split["stable_layers"]))
    if "criteria" in kinds:
        for name, c in sorted(split["criteria"].items()):
            layers = tuple(c["stable_layers"])
            if layers and layers not in seen:
                sets[f"{name}:stable"] = (layers, name)
                seen.add(layers)
    return sets


def lsac_rows(ctx: ProtocolContext, split: dict) -> list[Reuse]:
    cfg = ctx.config
    E = cfg.steps * METHODS[cfg.method]
    rows = []
    for name, (layers, criterion) in lsac_sets(split, cfg.lsac_sets).items():
        for what in cfg.reuse_kinds:
            for start in cfg.lsac_starts:
                starts = (warmup_starts(split, layers, criterion, E) if start == "warmup"
                          else tuple(int(start) for _ in layers))
                for N in sorted({int(n) for n in cfg.lsac_refresh}):
                    rows.append(Reuse(self_sites(layers), what, start=starts, refresh=N,
                                      label=f"{name}|{start}"))
    return rows


def naive_runs(ctx: ProtocolContext) -> list[tuple[str, int]]:
    cfg = ctx.config
    runs = [("midpoint", int(s)) for s in cfg.naive_midpoint_steps] + [("euler", int(s)) for s in cfg.naive_euler_steps]
    full = cfg.steps * METHODS[cfg.method]
    # step reduction: fewer evaluations than the full run (others are dropped, e.g. in --quick)
    return [r for r in dict.fromkeys(runs) if r[1] * METHODS[r[0]] < full]


def evaluations_per_clip(ctx: ProtocolContext, split: dict) -> int:
    """Network evaluations P6 runs per clip beyond the shared clean run: noise floor, naive runs, and each
    LSAC row from its branch evaluation on (its cost)."""
    cfg = ctx.config
    E = cfg.steps * METHODS[cfg.method]
    naive = sum(steps * METHODS[method] for method, steps in naive_runs(ctx))
    firsts = [r.first_reuse(E) for r in lsac_rows(ctx, split)]
    return E + naive + sum(E - (E - 1 if f is None else f - 1) for f in firsts)


def saved_flops_per_call(what: str, frames: int, dim: int) -> int:
    """FLOPs (2 per multiply-add) the engine skips for one reused self-attention call."""
    return (4 if what == "output" else 2) * frames * frames * dim


# ---------------------------------------------------------------------------------------------- run
def _sdr(out: torch.Tensor, full: torch.Tensor, ref) -> dict:
    row = {"si_sdr_to_full_db": float(metrics.si_sdr(out, full))}
    if ref is not None:
        ref = torch.as_tensor(ref, dtype=torch.float32).reshape(-1)
        row.update(si_sdr_db=float(metrics.si_sdr(out, ref)), full_si_sdr_db=float(metrics.si_sdr(full, ref)))
    else:
        row.update(si_sdr_db=math.nan, full_si_sdr_db=math.nan)
    row["degradation_db"] = row["full_si_sdr_db"] - row["si_sdr_db"]
    return row


def _quality(out: torch.Tensor, full: torch.Tensor, pclip) -> dict:
    """Quality of one output against the full-step output and the clip's reference stem (module docstring)."""
    out, full = out.reshape(-1).float(), full.reshape(-1).float()
    return {"mrstft_to_full": float(metrics.multi_resolution_stft_distance(out[None], full[None])[0]),
            **_sdr(out, full, pclip.clip.target)}


def quality_end_metrics(target, residual, traj) -> list[dict]:
    """SI-SDR columns of each branched row against the full run (the trajectory's own output) and the
    clip's reference stem, for ProbeEngine.sweep(end_metrics=...) (module level: picklable). The MR-STFT
    distance to the full run is the engine's end_mrstft_to_clean."""
    full = traj.target.reshape(-1).float()
    return [_sdr(target[r].reshape(-1).float(), full, traj.clip.target) for r in range(target.shape[0])]


QUALITY = ("si_sdr_to_full_db", "si_sdr_db", "full_si_sdr_db", "degradation_db")


def clip_rows(ctx: ProtocolContext, pclip, split: dict, rows: list[Reuse]) -> list[dict]:
    """Every P6 row of one clip (full, noise floor, naive, LSAC)."""
    cfg, engine, model = ctx.config, ctx.engine, ctx.model
    E = cfg.steps * METHODS[cfg.method]
    L = model.config.n_layers
    clean = ctx.clean_trajectory(pclip)
    full = clean.target
    T, tokens = clean.states[0].shape[1], clean.inputs.text.shape[1]
    flops_eval = model.config.flops_per_evaluation(T, tokens)
    base = {"clip_id": pclip.clip.clip_id, "group": pclip.group}

    def plain(seed, steps, method):
        traj = engine.trajectory(pclip.clip, steps=steps, method=method, seed=seed, cache_heads=())
        return traj.target, traj.sampling_seconds, traj.num_evaluations

    floor_out, full_wall, _ = plain(cfg.noise_seed + 1, cfg.steps, cfg.method)
    out = [{**base, "probe_id": "full", "variant": "full", "method": cfg.method, "steps": cfg.steps,
            "evaluations": E, "self_attention_calls": L * E, "flops": flops_eval * E, "wall_seconds": full_wall,
            "clean_si_sdri_db": separation_gain_db(full, pclip), **_quality(full, full, pclip)}]
    floor = _quality(floor_out, full, pclip)
    out.append({**base, "probe_id": f"floor-seed{cfg.noise_seed + 1}", "variant": "noise_floor", "method": cfg.method,
                "steps": cfg.steps, "evaluations": E, "self_attention_calls": L * E, "flops": flops_eval * E,
                "wall_seconds": full_wall, **floor})
    for method, steps in naive_runs(ctx):
        target, wall, evaluations = plain(cfg.noise_seed, steps, method)
        out.append({**base, "probe_id": f"naive-{method}-{steps}", "variant": "naive", "method": method,
                    "steps": steps, "evaluations": evaluations, "self_attention_calls": L * evaluations,
                    "flops": flops_eval * evaluations, "wall_seconds": wall, **_quality(target, full, pclip)})
    per_evaluation = full_wall / E
    for reuse in rows:
        # one row per batch, in this process (shard given): its sampling time is this variant's alone
        df = engine.sweep(clean, [reuse], end_effect=True, progress=False, batch_size=1, timing=True,
                          shard=(0, 1), end_metrics=quality_end_metrics)
        result = df.iloc[0]
        branch_wall = float(result["batch_sampling_seconds"])
        b = engine.branch_evaluation(reuse, clean)
        reused = reuse.reused_calls(E)
        name, start = reuse.label.split("|")
        out.append({**base, "probe_id": reuse.probe_id, "variant": "lsac", "method": cfg.method, "steps": cfg.steps,
                    "evaluations": E, "layer_set": name, "layers": ",".join(s.split(".")[1] for s in reuse.sites),
                    "what": reuse.what, "start": start,
                    "starts": ",".join(map(str, reuse.starts().values())), "refresh": int(reuse.refresh),
                    "self_attention_calls": L * E - reused, "reused_calls": reused,
                    "engine_skipped_calls": int(df["batch_attention_calls_skipped"].iloc[0]),
                    "flops": flops_eval * E - reused * saved_flops_per_call(reuse.what, T, model.config.dim),
                    "branch_evaluation": b, "wall_seconds": b * per_evaluation + branch_wall,
                    "mrstft_to_full": float(result["end_mrstft_to_clean"]), **{k: float(result[k]) for k in QUALITY}})
    for row in out:
        row.update(calls_fraction=row["self_attention_calls"] / (L * E), flops_fraction=row["flops"] / (flops_eval * E),
                   wall_fraction=row["wall_seconds"] / full_wall, floor_sdr_db=abs(floor["degradation_db"]),
                   floor_mrstft=floor["mrstft_to_full"])
    return out


def run(ctx: ProtocolContext) -> pd.DataFrame:
    from tqdm.auto import tqdm

    split = p3_split(ctx)
    rows = lsac_rows(ctx, split)
    store = ctx.store("p6")
    done = store.done_keys()
    bar = tqdm(total=len(ctx.clips), unit="clip", desc="p6 lsac", disable=not ctx.progress, dynamic_ncols=True)
    try:
        for pclip in ctx.clips:
            clip_id = pclip.clip.clip_id
            if not any(c == clip_id for c, _ in done):  # a clip's rows are written in one shard: present = complete
                store.write(clip_rows(ctx, pclip, split, rows))
            bar.update(1)
    finally:
        bar.close()
    return store.load()


# ---------------------------------------------------------------------------------------------- summary
def _mean_ci(values, ctx) -> dict:
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), dtype=float)
    if not v.size:
        return {"mean": None, "ci95": [None, None]}
    lo, hi = bootstrap_ci(v, resamples=ctx.config.bootstrap)
    return {"mean": float(v.mean()), "ci95": [lo, hi]}


def frontier(df: pd.DataFrame, clip_id: str, x: str, y: str, method: str, full_method: str) -> Optional[callable]:
    """Per-clip naive frontier y(x) (naive runs of `method` plus the full run), linearly interpolated."""
    part = df[(df["clip_id"] == clip_id) & (((df["variant"] == "naive") & (df["method"] == method))
                                           | ((df["variant"] == "full") & (method == full_method)))]
    part = part.groupby(x)[y].mean().sort_index()
    if len(part) < 2:
        return None
    xs, ys = part.index.to_numpy(dtype=float), part.to_numpy(dtype=float)
    return lambda value: float(np.interp(value, xs, ys))


def _verdict(d_lsac: float, d_naive: float, floor: float) -> dict:
    if d_lsac is None or d_naive is None or floor is None:
        return {"verdict": "not testable"}
    if abs(d_lsac) < floor and abs(d_naive) < floor:
        return {"verdict": "indistinguishable"}
    out = {"verdict": "lsac_better" if d_lsac < d_naive else "naive_better"}
    if d_lsac >= floor and d_naive >= floor:
        out["ratio_naive_over_lsac"] = d_naive / d_lsac
    return out


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    split = p3_split(ctx)
    cfg = ctx.config
    base = {"split_source": split["split_source"], "stable_layers": split["stable_layers"],
            "fast_layers": split["fast_layers"], "no_split": split["no_split"],
            "grid": {"run": {"lsac_refresh": [int(n) for n in cfg.lsac_refresh], "lsac_starts": list(cfg.lsac_starts),
                             "reuse_kinds": list(cfg.reuse_kinds),
                             "naive_midpoint_steps": [int(s) for s in cfg.naive_midpoint_steps],
                             "naive_euler_steps": [int(s) for s in cfg.naive_euler_steps],
                             "lsac_sets": list(cfg.lsac_sets),
                             "evaluations_per_clip": evaluations_per_clip(ctx, split)}, "full": FULL_GRID}}
    if split["no_split"]:
        base["split_note"] = split_note(split)
    if df.empty:
        return {**base, "rows": 0}
    clips = sorted(df["clip_id"].unique())
    floor_rows = df[df["variant"] == "noise_floor"]
    floor_sdr = float(floor_rows["degradation_db"].abs().mean())
    floor_mrstft = float(floor_rows["mrstft_to_full"].mean())
    summary = {**base, "rows": int(len(df)), "clips": len(clips),
               "noise_floor": {"si_sdr_db": floor_sdr, "mrstft": floor_mrstft,
                               "definition": "mean over clips of |SI-SDR(seed+1) - SI-SDR(seed)| and of the "
                                             "MR-STFT distance between the two seeds' outputs"}}
    variants = {}
    keys = ["variant", "method", "steps", "layer_set", "what", "start", "refresh"]
    df = df.copy()
    for k in keys:
        if k not in df:
            df[k] = None
    df["key"] = df.apply(lambda r: (f"{r['variant']}:{r['method']}:{int(r['steps'])}" if r["variant"] != "lsac" else
                                    f"lsac:{r['layer_set']}:{r['what']}:{r['start']}:N{int(r['refresh'])}"), axis=1)
    for key, part in df.groupby("key", sort=True):
        entry = {"variant": part["variant"].iloc[0], "method": part["method"].iloc[0], "steps": int(part["steps"].iloc[0]),
                 "calls_fraction": float(part["calls_fraction"].mean()), "flops_fraction": float(part["flops_fraction"].mean()),
                 "wall_fraction": float(part["wall_seconds"].sum() / part["wall_seconds"].div(part["wall_fraction"]).sum()),
                 "si_sdr_db": _mean_ci(part["si_sdr_db"], ctx), "degradation_db": _mean_ci(part["degradation_db"], ctx),
                 "mrstft_to_full": _mean_ci(part["mrstft_to_full"], ctx)}
        if entry["variant"] == "lsac":
            entry.update(layer_set=part["layer_set"].iloc[0], layers=part["layers"].iloc[0], what=part["what"].iloc[0],
                         start=part["start"].iloc[0], starts=part["starts"].iloc[0], refresh=int(part["refresh"].iloc[0]),
                         counted_saved_fraction=1.0 - entry["calls_fraction"],
                         count_matches_engine=bool((part["reused_calls"] == part["engine_skipped_calls"]).all()),
                         measured_wall_saved_fraction=1.0 - entry["wall_fraction"],
                         wall_ratio_by_clip=[float(w) for _, w in sorted(zip(part["clip_id"], part["wall_fraction"]))])
            # retention against the naive midpoint frontier at equal FLOPs, judged against the noise floor
            d_naive, m_naive = [], []
            for _, r in part.iterrows():
                f_sdr = frontier(df, r["clip_id"], "flops_fraction", "degradation_db", "midpoint", cfg.method)
                f_mr = frontier(df, r["clip_id"], "flops_fraction", "mrstft_to_full", "midpoint", cfg.method)
                d_naive.append(f_sdr(r["flops_fraction"]) if f_sdr else math.nan)
                m_naive.append(f_mr(r["flops_fraction"]) if f_mr else math.nan)
            d_lsac, mr_lsac = entry["degradation_db"]["mean"], entry["mrstft_to_full"]["mean"]
            dn = float(np.nanmean(d_naive)) if np.isfinite(d_naive).any() else None
            mn = float(np.nanmean(m_naive)) if np.isfinite(m_naive).any() else None
            entry["naive_at_equal_flops"] = {"degradation_db": dn, "mrstft_to_full": mn}
            entry["retention_si_sdr"] = _verdict(d_lsac, dn, floor_sdr)
            entry["retention_mrstft"] = _verdict(mr_lsac, mn, floor_mrstft)
        variants[key] = entry
    summary["variants"] = variants
    lsac_keys = [k for k in variants if k.startswith("lsac:")]
    # the limitations section reads the LSAC entries under "lsac"
    summary["lsac"] = {k: variants[k] for k in lsac_keys}
    summary["all_counts_match_engine"] = all(variants[k]["count_matches_engine"] for k in lsac_keys)
    gains = df[df["variant"] == "full"].set_index("clip_id")["clean_si_sdri_db"]
    summary["separated_clips"] = separated_ids(ctx, gains)
    summary["claims"] = lsac_claims(df, ctx, split, summary["separated_clips"], floor_sdr, floor_mrstft)
    if lsac_keys:
        parts = [f"{k}: {100 * (1 - variants[k]['flops_fraction']):.1f}% fewer FLOPs, "
                 f"{100 * variants[k]['counted_saved_fraction']:.1f}% fewer self-attention calls, "
                 f"SI-SDR verdict {variants[k]['retention_si_sdr']['verdict']}" for k in lsac_keys]
        summary["headline"] = "; ".join(parts)
    return summary


def lsac_claims(df: pd.DataFrame, ctx: ProtocolContext, split: dict, separated: list, floor_sdr: float,
                floor_mrstft: float) -> list:
    """The P6 claims (module docstring) with the noise floors: an interval inside +-floor is "not testable
    (floor)", i.e. LSAC and naive step reduction are indistinguishable."""
    cfg = ctx.config
    lsac = df[df["variant"] == "lsac"]
    ids = ("P6.lsac_vs_naive.flops.sisdr", "P6.lsac_vs_naive.calls.sisdr", "P6.lsac_vs_naive.flops.mrstft")
    if lsac.empty:
        return [c for cid in ids for c in claim(
            ctx, "p6", cid, "LSAC keeps quality better than naive step reduction at equal compute",
            pd.Series(dtype=float), separated, not_testable=f"model: no LSAC layer set ({split['split_source']})")]
    first = lsac.iloc[0]
    primary = lsac[(lsac["layer_set"] == first["layer_set"]) & (lsac["what"] == cfg.reuse_kinds[0])
                   & (lsac["start"] == str(cfg.lsac_starts[0])) & (lsac["refresh"] == lsac["refresh"].min())]
    name = (f"LSAC on the {primary['layer_set'].iloc[0]} layers ({primary['layers'].iloc[0]}), cached "
            f"{primary['what'].iloc[0]}s, start {primary['start'].iloc[0]}, N={int(primary['refresh'].iloc[0])}")
    if split["no_split"]:
        name += f" [{split_note(split)}]"
    values = {cid: {} for cid in ids}
    for _, r in primary.iterrows():
        f1 = frontier(df, r["clip_id"], "flops_fraction", "si_sdr_db", "midpoint", cfg.method)
        f2 = frontier(df, r["clip_id"], "calls_fraction", "si_sdr_db", "midpoint", cfg.method)
        f3 = frontier(df, r["clip_id"], "flops_fraction", "mrstft_to_full", "midpoint", cfg.method)
        if f1 is None:
            continue
        values[ids[0]][r["clip_id"]] = r["si_sdr_db"] - f1(r["flops_fraction"])
        values[ids[1]][r["clip_id"]] = r["si_sdr_db"] - f2(r["calls_fraction"])
        values[ids[2]][r["clip_id"]] = f3(r["flops_fraction"]) - r["mrstft_to_full"]
    texts = {ids[0]: (f"{name}: higher SI-SDR than naive midpoint step reduction interpolated to equal FLOPs", "dB",
                      floor_sdr),
             ids[1]: (f"{name}: higher SI-SDR than naive midpoint step reduction interpolated to equal "
                      "self-attention calls", "dB", floor_sdr),
             ids[2]: (f"{name}: closer to the full-step output (MR-STFT) than naive midpoint step reduction at "
                      "equal FLOPs", "MR-STFT distance", floor_mrstft)}
    reason = None if values[ids[0]] else "model: no naive midpoint run to compare with (naive_midpoint_steps)"
    out = []
    for cid in ids:
        text, units, floor = texts[cid]
        floor = floor if floor is not None and math.isfinite(floor) else None
        out += claim(ctx, "p6", cid, text, pd.Series(values[cid], dtype=float), separated, units=units, floor=floor,
                     not_testable=reason)
    return out


# ---------------------------------------------------------------------------------------------- figures
def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return []
    variants = summary.get("variants") or {}
    floor = summary.get("noise_floor") or {}
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharey="row")
    xs = (("flops_fraction", "FLOPs / full run"), ("calls_fraction", "self-attention calls / full run"),
          ("wall_fraction", "wall time / full run (measured)"))
    ys = (("si_sdr_db", "SI-SDR to reference (dB)"), ("mrstft_to_full", "MR-STFT distance to full-step output"))
    styles = {"midpoint": ("tab:blue", "o"), "euler": ("tab:green", "v")}
    for row, (ycol, ylabel) in enumerate(ys):
        for col, (xcol, xlabel) in enumerate(xs):
            ax = axes[row][col]
            for method, (color, marker) in styles.items():
                pts = sorted((v[xcol], v[ycol]) for v in variants.values()
                             if (v["variant"] == "naive" and v["method"] == method)
                             or (v["variant"] == "full" and method == "midpoint"))
                if pts:
                    x = [p[0] for p in pts]
                    ax.plot(x, [p[1]["mean"] for p in pts], "-", color=color, marker=marker, label=f"naive {method}")
                    lo = [p[1]["ci95"][0] for p in pts]
                    hi = [p[1]["ci95"][1] for p in pts]
                    if None not in lo and None not in hi:
                        ax.fill_between(x, lo, hi, color=color, alpha=0.15)
            for key, v in variants.items():
                if v["variant"] != "lsac" or v[ycol]["mean"] is None:
                    continue
                color = "tab:red" if v["what"] == "output" else "tab:purple"
                marker = "s" if str(v["start"]) == "warmup" else "D"
                lo, hi = v[ycol]["ci95"]
                yerr = None if lo is None else [[v[ycol]["mean"] - lo], [hi - v[ycol]["mean"]]]
                ax.errorbar([v[xcol]], [v[ycol]["mean"]], yerr=yerr, color=color, marker=marker, ms=5, capsize=2)
                ax.annotate(f"N={v['refresh']}", (v[xcol], v[ycol]["mean"]), fontsize=6, textcoords="offset points",
                            xytext=(3, 2))
            if ycol == "mrstft_to_full" and floor.get("mrstft") is not None:
                ax.axhline(floor["mrstft"], color="k", ls=":", lw=0.8, label="noise floor (other seed)")
            ax.set_xlabel(xlabel, fontsize=8)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    axes[0][0].plot([], [], "s", color="tab:red", label="LSAC outputs (square: warm-up start)")
    axes[0][0].plot([], [], "s", color="tab:purple", label="LSAC maps (diamond: start 0)")
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    fig.suptitle("P6: quality vs compute (mean over clips, 95% bootstrap bands / bars)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "p6_quality_vs_compute.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [(str(path), "P6: quality against compute counted three ways (FLOPs, self-attention calls, measured "
             "wall time). Lines: naive step reduction (midpoint blue, Euler green) with 95% bootstrap bands over "
             "clips; points: LSAC variants (red = cached outputs, purple = cached maps; squares = warm-up start, "
             "diamonds = start 0). Dotted: the noise floor (MR-STFT between two noise seeds' full runs).")]


EXPERIMENT = Experiment(name="p6", title="P6 Layer-Selective Attention Caching as a quality-vs-compute frontier",
                        run=run, summarize=summarize, figures=figures)
