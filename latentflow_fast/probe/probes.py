"""Declarative probes: where to intervene, on which heads, from which evaluation on, and how.

A `Probe` is plain, hashable data; its `probe_id` (a hash of its fields) identifies its result row, so a
sweep can be resumed or sharded without ever running a probe twice. `probe_grid` expands site patterns
such as "layers.*.self_attn" against the sites of a model.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Optional, Sequence

# The vocabulary (one meaning per word) lives in interventions.py, shared with the hook-style Trace.
from .interventions import INTERVENTIONS, NEEDS_SEGMENTS, NEEDS_SOURCE  # noqa: E402
from . import interventions as _vocabulary  # noqa: E402


@functools.lru_cache(maxsize=4096)
def _site_matches(pattern: str, site: str) -> bool:
    return pattern == site or fnmatch.fnmatchcase(site, pattern)


@dataclass(frozen=True)
class Probe:
    """One intervention at one attention site, starting at one sampling evaluation.

    site: a site name, e.g. "layers.3.cross_attn", or a glob pattern such as "layers.*.cross_attn": the
        intervention then acts at every matching site at once, in the same batch row (to sweep over
        sites one at a time, expand the pattern with `probe_grid` instead).
    intervention: a key of INTERVENTIONS (meanings in `interventions.py`; "temperature" divides the logits,
        "logit_scale" multiplies them).
    heads: affected heads (None = all heads of the site).
    evaluation: evaluation index at which the sweep branches from the clean trajectory.
    window: number of evaluations, from `evaluation` on, during which the intervention stays active when
        the branch is continued to t=1 (None = until the end). The local effect only uses `evaluation`.
    value: the intervention's scalar (gate, temperature, logit scale, bias or steering scale).
    segments: key-segment indices for knockout/bias (self-attention: time bins; cross-attention: text tokens).
    source: name of a cached run (patch/swaps) or of a steering vector (output_bias).
    source_evaluation: patch from this evaluation of `source` instead of the same evaluation.
    label: free text carried into the results (e.g. the experiment name).
    """

    site: str
    intervention: str = "none"
    heads: Optional[tuple] = None
    evaluation: int = 0
    window: Optional[int] = 1
    value: float = 0.0
    segments: Optional[tuple] = None
    source: Optional[str] = None
    source_evaluation: Optional[int] = None
    label: str = ""

    def __post_init__(self):
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"site must be a non-empty string, got {self.site!r}")
        if self.intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {sorted(INTERVENTIONS)}, got {self.intervention!r}")
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
            if not self.heads or min(self.heads) < 0:
                raise ValueError(f"heads must be None or non-negative head indices, got {self.heads}")
        if self.segments is not None:
            object.__setattr__(self, "segments", tuple(int(s) for s in self.segments))
        if self.intervention in NEEDS_SEGMENTS and not self.segments:
            raise ValueError(f"intervention {self.intervention!r} needs segments")
        if self.intervention in NEEDS_SOURCE and not self.source:
            raise ValueError(f"intervention {self.intervention!r} needs a source")
        if not isinstance(self.evaluation, int) or self.evaluation < 0:
            raise ValueError(f"evaluation must be a non-negative int, got {self.evaluation!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or a positive int, got {self.window!r}")
        object.__setattr__(self, "value", float(self.value))
        _vocabulary.check_probe_value(self.intervention, self.value)

    @property
    def probe_id(self) -> str:
        fields = asdict(self)
        if self.intervention == "temperature":
            # temperature used to multiply the logits: new ids, so rows stored under the old meaning are
            # never taken for results of the new one
            fields["meaning"] = "softmax(s / T)"
        text = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def is_pattern(self) -> bool:
        return any(ch in self.site for ch in "*?[")

    def matches(self, site: str) -> bool:
        return _site_matches(self.site, site)

    @property
    def layer(self) -> Optional[int]:
        """The layer index of a single-layer site; None for patterns and other names."""
        parts = self.site.split(".")
        return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None

    @property
    def kind(self) -> str:
        """"self_attn" / "cross_attn" (the last part of the site name)."""
        return self.site.rsplit(".", 1)[-1]

    @property
    def is_identity(self) -> bool:
        """True for interventions that change nothing by construction (a gate, temperature or logit scale of
        1, a bias of 0, or "none"): the engine runs them as control rows, on the unprobed path."""
        return _vocabulary.is_identity(self.intervention, self.value)

    @property
    def probe_kind(self) -> str:
        """The name a user asked for: STANDARD_KINDS' "uniform" (logit scale 0 or temperature inf) and
        "text_knockout" (segment knockout at a cross-attention site), else the intervention itself."""
        if _vocabulary.is_uniform(self.intervention, self.value):
            return "uniform"
        if self.intervention == "segment_knockout" and self.kind == "cross_attn":
            return "text_knockout"
        return self.intervention

    def active_at(self, evaluation: int) -> bool:
        if evaluation < self.evaluation:
            return False
        return self.window is None or evaluation < self.evaluation + self.window

    def describe(self) -> dict:
        """Flat columns for a results table."""
        return {
            "probe_id": self.probe_id,
            "site": self.site,
            "layer": -1 if self.layer is None else self.layer,  # -1: a pattern over several layers
            "attention": self.kind,
            "intervention": self.intervention,
            "probe_kind": self.probe_kind,
            "heads": "all" if self.heads is None else ",".join(map(str, self.heads)),
            "evaluation": self.evaluation,
            "window": -1 if self.window is None else self.window,
            "value": self.value,
            "segments": "" if self.segments is None else ",".join(map(str, self.segments)),
            "source": self.source or "",
            "source_evaluation": -1 if self.source_evaluation is None else self.source_evaluation,
            "label": self.label,
        }


def expand_sites(patterns: Iterable[str] | str, sites: Sequence[str]) -> list[str]:
    """Sites matching any of the glob patterns, in model order. A pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = []
    for pattern in patterns:
        matched = [s for s in sites if fnmatch.fnmatchcase(s, pattern)]
        if not matched:
            raise ValueError(f"site pattern {pattern!r} matches no site; sites look like {list(sites[:4])}")
        chosen.extend(s for s in matched if s not in chosen)
    return [s for s in sites if s in chosen]


