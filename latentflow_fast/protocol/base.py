"""Shared pieces of the causal probing protocol (docs/design.md, section 6): configuration, the clip set, the
run context, and the `Experiment` record every experiment module (P0-P6) exports.

An experiment is three functions: `run(ctx) -> DataFrame` (resumable: rows go through a ResultStore
keyed by (clip_id, probe_id)), `summarize(df, ctx) -> dict` (headline numbers for summary.json) and
`figures(df, summary, out_dir) -> [(png path, caption)]` (for report.html).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from ..probe import Clip, ProbeEngine, ResultStore, Trajectory


@dataclass
class ProtocolConfig:
    """Everything that determines the protocol's numbers (a rerun with the same config is identical)."""

    model: str = "small"
    num_clips: int = 24  # balanced design (clips.py): half 2-source, half 3-source mixtures
    clip_seed_offset: int = 0  # offset into the held-out evaluation seeds
    steps: int = 16
    method: str = "midpoint"
    noise_seed: int = 0
    time_bins: int = 16  # self-attention key segments for pooled maps (P3/P5)
    tau: float = 0.95  # convergence threshold (P3)
    window: int = 16  # evaluations per window of the layer x evaluation grid (P2): two halves of 32
    p2_layer_groups: int = 2  # P2 on 2 layer groups (time budget); 0 = v1's per-layer grid
    p2_types: tuple = ("full patch",)  # P2 probe types per (layer group, window): full patch / additive / routing
    # P4 / P6 grids (docs/design.md, section 6), sized so that P4 + P5 + P6 stay within 9 min for 24 clips of
    # `small` in one single-threaded process: per clip 180-240 network evaluations (fewer when P3's k* make
    # the LSAC warm-up start late), measured at 8.8-11.5 clean runs' time with metrics (docs/design.md).
    # Each summary's `grid` lists what ran, the full grid and the evaluations per clip.
    freeze_starts: tuple = (16,)  # k0 values of causal freezing (P4); full grid 4, 8, 16, 24
    freeze_sets: tuple = ("split",)  # P4 layer sets (layer_sets.SET_KINDS); full: split, criteria, all, single
    lsac_refresh: tuple = (2,)  # LSAC refresh intervals N (P6); full grid 2, 3, 4, 8
    lsac_starts: tuple = ("warmup",)  # P6 cache starts: "warmup" (each layer's k*) and/or ints; full: warmup, 0
    lsac_sets: tuple = ("split",)  # P6: stable sets of the agreed split ("split") and / or of each criterion
    reuse_kinds: tuple = ("output", "map")  # P4 / P6: reuse attention outputs and/or maps
    naive_midpoint_steps: tuple = (12,)  # P6 naive step reduction, midpoint; full grid 8, 12
    naive_euler_steps: tuple = (16,)  # P6 naive step reduction, Euler; full grid 16, 24
    bootstrap: int = 2000
    backend: str = "auto"
    experiments: tuple = ("p0", "p1", "p2", "p3", "p4", "p5", "p6")

    def fingerprint(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class ProtocolClip:
    """A clip with what the protocol needs beyond the engine's Clip."""

    clip: Clip
    sources: Optional[torch.Tensor] = None  # [n_sources, S] reference stems (synthetic clips)
    classes: tuple = ()  # class / prompt of each source
    target_index: int = 0
    counterfactual_prompt: Optional[str] = None  # prompt naming another source of the mix (P1)
    counterfactual_index: Optional[int] = None
    group: str = ""  # acoustic complexity group, e.g. "2 sources" / "3 sources"
    active_frames: Optional[torch.Tensor] = None  # bool [T] latent frames where the target is active (P5)
    meta: dict = field(default_factory=dict)


@dataclass
class ProtocolContext:
    config: ProtocolConfig
    model: torch.nn.Module
    engine: ProbeEngine
    clips: list
    out_dir: Path
    progress: bool = True
    _trajectories: dict = field(default_factory=dict)
    summaries: dict = field(default_factory=dict)  # name -> summary of the experiments run so far (P3 -> P4..P6)
    clean_runs: dict = field(default_factory=dict)  # clip_id -> the clean trajectory P4, P5 and P6 share
    store_rank: Optional[int] = None  # shard-name rank of this process's writes (clip-sharded protocol processes)

    def store(self, experiment: str) -> ResultStore:
        """The resumable result store of one experiment (refuses a folder made with another config)."""
        return ResultStore(self.out_dir / "results" / experiment, rank=self.store_rank,
                           fingerprint=self.config.fingerprint())

    def clean_trajectory(self, pclip: ProtocolClip) -> Trajectory:
        """The one clean trajectory of a clip that P4, P5 and P6 share: P5's per-evaluation map reductions
        (p5_scaffold.scaffold_reductions), the layer inputs for prefix reuse, no cached head outputs."""
        clip_id = pclip.clip.clip_id
        if clip_id not in self.clean_runs:
            from .p5_scaffold import scaffold_reductions

            cfg = self.config
            for run in self.clean_runs.values():  # layer inputs (~60 MB a clip on `small`) only for the latest
                run.layer_inputs = {}
            self.clean_runs[clip_id] = self.engine.trajectory(
                pclip.clip, steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed, cache_heads=(),
                reductions=scaffold_reductions(pclip))
        return self.clean_runs[clip_id]

    def trajectory(self, pclip: ProtocolClip, prompt: Optional[str] = None, **kwargs) -> Trajectory:
        """Clean trajectory of a clip (optionally with another prompt), computed once and cached.

        kwargs go to ProbeEngine.trajectory (captures, cache_heads, maps); the cache key includes them.
        """
        key = (pclip.clip.clip_id, prompt, json.dumps(kwargs, sort_keys=True, default=str))
        if key not in self._trajectories:
            cfg = self.config
            self._trajectories[key] = self.engine.trajectory(
                pclip.clip, steps=cfg.steps, method=cfg.method, seed=cfg.noise_seed, prompt=prompt, **kwargs
            )
        return self._trajectories[key]

    def forget(self, pclip: ProtocolClip) -> None:
        """Drop the cached trajectories of a clip (an experiment is done with it: bounded memory)."""
        for key in [k for k in self._trajectories if isinstance(k, tuple) and k and k[0] == pclip.clip.clip_id]:
            del self._trajectories[key]


@dataclass
class Experiment:
    name: str  # "p1", ...
    title: str
    run: Callable[[ProtocolContext], pd.DataFrame]
    summarize: Callable[[pd.DataFrame, ProtocolContext], dict]
    figures: Callable[[pd.DataFrame, dict, Path], list]
