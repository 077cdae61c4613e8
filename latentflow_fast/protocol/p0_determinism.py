"""P0 determinism: two clean runs of every clip must be bitwise equal.

Each clip is sampled twice from scratch (same seeded noise, float32, reranking off, the configured
backend), with per-head outputs of every attention site cached. Compared: the state and the velocity at
every evaluation, the final latent, the decoded target and residual waves, and the cached head outputs.
Per clip: the max absolute difference over all of them (must be exactly 0) and `bitwise_equal`.
Also the clean output's SI-SDR improvement over the mixture (``clean_si_sdri``); the summary lists the
clips the clean model separates (>= 3 dB), the subset every claim is also reported on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .base import Experiment, ProtocolContext
from .clips import SEPARATED_DB, separation_gain_db
from .effects import clip_columns

PROBE_ID = "p0-repeat"


def _max_abs(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare_runs(first, second) -> dict:
    """Max abs differences and bitwise equality of two Trajectory objects of the same clip."""
    parts = {
        "states": (torch.stack(first.states), torch.stack(second.states)),
        "velocities": (torch.stack(first.velocities), torch.stack(second.velocities)),
        "final": (first.final, second.final),
        "target": (first.target, second.target),
        "residual": (first.residual, second.residual),
    }
    for site in sorted(first.head_outputs):
        parts[f"heads:{site}"] = (first.head_outputs[site], second.head_outputs[site])
    row = {}
    equal = True
    worst = 0.0
    for name, (a, b) in parts.items():
        same = a.shape == b.shape and torch.equal(a, b)
        equal &= same
        if not name.startswith("heads:"):
            row[f"max_abs_diff_{name}"] = _max_abs(a, b) if a.shape == b.shape else float("inf")
        worst = max(worst, _max_abs(a, b) if a.shape == b.shape else float("inf"))
    row["max_abs_diff"] = worst
    row["bitwise_equal"] = bool(equal)
    row["num_compared_tensors"] = len(parts)
    return row


def run(ctx: ProtocolContext) -> pd.DataFrame:
    store = ctx.store("p0")
    done = store.done_keys()
    cfg = ctx.config
    from tqdm.auto import tqdm

    for pclip in tqdm(ctx.clips, desc="P0 clean runs", unit="clip", disable=not ctx.progress, dynamic_ncols=True):
        if (pclip.clip.clip_id, PROBE_ID) in done:
            continue
        runs = [ctx.engine.trajectory(pclip.clip, steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed)
                for _ in range(2)]
        row = {"clip_id": pclip.clip.clip_id, "probe_id": PROBE_ID, **clip_columns(pclip),
               "num_evaluations": runs[0].num_evaluations, **compare_runs(*runs),
               "clean_si_sdri": separation_gain_db(runs[0].target, pclip)}
        store.write([row])
    return store.load()


def summarize(df: pd.DataFrame, ctx=None) -> dict:
    if df.empty:
        return {"clips": 0, "bitwise_equal": None, "max_abs_diff": None}
    return {
        "clips": int(len(df)),
        "bitwise_equal": bool(df["bitwise_equal"].all()),
        "max_abs_diff": float(df["max_abs_diff"].max()),
        "clips_not_equal": sorted(df.loc[~df["bitwise_equal"], "clip_id"].tolist()),
        "clean_si_sdri": dict(zip(df["clip_id"], df["clean_si_sdri"])) if "clean_si_sdri" in df.columns else {},
        "separated_clips": sorted(df.loc[df["clean_si_sdri"] >= SEPARATED_DB, "clip_id"].tolist())
        if "clean_si_sdri" in df.columns else [],
        "separated_rule": f"clean SI-SDRi >= {SEPARATED_DB:g} dB",
    }


def figures(df: pd.DataFrame, summary: dict, out_dir: Path) -> list:
    return []  # a single boolean and a number; the report shows them as text


EXPERIMENT = Experiment(name="p0", title="P0 Determinism (bitwise repeat of clean runs)",
                        run=run, summarize=summarize, figures=figures)