def probe_grid(
    sites: Iterable[str] | str,
    all_sites: Sequence[str],
    interventions: Sequence[dict] | dict,
    evaluations: Iterable[int],
    heads: Sequence[Optional[Sequence[int]]] = (None,),
    window: Optional[int] = 1,
    label: str = "",
) -> list[Probe]:
    """Cartesian product of sites x heads x evaluations x interventions.

    interventions: dicts of Probe fields, e.g. {"intervention": "head_ablation"} or
    {"intervention": "logit_scale", "value": 0.0} (uniform attention). `heads` lists head selections (None = all heads).
    """
    if isinstance(interventions, dict):
        interventions = [interventions]
    probes = []
    for site, head_sel, evaluation, spec in itertools.product(
        expand_sites(sites, all_sites), heads, list(evaluations), interventions
    ):
        fields = {"window": window, "label": label, **spec}
        probes.append(Probe(site=site, heads=None if head_sel is None else tuple(head_sel),
                            evaluation=int(evaluation), **fields))
    return probes


def per_head(probe: Probe, num_heads: int) -> list[Probe]:
    """One probe per head (the usual head-ablation sweep)."""
    return [replace(probe, heads=(h,)) for h in range(num_heads)]


@dataclass
class MapRequest:
    """An exact attention map slice to materialise in the clean run: p[heads, queries, :] at `site`."""

    site: str
    evaluations: Optional[tuple] = None  # None = every evaluation
    heads: Optional[tuple] = None
    queries: Optional[tuple] = None  # (start, stop) query range; None = all
    extra: dict = field(default_factory=dict)


