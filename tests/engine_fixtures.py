"""A small random SAM-Audio-architecture model and a short synthetic clip for fast engine tests."""

from __future__ import annotations

import copy

import torch

from latentflow_fast.data.synthetic import EVAL_SEEDS, make_mixture
from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from latentflow_fast.probe import Clip, Probe, probe_grid

CLIP_SAMPLES = 4000  # 0.25 s at 16 kHz


def small_model(seed: int = 0, dim: int = 32, heads: int = 2, layers: int = 2):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=dim, n_heads=heads, n_layers=layers)
    return build_tiny_model(cfg).eval()


def small_clip(index: int = 0) -> Clip:
    m = make_mixture(EVAL_SEEDS.start + index)
    return Clip(
        clip_id=f"clip{index}",
        mixture=torch.from_numpy(m.mixture[:CLIP_SAMPLES].copy()),
        sample_rate=m.sample_rate,
        prompt=m.prompt,
        target=torch.from_numpy(m.target[:CLIP_SAMPLES].copy()),
        meta={"other_prompt": m.classes[(m.target_index + 1) % m.n_sources]},
    )


def mixed_probes(sites, evaluations=(0, 1, 2)) -> list[Probe]:
    """A heterogeneous probe set touching every intervention kind the engine has."""
    probes = probe_grid("layers.*.self_attn", sites,
                        [{"intervention": "head_ablation"}, {"intervention": "logit_scale", "value": 0.0},
                         {"intervention": "temperature", "value": 2.0},
                         {"intervention": "mean_ablation"}, {"intervention": "segment_knockout", "segments": (0, 1)},
                         {"intervention": "none"}],
                        evaluations=evaluations, heads=[(0,), None])
    probes += probe_grid("layers.*.cross_attn", sites,
                         [{"intervention": "additive_swap", "source": "other"},
                          {"intervention": "routing_swap", "source": "other"},
                          {"intervention": "output_patch", "source": "other"},
                          {"intervention": "segment_bias", "segments": (0,), "value": 2.0}],
                         evaluations=evaluations, window=None)
    return probes


def save_small_model(directory, seed: int = 0):
    """Save the small random model in the tiny format, so `load_model(directory)` and the CLI can use it."""
    from latentflow_fast.models.loading import save_tiny_format

    torch.manual_seed(seed)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=2)
    return save_tiny_format(build_tiny_model(cfg), cfg, directory)
