"""P4 causal freezing: from evaluation k0 on, a layer (or a group of layers) reuses its self-attention output.

Definitions
-----------
* Freezing layer set F from k0 (k0 >= 1): at every evaluation e >= k0, each layer l in F returns the output of
  its self-attention module (after `wo`) from evaluation k0 - 1, the last one computed before k0; the
  adaLN gate of the current evaluation still scales it. Everything else is computed as usual. This is
  `latentflow_fast.lsac.freeze_policy` (the same cache LSAC uses).
* Layer sets: every single layer ("L0", "L1", ...), and the groups "stable" and "fast" from P3's split
  (`summary["stable_layers"]` / `["fast_layers"]`; without P3 in the run, the fallback of `layer_split`),
  and "all". k0 runs over config.freeze_starts (values outside 1..E-1 dropped). A control row freezes
  "all" from k0 = E (after the last evaluation): nothing changes, so its damage must be exactly 0.
* Damage of a row, on the decoded target output `out`, against the clean output `clean` of the same
  sampler (same noise, same code path, batch-invariant linear layers) and the reference stem `ref`:
  ``si_sdr_drop_db`` = SI-SDR(clean, ref) - SI-SDR(out, ref) (positive = worse; NaN without stems),
  ``mrstft_to_clean`` (multi-resolution STFT distance, FFT 256/512/1024), ``logmel_to_clean``,
  ``si_sdr_to_clean_db`` (fidelity to the clean output), ``latent_change`` = |x1 - x1_clean| / |x1_clean|.
  ``frozen_fraction`` = |F| (E - k0) / (L E): the share of all self-attention calls that were frozen.
* Stable vs fast: whole groups freeze different amounts when the groups differ in size, so the headline
  compares single-layer freezing: per clip, the mean damage of freezing one stable layer vs one fast layer
  (``stable_vs_fast_single_layer``, paired Wilcoxon over clips); the group rows are reported beside it.
* Execution: a clean run records every layer's self-attention output and the state at every step start;
  the rows of one clip that branch in the same ODE step run as one batch from that step's start state
  (the cache seeded with the clean outputs of evaluation k0 - 1), so nothing before the branch is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import metrics
from ..lsac import SelfAttentionCache, freeze_policy
from ..probe.engine import expand_inputs
from ..probe.invariance import batch_invariant
from ..sampler import METHODS, sample_ode
from .base import Experiment, ProtocolContext
from .stats import paired_wilcoxon

MAX_ROWS = 16  # rows per batch of branched runs


# ---------------------------------------------------------------------------------------------- layer split
def layer_split(ctx: ProtocolContext) -> dict:
    """The stable / fast layer split: P3's summary when P3 ran in this protocol run, else a fallback.

    Fallback (documented, used only without P3): per layer, cosine similarity between the self-attention
    output at evaluation k and at the last evaluation, averaged over clips; convergence index k*_l = first k
    after which it stays >= config.tau; stable = k*_l <= median over layers (earliest converging half),
    fast = the rest.
    """
    p3 = (getattr(ctx, "summaries", None) or {}).get("p3") or {}
    if "stable_layers" in p3 and "fast_layers" in p3:
        return {"stable_layers": [int(l) for l in p3["stable_layers"]],
                "fast_layers": [int(l) for l in p3["fast_layers"]], "split_source": "p3"}
    key = ("p4-layer-split",)
    if key in ctx._trajectories:
        return ctx._trajectories[key]
    L = ctx.model.config.n_layers
    sims = []
    for pclip in ctx.clips:
        record = clean_run(ctx, pclip)["attention"]  # layer -> [E, T, D]
        per_layer = []
        for l in range(L):
            out = record[l].flatten(1).double()
            per_layer.append(torch.nn.functional.cosine_similarity(out, out[-1:], dim=1))
        sims.append(torch.stack(per_layer))  # [L, E]
    sim = torch.stack(sims).mean(0)
    E = sim.shape[1]
    k_star = []
    for l in range(L):
        below = (sim[l] < ctx.config.tau).nonzero()
        k_star.append(0 if below.numel() == 0 else int(below.max()) + 1)
    median = float(np.median(k_star))
    stable = [l for l in range(L) if k_star[l] <= median]
    fast = [l for l in range(L) if k_star[l] > median]
    split = {"stable_layers": stable, "fast_layers": fast, "split_source": "fallback (attention-output cosine)",
             "fallback_convergence_index": k_star, "evaluations": E}
    ctx._trajectories[key] = split
    return split


def layer_sets(ctx: ProtocolContext, split: dict) -> dict:
    """name -> layers: single layers, then the stable / fast groups (when non-empty), then all layers."""
    L = ctx.model.config.n_layers
    sets = {f"L{l}": (l,) for l in range(L)}
    if split["stable_layers"]:
        sets["stable"] = tuple(split["stable_layers"])
    if split["fast_layers"]:
        sets["fast"] = tuple(split["fast_layers"])
    sets["all"] = tuple(range(L))
    return sets


# ---------------------------------------------------------------------------------------------- runs
def _inputs(ctx: ProtocolContext, pclip):
    key = ("p4-inputs", pclip.clip.clip_id)
    if key not in ctx._trajectories:
        clip = pclip.clip
        ctx._trajectories[key] = ctx.model.prepare(clip.mixture, clip.sample_rate, clip.prompt, seed=ctx.config.noise_seed)
    return ctx._trajectories[key]


@torch.no_grad()
def clean_run(ctx: ProtocolContext, pclip) -> dict:
    """Clean sampling with batch-invariant linear layers, recording every layer's self-attention output
    ([E, T, D] per layer) and the state at every step start. Cached on the context."""
    key = ("p4-clean", pclip.clip.clip_id)
    if key in ctx._trajectories:
        return ctx._trajectories[key]
    model, cfg = ctx.model, ctx.config
    inputs = _inputs(ctx, pclip)
    L = model.config.n_layers
    never = lambda layer, evaluation: False  # noqa: E731
    with batch_invariant(), SelfAttentionCache(model, never) as cache:
        cache.record = {l: {} for l in range(L)}
        result = sample_ode(cache.velocity_fn(model.velocity_fn(inputs)), inputs.noise, steps=cfg.steps,
                            method=cfg.method, record=True)
        record = {l: torch.stack([cache.record[l][e][0] for e in sorted(cache.record[l])]) for l in range(L)}
    per_step = METHODS[cfg.method]
    starts = [ev.state for ev in result.trajectory[::per_step]] + [result.final]
    target, _ = model.decode(result.final, inputs)
    run = {"attention": record, "step_starts": starts, "final": result.final, "target": target.reshape(-1)}
    ctx._trajectories[key] = run
    return run


@torch.no_grad()
def run_branch(model, inputs, clean: dict, rows: list, steps: int, method: str) -> torch.Tensor:
    """Final states [R, T, 2C] of rows (k0, layers) that all branch in the ODE step k0 // per_step.

    Same arithmetic as `sample_ode`; the cache starts with the clean outputs of evaluation k0 - 1.
    """
    per_step = METHODS[method]
    step = rows[0][0] // per_step
    if any(k0 // per_step != step for k0, _ in rows):
        raise ValueError("rows must branch in the same ODE step")
    R = len(rows)
    L = model.config.n_layers
    h = 1.0 / steps
    batch = expand_inputs(inputs, R)
    fn = model.velocity_fn(batch)
    x = clean["step_starts"][step].expand(R, *clean["step_starts"][step].shape[1:]).contiguous()
    E = steps * per_step
    with batch_invariant(), SelfAttentionCache(model, freeze_policy(rows)) as cache:
        if step * per_step > 0:
            for l in range(L):
                previous = clean["attention"][l][step * per_step - 1]
                cache.seed(l, previous[None].expand(R, *previous.shape).contiguous())
        evaluate = cache.velocity_fn(fn)
        e = step * per_step
        for k in range(step, steps):
            t = k * h
            v = evaluate(x, t, e)
            e += 1
            if method == "midpoint":
                v = evaluate(x + (0.5 * h) * v, t + 0.5 * h, e)
                e += 1
            x = x + h * v
    assert e == E
    return x


def decode_rows(model, finals: torch.Tensor, inputs) -> torch.Tensor:
    """Decoded target [R, S], one row at a time (a row's waveform does not depend on the batch)."""
    return torch.cat([model.decode(finals[r:r + 1], inputs)[0].reshape(1, -1) for r in range(finals.shape[0])])


def damage_rows(outputs: torch.Tensor, finals: torch.Tensor, clean: dict, pclip) -> list[dict]:
    """Damage metrics (module docstring) of decoded outputs [R, S] with final states [R, T, 2C]."""
    clean_target = clean["target"][None].float()
    out = outputs.reshape(outputs.shape[0], -1).float()
    rows = []
    mrstft = metrics.multi_resolution_stft_distance(out, clean_target.expand_as(out))
    logmel = metrics.log_mel_distance(out, clean_target.expand_as(out), sample_rate=pclip.clip.sample_rate)
    ref = pclip.clip.target
    for r in range(out.shape[0]):
        row = {"mrstft_to_clean": float(mrstft[r]), "logmel_to_clean": float(logmel[r]),
               "si_sdr_to_clean_db": float(metrics.si_sdr(out[r], clean_target[0])),
               "latent_change": float((finals[r] - clean["final"][0]).norm() / clean["final"].norm())}
        if ref is not None:
            ref_t = torch.as_tensor(ref, dtype=torch.float32).reshape(-1)
            clean_sdr = float(metrics.si_sdr(clean_target[0], ref_t))
            sdr = float(metrics.si_sdr(out[r], ref_t))
            row.update(si_sdr_db=sdr, clean_si_sdr_db=clean_sdr, si_sdr_drop_db=clean_sdr - sdr,
                       si_sdri_db=float(metrics.si_sdr_improvement(out[r], ref_t, pclip.clip.mixture.reshape(-1))))
        else:
            row.update(si_sdr_db=math.nan, clean_si_sdr_db=math.nan, si_sdr_drop_db=math.nan, si_sdri_db=math.nan)
        rows.append(row)
    return rows


def condition_id(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _conditions(ctx: ProtocolContext, sets: dict) -> list[dict]:
    E = ctx.config.steps * METHODS[ctx.config.method]
    starts = sorted({int(k) for k in ctx.config.freeze_starts if 1 <= int(k) < E})
    conditions = [{"k0": k0, "layer_set": name, "layers": layers} for k0 in starts for name, layers in sets.items()]
    # Controls, expected to do exactly nothing: freezing all layers after the last evaluation, and
    # branching at the first k0 with nothing frozen (checks that branching reproduces the clean run).
    conditions.append({"k0": E, "layer_set": "all", "layers": sets["all"], "control": True})
    if starts:
        conditions.append({"k0": starts[0], "layer_set": "none", "layers": (), "control": True})
    for c in conditions:
        c["probe_id"] = condition_id("p4", c["k0"], c["layer_set"], list(c["layers"]))
    return conditions


# ---------------------------------------------------------------------------------------------- experiment
def run(ctx: ProtocolContext) -> pd.DataFrame:
    from tqdm.auto import tqdm

    model, cfg = ctx.model, ctx.config
    split = layer_split(ctx)
    sets = layer_sets(ctx, split)
    conditions = _conditions(ctx, sets)
    store = ctx.store("p4")
    done = store.done_keys()
    E = cfg.steps * METHODS[cfg.method]
    L = model.config.n_layers
    per_step = METHODS[cfg.method]
    todo_total = sum((p.clip.clip_id, c["probe_id"]) not in done for p in ctx.clips for c in conditions)
    bar = tqdm(total=todo_total, unit="run", desc="p4 freezing", disable=not ctx.progress, dynamic_ncols=True)
    try:
        for pclip in ctx.clips:
            todo = [c for c in conditions if (pclip.clip.clip_id, c["probe_id"]) not in done]
            if not todo:
                continue
            clean = clean_run(ctx, pclip)
            inputs = _inputs(ctx, pclip)
            results = []
            by_step: dict = {}
            for c in todo:
                by_step.setdefault(c["k0"] // per_step, []).append(c)
            for step in sorted(by_step):
                group = by_step[step]
                for i in range(0, len(group), MAX_ROWS):
                    chunk = group[i:i + MAX_ROWS]
                    finals = run_branch(model, inputs, clean, [(c["k0"], c["layers"]) for c in chunk],
                                        cfg.steps, cfg.method)
                    outputs = decode_rows(model, finals, inputs)
                    results += list(zip(chunk, finals, damage_rows(outputs, finals, clean, pclip)))
                    bar.update(len(chunk))
            rows = []
            for c, _, metrics_row in results:
                rows.append({
                    "clip_id": pclip.clip.clip_id, "probe_id": c["probe_id"], "group": pclip.group,
                    "gain_group": pclip.meta.get("gain_group", ""), "k0": c["k0"], "layer_set": c["layer_set"],
                    "layers": ",".join(map(str, c["layers"])), "n_frozen_layers": len(c["layers"]),
                    "frozen_fraction": len(c["layers"]) * max(0, E - c["k0"]) / (L * E),
                    "control": bool(c.get("control", False)), **metrics_row,
                })
            store.write(rows)
    finally:
        bar.close()
    return store.load()


def _mean(series) -> Optional[float]:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    split = layer_split(ctx)
    if df.empty:
        return {"layer_split": split, "rows": 0}
    control = df[df["control"]]
    real = df[~df["control"]]
    summary: dict = {
        **{k: v for k, v in split.items()},
        "rows": int(len(df)),
        "clips": int(df["clip_id"].nunique()),
        "identity_control_max_abs_damage": float(np.nanmax(np.abs(control[["mrstft_to_clean", "latent_change"]].to_numpy())))
        if len(control) else None,
    }
    table: dict = {}
    for (name, k0), part in real.groupby(["layer_set", "k0"]):
        table.setdefault(name, {})[str(int(k0))] = {
            "si_sdr_drop_db": _mean(part["si_sdr_drop_db"]), "mrstft_to_clean": _mean(part["mrstft_to_clean"]),
            "frozen_fraction": _mean(part["frozen_fraction"]),
        }
    summary["damage"] = table  # layer set -> k0 -> mean damage over clips
    # Per-layer damage averaged over k0, and the stable-vs-fast comparison at each k0.
    singles = real[real["layer_set"].str.match(r"^L\d+$")]
    summary["per_layer_mean_si_sdr_drop_db"] = {n: _mean(p["si_sdr_drop_db"]) for n, p in singles.groupby("layer_set")}
    summary["per_layer_mean_mrstft"] = {n: _mean(p["mrstft_to_clean"]) for n, p in singles.groupby("layer_set")}
    if {"stable", "fast"} <= set(real["layer_set"]):
        comparison = {}
        for k0, part in real.groupby("k0"):
            pivot = part.pivot_table(index="clip_id", columns="layer_set", values="mrstft_to_clean")
            drop = part.pivot_table(index="clip_id", columns="layer_set", values="si_sdr_drop_db")
            stable_frac = part[part["layer_set"] == "stable"]["frozen_fraction"].mean()
            fast_frac = part[part["layer_set"] == "fast"]["frozen_fraction"].mean()
            comparison[str(int(k0))] = {
                "stable_mrstft": float(pivot["stable"].mean()), "fast_mrstft": float(pivot["fast"].mean()),
                "stable_si_sdr_drop_db": _mean(drop["stable"]) if "stable" in drop else None,
                "fast_si_sdr_drop_db": _mean(drop["fast"]) if "fast" in drop else None,
                "clips_stable_less_damaged": int((pivot["stable"] < pivot["fast"]).sum()),
                "clips": int(len(pivot)),
                "stable_frozen_fraction": float(stable_frac), "fast_frozen_fraction": float(fast_frac),
            }
        summary["stable_vs_fast"] = comparison
        # Groups of different sizes freeze different amounts; the per-layer comparison freezes one layer per
        # row: mean over the group's single-layer rows (then over clips).
        stable_names = {f"L{l}" for l in split["stable_layers"]}
        fast_names = {f"L{l}" for l in split["fast_layers"]}
        per_layer = {}
        for k0, part in singles.groupby("k0"):
            st = part[part["layer_set"].isin(stable_names)].groupby("clip_id")["mrstft_to_clean"].mean()
            fa = part[part["layer_set"].isin(fast_names)].groupby("clip_id")["mrstft_to_clean"].mean()
            st_drop = part[part["layer_set"].isin(stable_names)].groupby("clip_id")["si_sdr_drop_db"].mean()
            fa_drop = part[part["layer_set"].isin(fast_names)].groupby("clip_id")["si_sdr_drop_db"].mean()
            per_layer[str(int(k0))] = {
                "stable_mrstft": float(st.mean()), "fast_mrstft": float(fa.mean()),
                "stable_si_sdr_drop_db": _mean(st_drop), "fast_si_sdr_drop_db": _mean(fa_drop),
                "clips_stable_less_damaged": int((st < fa.reindex(st.index)).sum()), "clips": int(len(st)),
                "wilcoxon_p_mrstft": paired_wilcoxon(st.to_numpy(), fa.reindex(st.index).to_numpy())["p_value"],
            }
        summary["stable_vs_fast_single_layer"] = per_layer
        earliest = min(per_layer, key=int)
        e = per_layer[earliest]
        summary["headline"] = (
            f"freezing one layer from k0={earliest}: stable layers MR-STFT {e['stable_mrstft']:.3f} vs fast layers "
            f"{e['fast_mrstft']:.3f} (stable less damaged on {e['clips_stable_less_damaged']}/{e['clips']} clips, "
            f"Wilcoxon p={e['wilcoxon_p_mrstft']:.3g}); "
            f"whole groups: stable {comparison[earliest]['stable_mrstft']:.3f} vs fast {comparison[earliest]['fast_mrstft']:.3f}"
        )
    return summary


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return []
    real = df[~df["control"]]
    made = []
    singles = real[real["layer_set"].str.match(r"^L\d+$")].copy()
    if len(singles):
        singles["layer"] = singles["layer_set"].str[1:].astype(int)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, column, title in ((axes[0], "mrstft_to_clean", "MR-STFT distance to clean"),
                                  (axes[1], "si_sdr_drop_db", "SI-SDR drop vs clean (dB)")):
            grid = singles.pivot_table(index="layer", columns="k0", values=column, aggfunc="mean")
            values = grid.to_numpy(dtype=float)
            if column == "si_sdr_drop_db":  # signed: diverging colours centred on 0
                limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
                image = ax.imshow(values, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                image = ax.imshow(values, aspect="auto", origin="lower", cmap="magma")
            ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
            ax.set_xlabel("freeze from evaluation k0")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=10)
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / "p4_freezing_layer_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((str(path), "P4: damage of freezing one layer's self-attention output from evaluation k0 on "
                     "(mean over clips; left: MR-STFT distance to the clean output, right: SI-SDR drop to the "
                     "reference stem). Earlier k0 = longer frozen."))
    groups = real[real["layer_set"].isin(["stable", "fast", "all"])]
    if len(groups):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, part in groups.groupby("layer_set"):
            means = part.groupby("k0")["mrstft_to_clean"].agg(["mean", "std"])
            ax.errorbar(means.index, means["mean"], yerr=means["std"].fillna(0), marker="o", capsize=3,
                        label=f"{name} ({part['layers'].iloc[0]})")
        ax.set_xlabel("freeze from evaluation k0")
        ax.set_ylabel("MR-STFT distance to clean output")
        ax.legend(fontsize=8)
        ax.set_title("Causal freezing by layer group", fontsize=10)
        fig.tight_layout()
        path = out_dir / "p4_freezing_groups.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((str(path), "P4: damage (mean ± sd over clips) of freezing the stable layers, the fast layers "
                     "(P3's split) or all layers from evaluation k0 on."))
    return made


EXPERIMENT = Experiment(name="p4", title="P4 causal freezing of self-attention", run=run, summarize=summarize,
                        figures=figures)
