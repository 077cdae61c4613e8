"""P4 causal freezing: from evaluation k0 on, a set of layers reuses its self-attention output, or its map.

Definitions
-----------
* Freezing outputs of layer set F from k0 (k0 >= 1): at every evaluation e >= k0, the self-attention of
  each layer in F returns its per-head output of evaluation k0 - 1 (the last one computed); projections,
  `wo`, the adaLN gate of the current evaluation and everything else run as usual.
* Freezing maps: the same, but only the attention probabilities of evaluation k0 - 1 are kept and applied
  to the current values, out = p(k0 - 1) @ v(e). Both are `probe.Reuse(..., refresh=None)` rows of the
  probe engine, branched from the clip's clean trajectory (`ProtocolContext.clean_trajectory`).
* Layer sets (`layer_sets.group_sets`): "stable" / "fast" of P3's split (under P3's "no split", its
  primary criterion's, flagged), each P3 criterion's own stable / fast sets where they differ, "all", and
  every layer alone, as chosen by config.freeze_sets. k0 runs over config.freeze_starts (values outside
  1..E-1 dropped), kinds over config.reuse_kinds.
* Controls, exactly zero by construction: freezing all layers' outputs from k0 = E (after the last
  evaluation) and caching all layers' maps with refresh 1 (every evaluation computes).
* Damage of a row against the clean output of the same noise (decoded target `clean`) and the reference
  stem: ``si_sdr_drop_db`` = SI-SDR(clean, ref) - SI-SDR(frozen, ref) (positive = worse),
  ``mrstft_to_clean`` (multi-resolution STFT distance), ``latent_change`` (the engine's end metrics).
  ``frozen_fraction`` = |F| (E - k0) / (L E), the share of self-attention calls answered from the cache.
* Claims (sign: positive = the paper's direction, "stable layers can be frozen with less damage"): per
  clip, the mean over k0 of damage(fast) - damage(stable), for each kind (output, map) and each damage
  measure, on all clips and on the separated subset (protocol.stats.paired_claim). The groups can differ
  in size; `mrstft_per_layer` in the table divides by |F|. Under "no split" the claims and the summary
  say that the sets come from P3's primary criterion.
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
from .layer_sets import claim, group_sets, p3_split, self_sites, separated_ids, split_note

FULL_GRID = {"freeze_starts": [4, 8, 16, 24], "reuse_kinds": ["output", "map"],
             "freeze_sets": ["split", "criteria", "all", "single"]}


def conditions(ctx: ProtocolContext, split: dict) -> list[Reuse]:
    """The Reuse rows of one clip (the label is the layer set's name; "control" for the controls)."""
    cfg = ctx.config
    E = cfg.steps * METHODS[cfg.method]
    L = ctx.model.config.n_layers
    starts = sorted({int(k) for k in cfg.freeze_starts if 1 <= int(k) < E})
    sets = group_sets(ctx, split, cfg.freeze_sets)
    rows = [Reuse(self_sites(layers), what, start=k0, label=name)
            for name, layers in sets.items() for what in cfg.reuse_kinds for k0 in starts]
    everything = self_sites(range(L))
    rows += [Reuse(everything, "output", start=E, label="control"),
             Reuse(everything, "map", start=0, refresh=1, label="control")]
    return rows


def evaluations_per_clip(ctx: ProtocolContext, split: dict) -> int:
    """Network evaluations P4 runs per clip (each row from its branch evaluation to the end): its cost."""
    E = ctx.config.steps * METHODS[ctx.config.method]
    firsts = [r.first_reuse(E) for r in conditions(ctx, split)]
    return sum(E - (E - 1 if f is None else f - 1) for f in firsts)


def end_metrics(target, residual, traj) -> list[dict]:
    """The clean output's SI-SDRi (for the separated subset) on every row, for ProbeEngine.sweep(end_metrics=...):
    a module-level function (picklable, so worker processes can run it). The engine's own end metrics give
    the damage (end_mrstft_to_clean, end_delta_si_sdr)."""
    ref = traj.clip.target
    gain = math.nan
    if ref is not None:
        ref = torch.as_tensor(ref, dtype=torch.float32).reshape(-1)
        mixture = torch.as_tensor(traj.clip.mixture, dtype=torch.float32).reshape(-1)
        gain = float(metrics.si_sdr(traj.target.reshape(-1).float(), ref) - metrics.si_sdr(mixture, ref))
    return [{"clean_si_sdri_db": gain} for _ in range(target.shape[0])]


def described(df: pd.DataFrame, ctx: ProtocolContext) -> pd.DataFrame:
    """The engine's stored rows with P4's columns: layer_set (the row's label), what, k0, n_layers,
    frozen_fraction = reused calls / (L E), control."""
    if df.empty or "what" in df:
        return df
    cfg = ctx.config
    E = cfg.steps * METHODS[cfg.method]
    L = ctx.model.config.n_layers
    by_id = {r.probe_id: r for r in conditions(ctx, p3_split(ctx))}
    df = df[df["probe_id"].isin(by_id)].copy()  # rows of this run's grid
    rows = [by_id[i] for i in df["probe_id"]]
    df["layer_set"] = [r.label for r in rows]
    df["what"] = [r.what for r in rows]
    df["k0"] = [r.start if isinstance(r.start, int) else min(r.start) for r in rows]
    df["n_layers"] = [len(r.sites) for r in rows]
    df["frozen_fraction"] = [r.reused_calls(E) / (L * E) for r in rows]
    df["control"] = [r.label == "control" for r in rows]
    # damage in dB: SI-SDR(clean, ref) - SI-SDR(frozen, ref), positive = worse (NaN without stems)
    df["si_sdr_drop_db"] = -df["end_delta_si_sdr"] if "end_delta_si_sdr" in df else math.nan
    return df.reset_index(drop=True)


def run(ctx: ProtocolContext) -> pd.DataFrame:
    from tqdm.auto import tqdm

    rows = conditions(ctx, p3_split(ctx))
    store = ctx.store("p4")
    done = store.done_keys()
    bar = tqdm(total=len(ctx.clips), unit="clip", desc="p4 freezing", disable=not ctx.progress, dynamic_ncols=True)
    try:
        for pclip in ctx.clips:
            if any((pclip.clip.clip_id, r.probe_id) not in done for r in rows):
                # the engine's sweep: batching, out-of-memory back-off, sharding and resumable shards in `store`
                ctx.engine.sweep(ctx.clean_trajectory(pclip), rows, end_effect=True, store=store, progress=False,
                                 end_metrics=end_metrics)
            bar.update(1)
    finally:
        bar.close()
    return described(store.load(), ctx)


def _mean(series) -> Optional[float]:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def _damage_columns(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns={"end_mrstft_to_clean": "mrstft_to_clean", "end_latent_change": "latent_change"})


def stable_fast_claims(ctx: ProtocolContext, real: pd.DataFrame, split: dict, kinds, separated: list) -> list:
    """The scorecard claims (module docstring); one pair of sets per split used."""
    pairs = [("", "stable", "fast")]
    out = []
    note = split_note(split)
    for prefix, stable, fast in pairs:
        for what in kinds:
            for column, unit, short in (("mrstft_to_clean", "MR-STFT distance", "mrstft"),
                                        ("si_sdr_drop_db", "dB", "sisdr")):
                part = real[real["what"] == what]
                per_clip = part.pivot_table(index="clip_id", columns="layer_set", values=column, aggfunc="mean")
                cid = ".".join(["P4"] + ([prefix.rstrip(":")] if prefix else []) + [what, short])
                text = (f"freezing the {prefix}stable layers' attention {what}s from k0 on damages the output less "
                        f"than freezing the {prefix}fast layers' (damage = {column}, fast minus stable, mean over k0)"
                        + (f" [{note}]" if note else ""))
                if stable in per_clip and fast in per_clip:
                    out += claim(ctx, "p4", cid, text, per_clip[fast] - per_clip[stable], separated, units=unit)
                else:
                    out += claim(ctx, "p4", cid, text, pd.Series(dtype=float), separated, units=unit,
                                 not_testable=f"model: no stable / fast layer sets ({split['split_source']})")
    return out


def summarize(df: pd.DataFrame, ctx: ProtocolContext) -> dict:
    split = p3_split(ctx)
    cfg = ctx.config
    base = {"split_source": split["split_source"], "stable_layers": split["stable_layers"],
            "fast_layers": split["fast_layers"], "no_split": split["no_split"],
            "grid": {"run": {"freeze_starts": [int(k) for k in cfg.freeze_starts], "reuse_kinds": list(cfg.reuse_kinds),
                             "freeze_sets": list(cfg.freeze_sets),
                             "evaluations_per_clip": evaluations_per_clip(ctx, split)}, "full": FULL_GRID}}
    if split["no_split"]:
        base["split_note"] = split_note(split)
    df = described(df, ctx)
    if df.empty:
        return {**base, "rows": 0}
    df = _damage_columns(df)
    control = df[df["control"]]
    real = df[~df["control"]]
    summary: dict = {
        **base, "rows": int(len(df)), "clips": int(df["clip_id"].nunique()),
        "identity_control_max_abs_damage": float(np.nanmax(np.abs(
            control[["mrstft_to_clean", "latent_change"]].to_numpy()))) if len(control) else None,
        "layer_sets": {name: sorted({int(x.split(".")[1]) for x in part["site"].iloc[0].split(",")})
                       for name, part in real.groupby("layer_set")},
    }
    table: dict = {}
    for (name, what, k0), part in real.groupby(["layer_set", "what", "k0"]):
        n = int(part["n_layers"].iloc[0])
        table.setdefault(name, {}).setdefault(what, {})[str(int(k0))] = {
            "si_sdr_drop_db": _mean(part["si_sdr_drop_db"]), "mrstft_to_clean": _mean(part["mrstft_to_clean"]),
            "mrstft_per_layer": (_mean(part["mrstft_to_clean"]) or 0.0) / n,
            "frozen_fraction": _mean(part["frozen_fraction"])}
    summary["damage"] = table  # layer set -> output|map -> k0 -> mean over clips
    by_kind = real.pivot_table(index=["clip_id", "layer_set", "k0"], columns="what", values="mrstft_to_clean")
    if {"output", "map"} <= set(by_kind.columns):
        ratio = (by_kind["output"] / by_kind["map"].where(by_kind["map"] > 0)).dropna()
        summary["output_over_map_damage_median"] = float(ratio.median()) if len(ratio) else None
    gains = df.groupby("clip_id")["clean_si_sdri_db"].first() if "clean_si_sdri_db" in df else pd.Series(dtype=float)
    summary["separated_clips"] = separated_ids(ctx, gains)
    summary["claims"] = stable_fast_claims(ctx, real, split, cfg.reuse_kinds, summary["separated_clips"])
    testable = [c for c in summary["claims"] if c["subset"] == "all clips" and c["n"]]
    if testable:
        summary["headline"] = "; ".join(
            f"{c['id']}: fast - stable = {c['effect']:+.4f} ({c['verdict_pre_holm']}, n={c['n']})" for c in testable)
    return summary


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        return []
    df = _damage_columns(df)
    real = df[~df["control"]]
    kinds = sorted(real["what"].unique())
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.8), squeeze=False)
    for ax, what in zip(axes[0], kinds):
        part = real[real["what"] == what]
        for name, sub in part.groupby("layer_set"):
            if name.startswith("L"):
                continue
            stats = sub.groupby("k0")["mrstft_to_clean"].agg(["mean", "std"])
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                        label=f"{name} ({sub['n_layers'].iloc[0]} layers)")
        ax.set_xlabel("freeze from evaluation k0")
        ax.set_ylabel("MR-STFT distance to clean output")
        ax.set_title(f"freezing attention {what}s", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "p4_freezing_groups.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made = [(str(path), "P4: damage (mean ± sd over clips) of freezing the self-attention outputs (left) or maps "
             "(right) of each layer set from evaluation k0 on (P3's stable / fast sets, per criterion, and all "
             "layers).")]
    singles = real[real["layer_set"].str.match(r"^L\d+$")]
    if len(singles):
        singles = singles.assign(layer=singles["layer_set"].str[1:].astype(int))
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.8), squeeze=False)
        for ax, what in zip(axes[0], kinds):
            grid = singles[singles["what"] == what].pivot_table(index="layer", columns="k0",
                                                                 values="mrstft_to_clean", aggfunc="mean")
            image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="magma")
            ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
            ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
            ax.set_xlabel("freeze from evaluation k0")
            ax.set_ylabel("layer")
            ax.set_title(f"one layer's {what} frozen: MR-STFT to clean", fontsize=10)
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / "p4_freezing_layer_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((str(path), "P4: damage of freezing one layer's self-attention output / map from k0 on."))
    return made


EXPERIMENT = Experiment(name="p4", title="P4 causal freezing of self-attention outputs and maps", run=run,
                        summarize=summarize, figures=figures)