STANDARD_KINDS = {
    "head_ablation": "zero one head's output (every head separately with per_head, else all heads)",
    "mean_ablation": "replace one head's output by its clean time-mean",
    "uniform": "uniform self-attention (logit scale 0) on one head / all heads",
    "text_knockout": "cross-attention: knock out one text token (every token separately)",
}


def standard_probes(sites: Sequence[str], num_heads: int, num_text_tokens: int, evaluations: Iterable[int],
                    kinds: Sequence[str] = ("head_ablation", "text_knockout", "uniform"),
                    per_head: bool = True, label: str = "") -> list[Probe]:
    """The usual attention sweep: for each site and evaluation, the `kinds` of STANDARD_KINDS.

    head/mean ablation apply to every site; uniform attention to self-attention sites; text-token
    knockout to cross-attention sites (one probe per token).
    """
    unknown = [k for k in kinds if k not in STANDARD_KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}; known: {sorted(STANDARD_KINDS)}")
    head_sets = [(h,) for h in range(num_heads)] if per_head else [None]
    probes = []
    for evaluation in evaluations:
        for site in sites:
            is_cross = site.endswith("cross_attn")
            for kind in kinds:
                if kind in ("head_ablation", "mean_ablation"):
                    probes += [Probe(site, kind, heads=h, evaluation=evaluation, label=label) for h in head_sets]
                elif kind == "uniform" and not is_cross:
                    probes += [Probe(site, "logit_scale", heads=h, value=0.0, evaluation=evaluation, label=label)
                               for h in head_sets]
                elif kind == "text_knockout" and is_cross:
                    probes += [Probe(site, "segment_knockout", segments=(tok,), evaluation=evaluation, label=label)
                               for tok in range(num_text_tokens)]
    return probes


REUSE_WHAT = {
    "output": "the site's per-head attention output of the last computed evaluation is returned as is "
              "(the attention kernel is skipped; projections, wo and the rest of the layer still run)",
    "map": "the attention map (probabilities) of the last computed evaluation is applied to the current "
           "values: out = p_cached @ v (q.k and the softmax are skipped)",
}


@dataclass(frozen=True)
class Reuse:
    """Reuse attention across evaluations of one run: freezing (P4) and layer-selective caching (P6).

    sites: exact site names (self- or cross-attention), e.g. ("layers.0.self_attn", "layers.3.self_attn").
    what: "output" or "map" (REUSE_WHAT).
    start: first evaluation of the schedule, one int for every site or one per site (same order as `sites`).
    refresh: None = freezing: evaluations e >= start reuse what evaluation start - 1 computed (start >= 1).
        N >= 1 = caching: evaluations e < start and e = start + jN compute, the others reuse the last
        computed evaluation (N = 1 computes everything: an identity).
    A start at or after the run's last evaluation changes nothing (an identity). The engine runs a Reuse as
    a batch row like a Probe: it branches from the clean trajectory at the last computed evaluation before
    the first reuse and integrates to t=1 (`ProbeEngine.sweep(..., end_effect=True)`).
    """

    sites: tuple
    what: str = "output"
    start: object = 1  # int or tuple of ints (one per site)
    refresh: Optional[int] = None
    label: str = ""

    def __post_init__(self):
        if isinstance(self.sites, str) or not hasattr(self.sites, "__iter__"):
            raise TypeError(f"sites must be a sequence of site names, got {self.sites!r}")
        sites = tuple(self.sites)
        if any(not isinstance(s, str) or not s or any(c in s for c in "*?[") for s in sites):
            raise ValueError(f"sites must be exact site names (no patterns), got {sites!r}")
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites must not repeat, got {sites!r}")
        object.__setattr__(self, "sites", sites)
        if self.what not in REUSE_WHAT:
            raise ValueError(f"what must be one of {sorted(REUSE_WHAT)}, got {self.what!r}")
        starts = (self.start,) * len(sites) if isinstance(self.start, int) else tuple(self.start)
        if len(starts) != len(sites) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in starts):
            raise ValueError(f"start must be a non-negative int or one per site ({len(sites)}), got {self.start!r}")
        object.__setattr__(self, "start", starts if not isinstance(self.start, int) else int(self.start))
        if self.refresh is None:
            if min(starts, default=1) < 1:
                raise ValueError("start: freezing (refresh=None) needs start >= 1 (something must be computed first)")
        elif isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh must be None (freeze) or a positive int, got {self.refresh!r}")

    # -- the schedule
    def starts(self) -> dict:
        """site -> start evaluation."""
        s = self.start if isinstance(self.start, tuple) else (self.start,) * len(self.sites)
        return dict(zip(self.sites, s))

    def reuses(self, site: str, evaluation: int) -> bool:
        """True when `site` reuses (does not compute) at `evaluation`."""
        start = self.starts().get(site)
        if start is None or evaluation < start:
            return False
        if self.refresh is None:
            return True
        return (evaluation - start) % self.refresh != 0

    def first_reuse(self, num_evaluations: int) -> Optional[int]:
        """The first evaluation at which any site reuses (None: the schedule changes nothing in this run)."""
        firsts = []
        for start in self.starts().values():
            first = start if self.refresh is None else (None if self.refresh == 1 else start + 1)
            if first is not None and first < num_evaluations:
                firsts.append(first)
        return min(firsts, default=None)

    def reused_calls(self, num_evaluations: int) -> int:
        """Number of (site, evaluation) calls answered from the cache in a run of `num_evaluations`."""
        return sum(self.reuses(s, e) for s in self.sites for e in range(num_evaluations))

    # -- Probe-like interface (a batch row of the engine)
    intervention = property(lambda self: f"reuse_{self.what}")
    heads = None
    segments = None
    source = None
    window = None
    value = 0.0

    @property
    def probe_id(self) -> str:
        text = json.dumps({"reuse": asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def is_identity(self) -> bool:
        return not self.sites or self.refresh == 1

    def matches(self, site: str) -> bool:
        return site in self.sites

    def describe(self) -> dict:
        starts = self.starts()
        return {
            "probe_id": self.probe_id, "site": ",".join(self.sites), "layer": -1,
            "attention": ",".join(sorted({s.rsplit(".", 1)[-1] for s in self.sites})),
            "intervention": self.intervention, "probe_kind": "freeze" if self.refresh is None else "cache",
            "heads": "all", "evaluation": min(starts.values(), default=-1), "window": -1,
            "value": float(self.refresh or 0), "segments": "", "source": "", "source_evaluation": -1,
            "label": self.label,
        }


@dataclass(frozen=True)
class Reduction:
    """A per-evaluation reduction of a site's exact attention map, computed during a clean trajectory.

    name: key of the result in `Trajectory.reductions`.
    sites: glob pattern(s) of the sites to reduce.
    fn: fn(p, site, evaluation) -> tensor or array, with p the map [H, Nq, Nk] of the run's single row,
        softmax(q k^T / sqrt(hd)) computed in float32 (CPU). It is dropped after the call, so a whole
        trajectory's maps never coexist. (`MapRequest` gives float64 reference maps instead, kept.)
    """

    name: str
    sites: object
    fn: object

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        patterns = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"sites must be a pattern or a sequence of patterns, got {self.sites!r}")
        object.__setattr__(self, "sites", patterns)
        if not callable(self.fn):
            raise TypeError("fn must be callable: fn(map [H, Nq, Nk], site, evaluation) -> array")

    def matches(self, site: str) -> bool:
        return any(_site_matches(p, site) for p in self.sites)

    def apply(self, p, site: str, evaluation: int):
        import torch

        value = torch.as_tensor(self.fn(p, site, evaluation))
        return value.detach().cpu()
