"""The hook-library-shaped face of the probe engine: `trace` (baukit / nnsight style) and TransformerLens-style
`run_with_cache` / `run_with_hooks` over named attention sites.

Sites are named by `intercept.Interceptor` ("layers.3.self_attn" on SAM Audio, module paths elsewhere).
Every probed call runs the fused `probed_attention` operator once, with the interventions set on the trace
as per-(row, head) operator arguments (calls with causal / per-query / additive masks run the exact float64
eager path of `masked.py` instead); sites with nothing to capture, intervene on or hook run the model's own
attention untouched. Traces nest: the innermost trace that wants a site handles it.

Hook names, per site (layouts as TransformerLens uses them; B batch, H heads, N positions):

    {site}.hook_q / hook_k / hook_v   [B, N, H, D]   what the attention receives (after RoPE / q-k norms);
                                                      a hook may return a replacement
    {site}.hook_attn_scores           [B, h, n, Nk]  float32 logits after interventions; masked keys = -inf
    {site}.hook_pattern               [B, h, n, Nk]  float32 probabilities, exp(score - final lse)
    {site}.hook_z                     [B, Nq, H, Dv] per-head outputs before the output projection, after the
                                                      operator's interventions; a hook may return a replacement
    {site}.hook_lse / hook_max / hook_entropy [B, H, Nq], hook_segment_mass [B, H, Nq, G],
    {site}.hook_key_mass [B, H, Nk]                   the operator's float32 captures

`h`, `n` are the heads and queries of `pattern_slice=(heads, queries)` (default: all): scores and patterns
are recomputed from q and k for that slice only, using the lse of the fused pass, so the full
[B, H, Nq, Nk] map exists only when asked for. hook_z's `z[b, i, h]` is head h's output at query i; how heads
merge into channels is the model's business (SAM Audio and nn.MultiheadAttention both merge "(h d)", so
`z.flatten(2)` is the input of the output projection).

Per call, hooks run in this order: hook_q/k/v (may edit) -> the operator, with the trace's interventions ->
statistics -> hook_attn_scores -> hook_pattern -> hook_z (may edit). Scores, patterns and statistics are
read-only: a hook that returns or edits them raises ValueError that names the interventions which do
change the distribution (see `Trace`).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import CAPTURE_NAMES, build_plan, probed_attention
from . import interventions as vocabulary
from .masked import biased_attention
from .intercept import AttentionCall, Interceptor, UnsupportedAttentionError, intercept, static_sites

__all__ = [
    "HOOK_KINDS",
    "AttentionCall",
    "HookPoint",
    "Interceptor",
    "SiteRecord",
    "Trace",
    "UnsupportedAttentionError",
    "intercept",
    "run_with_cache",
    "run_with_hooks",
    "static_sites",
    "trace",
]

TRACE_CAPTURES = CAPTURE_NAMES + ("out",)
INPUT_HOOKS = ("hook_q", "hook_k", "hook_v")
MAP_HOOKS = ("hook_attn_scores", "hook_pattern")
STAT_HOOKS = tuple(f"hook_{name}" for name in CAPTURE_NAMES)
HOOK_KINDS = INPUT_HOOKS + MAP_HOOKS + ("hook_z",) + STAT_HOOKS
_READ_ONLY = MAP_HOOKS + STAT_HOOKS
_ALTERNATIVES = (
    "editing attention scores / patterns / statistics from a hook is not supported; change the distribution "
    "with the trace's interventions instead: ablate_heads, set_temperature (float('inf') = uniform), scale_logits, "
    "knockout_segments, bias_segments, knockout_keys, or edit the head outputs (hook_z: return a tensor, or "
    "Trace.patch_output / steer) or the inputs (hook_q / hook_k / hook_v)"
)

Selector = Union[None, int, slice, range, Sequence[int], Tensor]
SiteSpec = Union[str, Sequence[str]]


# ---------------------------------------------------------------------------------------------- helpers
def _patterns(name: str, value: SiteSpec) -> tuple:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a site name / glob pattern or a list of them") from None
    if not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name} must be a site name / glob pattern or a non-empty list of them")
    return items


def _matches(site: str, patterns: tuple) -> bool:
    return any(fnmatch.fnmatchcase(site, p) for p in patterns)


def select_mask(selector: Selector, n: int, name: str, device=None) -> Tensor:
    """bool [n]: which of n items a selector picks (None = all; int, slice, range, int list, int/bool tensor)."""
    if selector is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if isinstance(selector, bool):
        raise TypeError(f"{name} must be an int, a slice, a list of ints or a tensor, got bool")
    if isinstance(selector, Tensor):
        if selector.dtype == torch.bool:
            if selector.shape != (n,):
                raise ValueError(f"{name}: a bool selector must have shape ({n},), got {tuple(selector.shape)}")
            return selector.to(device)
        if selector.is_floating_point() or selector.dim() > 1:
            raise TypeError(f"{name} must be an int or bool tensor of rank <= 1")
        indices = selector.reshape(-1).tolist()
    elif isinstance(selector, int):
        indices = [selector]
    elif isinstance(selector, (slice, range)):
        indices = list(range(n)[selector]) if isinstance(selector, slice) else list(selector)
    else:
        try:
            indices = [int(i) for i in selector]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be an int, a slice, a list of ints or a tensor") from None
    mask = torch.zeros(n, dtype=torch.bool)
    for i in indices:
        if not -n <= i < n:
            raise ValueError(f"{name}: index {i} out of range for {n} items")
        mask[i] = True
    return mask.to(device)


def _name_filter(names_filter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    patterns = _patterns("names_filter", names_filter)
    return lambda name: _matches(name, patterns)


@dataclass
class HookPoint:
    """What a hook function receives as its second argument (TransformerLens passes a HookPoint too)."""

    name: str
    site: str
    kind: str

    def layer(self) -> Optional[int]:
        """The first integer in the site name (layers.3.self_attn -> 3), or None."""
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$|#)", self.site)
        return int(match.group(1)) if match else None


class SiteRecord:
    """What one probed call at a site left: float32 captures ([B, H, Nq] ...) and `out` [B, H, Nq, Dv]."""

    def __init__(self, site: str, values: dict):
        self.site = site
        self._values = values

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"site {self.__dict__.get('site')!r} has no capture {name!r}; "
                             f"captured: {sorted(values)}")

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def keys(self):
        return self._values.keys()

    def __repr__(self) -> str:
        return f"SiteRecord({self.site!r}, {sorted(self._values)})"


@dataclass
class _Intervention:
    sites: tuple
    kind: str  # "gate", "logit_scale", "segment_bias", "key_mask", "patch", "bias"
    heads: Selector = None
    rows: Selector = None
    value: Any = None
    segments: Selector = None


@dataclass
class _SitePlan:
    """Everything configured for one site name (resolved once per name, dropped when the config changes)."""

    record: tuple = ()
    interventions: list = field(default_factory=list)
    hooks: dict = field(default_factory=dict)  # kind -> [(name, fn)]
    cache: tuple = ()  # kinds cached

    @property
    def active(self) -> bool:
        return bool(self.record or self.interventions or self.hooks or self.cache)


# ---------------------------------------------------------------------------------------------- Trace
class Trace:
    """Probe the attention sites of a model while the context is active.

        with trace(model, sites="layers.*.self_attn", capture=("entropy",)) as tr:
            tr.ablate_heads("layers.3.self_attn", heads=[0, 2])
            out = model(...)
        tr["layers.3.self_attn"].entropy      # [B, H, Nq] float32

    Args:
        model: any nn.Module (see `intercept` for how its attention calls are found and named).
        sites: glob pattern(s) of the sites whose captures are recorded (`fnmatch`: "*" also matches dots).
        capture: operator captures ("lse", "max", "entropy", "segment_mass", "key_mass") and/or "out" (the
            head outputs [B, H, Nq, Dv] after interventions, e.g. for patching into another run).
        segments: key segments per site, needed by "segment_mass" and segment interventions: a list of
            boundaries [0, ..., Nk] for every site, a dict {site pattern: boundaries}, or a callable
            (site, num_keys) -> boundaries or None.
        backend: the operator backend ("auto", "reference", "cpu", "triton", "cuda").
        history: keep every call's record in `tr.history[site]` (a sampler calls each site once per step);
            `tr[site]` is always the last call.
        intercept_sdpa: see `Interceptor`.

    Interventions (site: a name or glob pattern; heads / rows: None = all, an int, slice, list or tensor;
    rows index the batch of the attention call). They apply wherever their pattern matches, whether or not
    the site is in `sites`, and they combine: gates multiply, biases add, a later patch wins.
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "*", capture: Sequence[str] = (), *,
                 segments=None, backend: str = "auto", history: bool = False,
                 intercept_sdpa: Optional[bool] = None):
        self.model = model
        self.site_patterns = _patterns("sites", sites)
        if isinstance(capture, str):
            capture = (capture,)
        capture = tuple(capture)
        for name in capture:
            if name not in TRACE_CAPTURES:
                raise ValueError(f"capture: unknown capture {name!r}; known: {', '.join(TRACE_CAPTURES)}")
        self.capture = capture
        if not (segments is None or callable(segments) or isinstance(segments, dict)):
            segments = list(segments)
        self.segments = segments
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.backend = backend
        self.keep_history = bool(history)
        self.records: dict[str, SiteRecord] = {}
        self.history: dict[str, list] = {}
        self.cache: dict[str, Tensor] = {}
        self._interventions: list[_Intervention] = []
        self._hooks: list[tuple] = []  # (filter, fn)
        self._hook_specs: list[tuple] = []  # (name as given, fn)
        self._cache_filter: Optional[Callable[[str], bool]] = None
        self.pattern_slice = (None, None)
        self._plans: dict[str, _SitePlan] = {}
        self._interceptor = Interceptor(model, self, intercept_sdpa)

    # -- context
    def __enter__(self) -> "Trace":
        self._interceptor.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._interceptor.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._warn_unmatched()

    def _warn_unmatched(self) -> None:
        """A mistyped site pattern must not pass for "no effect": warn about interventions and named hooks
        that matched none of the sites the model called."""
        seen = list(self._interceptor.seen)
        if not seen:
            return
        for iv in self._interventions:
            if not any(_matches(site, iv.sites) for site in seen):
                warnings.warn(f"intervention {iv.kind} on {list(iv.sites)} matched none of the sites called: {seen}",
                              stacklevel=3)
        names = [f"{site}.{kind}" for site in seen for kind in HOOK_KINDS]
        for spec, _ in self._hook_specs:
            if isinstance(spec, (str, list, tuple)) and not any(_name_filter(spec)(n) for n in names):
                warnings.warn(f"hook {spec!r} matched no hook name; sites called: {seen}; kinds: {HOOK_KINDS}",
                              stacklevel=3)

    def __getitem__(self, site: str) -> SiteRecord:
        if site not in self.records:
            raise KeyError(f"no record for site {site!r}; recorded: {sorted(self.records)}; "
                           f"sites called: {list(self._interceptor.seen)}")
        return self.records[site]

    def __contains__(self, site: str) -> bool:
        return site in self.records

    @property
    def sites(self) -> list[str]:
        """Every site the model called while traced (probed or not), in call order; before a forward pass,
        the sites known statically (router sites, nn.MultiheadAttention paths)."""
        return list(self._interceptor.seen) or static_sites(self.model)

    # -- configuration
    def _changed(self) -> None:
        self._plans.clear()

    def _add(self, site, kind, heads=None, rows=None, value=None, segments=None) -> "Trace":
        self._interventions.append(_Intervention(_patterns("site", site), kind, heads, rows, value, segments))
        self._changed()
        return self

    def ablate_heads(self, site: SiteSpec, heads: Selector = None, rows: Selector = None) -> "Trace":
        """Zero the outputs of `heads` (head_gate = 0)."""
        return self._add(site, "gate", heads, rows, 0.0)

    def scale_heads(self, site: SiteSpec, factor: float, heads: Selector = None, rows: Selector = None) -> "Trace":
        """Multiply the outputs of `heads` by `factor` (head_gate)."""
        return self._add(site, "gate", heads, rows, _finite_float("factor", factor))

    def set_temperature(self, site: SiteSpec, temperature: float, heads: Selector = None,
                        rows: Selector = None) -> "Trace":
        """Softmax temperature T: softmax(logits / T) (logit_scale = 1 / T); float('inf') = uniform attention.
        The same word means the same as `Probe(intervention="temperature")` (see `interventions.py`)."""
        temperature = vocabulary.check_temperature(temperature)
        return self._add(site, "logit_scale", heads, rows, vocabulary.logit_scale("temperature", temperature))

    def scale_logits(self, site: SiteSpec, factor: float, heads: Selector = None, rows: Selector = None) -> "Trace":
        """softmax(factor * logits): the operator's logit_scale (0 = uniform attention, 1 = no change); the
        same as `Probe(intervention="logit_scale")`."""
        factor = vocabulary.check_logit_scale(factor, "factor")
        return self._add(site, "logit_scale", heads, rows, vocabulary.logit_scale("logit_scale", factor))

    def knockout_segments(self, site: SiteSpec, segments: Selector, heads: Selector = None,
                          rows: Selector = None) -> "Trace":
        """No attention to the keys of the given segments (indices into the site's `segments`)."""
        return self._add(site, "segment_bias", heads, rows, float("-inf"), segments)

    def bias_segments(self, site: SiteSpec, segments: Selector, bias: float, heads: Selector = None,
                      rows: Selector = None) -> "Trace":
        """Add `bias` to the logits of the keys of the given segments."""
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
            raise TypeError(f"bias must be a float (not NaN), got {bias!r}")
        return self._add(site, "segment_bias", heads, rows, float(bias), segments)

    def knockout_keys(self, site: SiteSpec, keys: Selector, rows: Selector = None) -> "Trace":
        """No attention to individual keys, for every head (through the key padding mask)."""
        return self._add(site, "key_mask", None, rows, keys)

    def patch_output(self, site: SiteSpec, value: Tensor, heads: Selector = None, rows: Selector = None) -> "Trace":
        """Replace head outputs by `value`, broadcastable to [B, H, Nq, Dv] (e.g. another run's `out`)."""
        if not isinstance(value, Tensor):
            raise TypeError(f"value must be a tensor, got {type(value).__name__}")
        return self._add(site, "patch", heads, rows, value)

    def steer(self, site: SiteSpec, vector: Tensor, heads: Selector = None, rows: Selector = None) -> "Trace":
        """Add `vector` ([Dv], or [H, Dv] per head) to the outputs of `heads` (out_bias)."""
        if not isinstance(vector, Tensor) or not vector.is_floating_point():
            raise TypeError("vector must be a floating-point tensor")
        if vector.dim() not in (1, 2):
            raise ValueError(f"vector must be [Dv] or [H, Dv], got shape {tuple(vector.shape)}")
        return self._add(site, "bias", heads, rows, vector)

    def clear_interventions(self) -> "Trace":
        self._interventions.clear()
        self._changed()
        return self

    def add_hook(self, name, fn: Callable) -> "Trace":
        """Call fn(tensor, hook: HookPoint) at hook `name` (exact name, glob, list of them, or a predicate)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self._hooks.append((_name_filter(name), fn))
        self._hook_specs.append((name, fn))
        self._changed()
        return self

    def cache_hooks(self, names_filter=None, pattern_slice=None) -> "Trace":
        """Store the values of the hooks passing `names_filter` in `tr.cache` (see the module doc)."""
        self._cache_filter = _name_filter(names_filter)
        self.pattern_slice = _check_pattern_slice(pattern_slice)
        self._changed()
        return self

    # -- SiteHandler protocol
    def _plan(self, site: str) -> _SitePlan:
        plan = self._plans.get(site)
        if plan is None:
            plan = _SitePlan()
            if self.capture and _matches(site, self.site_patterns):
                plan.record = self.capture
            plan.interventions = [iv for iv in self._interventions if _matches(site, iv.sites)]
            for kind in HOOK_KINDS:
                name = f"{site}.{kind}"
                fns = [fn for test, fn in self._hooks if test(name)]
                if fns:
                    plan.hooks[kind] = fns
            if self._cache_filter is not None:
                plan.cache = tuple(k for k in HOOK_KINDS if self._cache_filter(f"{site}.{k}"))
            self._plans[site] = plan
        return plan

    def wants(self, site: str) -> bool:
        return self._plan(site).active

    def attend(self, call: AttentionCall) -> tuple[Tensor, Optional[Tensor]]:
        plan = self._plan(call.site)
        site = call.site
        q, k, v = (self._input_hook(plan, site, kind, t)
                   for kind, t in zip(INPUT_HOOKS, (call.q, call.k, call.v)))
        B, H, Nq, _ = q.shape
        args = self._operator_args(plan, site, call.key_padding_mask, B, H, Nq, k.shape[2], v.shape[3], q)
        kinds = set(plan.hooks) | set(plan.cache)
        if "segments" not in args:
            kinds.discard("hook_segment_mass")
        capture = {n for n in plan.record if n in CAPTURE_NAMES}
        capture |= {kind[len("hook_"):] for kind in kinds if kind in STAT_HOOKS}
        if kinds & set(MAP_HOOKS) or call.need_weights:
            capture.add("lse")  # patterns are exp(score - final lse)
        if call.attn_bias is None:
            out, caps = probed_attention(q, k, v, scale=call.scale, capture=tuple(capture), backend=self.backend,
                                         **args)
        else:  # causal / per-query / additive masks: the exact eager path (see masked.py)
            out, caps = biased_attention(build_plan(q, k, v, scale=call.scale, capture=tuple(capture), **args),
                                         call.attn_bias)
            args["attn_bias"] = call.attn_bias
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(q.shape[-1])

        for kind in STAT_HOOKS:
            if kind in kinds:
                self._read_only_hook(plan, site, kind, caps[kind[len("hook_"):]])
        if kinds & set(MAP_HOOKS):
            heads = select_mask(self.pattern_slice[0], H, "pattern_slice heads", q.device).nonzero().flatten()
            rows = select_mask(self.pattern_slice[1], Nq, "pattern_slice queries", q.device).nonzero().flatten()
            scores = attention_scores(q, k, scale, args, heads, rows)  # only the slice asked for
            if "hook_attn_scores" in kinds:
                self._read_only_hook(plan, site, "hook_attn_scores", scores)
            if "hook_pattern" in kinds:
                self._read_only_hook(plan, site, "hook_pattern", pattern_from_scores(scores, caps["lse"], heads, rows))
        weights = None
        if call.need_weights:  # nn.MultiheadAttention(need_weights=True): the caller asked for the full map
            all_heads = torch.arange(H, device=q.device)
            scores = attention_scores(q, k, scale, args, all_heads, torch.arange(Nq, device=q.device))
            weights = pattern_from_scores(scores, caps["lse"], all_heads, None)

        z = out.transpose(1, 2)  # [B, Nq, H, Dv]
        for fn in plan.hooks.get("hook_z", ()):
            result = fn(z, HookPoint(f"{site}.hook_z", site, "hook_z"))
            if result is not None:
                if not isinstance(result, Tensor) or result.shape != z.shape:
                    raise ValueError(f"hook on {site}.hook_z must return None or a tensor of shape "
                                     f"{tuple(z.shape)}, got {getattr(result, 'shape', type(result).__name__)}")
                z = result.to(out.dtype)
        out = z.transpose(1, 2)
        if "hook_z" in plan.cache:
            self.cache[f"{site}.hook_z"] = z.detach()
        self._record(plan, site, caps, out)
        return out, weights

    # -- internals
    def _input_hook(self, plan: _SitePlan, site: str, kind: str, t: Tensor) -> Tensor:
        x = t.transpose(1, 2)  # [B, N, H, D]
        for fn in plan.hooks.get(kind, ()):
            result = fn(x, HookPoint(f"{site}.{kind}", site, kind))
            if result is not None:
                if not isinstance(result, Tensor) or result.shape != x.shape:
                    raise ValueError(f"hook on {site}.{kind} must return None or a tensor of shape "
                                     f"{tuple(x.shape)}")
                x = result.to(t.dtype)
        if kind in plan.cache:
            self.cache[f"{site}.{kind}"] = x.detach()
        return x.transpose(1, 2)

    def _read_only_hook(self, plan: _SitePlan, site: str, kind: str, value: Tensor) -> None:
        name = f"{site}.{kind}"
        fns = plan.hooks.get(kind, ())
        before = value.clone() if fns else None
        for fn in fns:
            result = fn(value, HookPoint(name, site, kind))
            if result is not None:
                raise ValueError(f"the hook on {name} returned a tensor; {_ALTERNATIVES}")
            if not torch.equal(torch.nan_to_num(value), torch.nan_to_num(before)):
                raise ValueError(f"the hook on {name} modified its tensor in place; {_ALTERNATIVES}")
        if kind in plan.cache:
            self.cache[name] = value

    def _record(self, plan: _SitePlan, site: str, caps: dict, out: Tensor) -> None:
        if not plan.record:
            return
        values = {n: caps[n] for n in plan.record if n in caps}
        if "out" in plan.record:
            values["out"] = out.detach()
        record = SiteRecord(site, values)
        self.records[site] = record
        if self.keep_history:
            self.history.setdefault(site, []).append(record)

    def _segments_for(self, site: str, num_keys: int):
        spec = self.segments
        if spec is None:
            return None
        if callable(spec):
            return spec(site, num_keys)
        if isinstance(spec, dict):
            for pattern, bounds in spec.items():
                if _matches(site, (pattern,)):
                    return bounds
            return None
        return spec

    def _operator_args(self, plan: _SitePlan, site: str, key_padding_mask, B, H, Nq, Nk, Dv, q) -> dict:
        device = q.device
        args: dict = {"key_padding_mask": key_padding_mask}
        # segments are required by these; a cache of "every hook" only takes segment_mass where they exist
        need_segments = "segment_mass" in plan.record or "hook_segment_mass" in plan.hooks \
            or any(iv.kind == "segment_bias" for iv in plan.interventions)
        bounds = None
        if need_segments or "hook_segment_mass" in plan.cache:
            bounds = self._segments_for(site, Nk)
            if bounds is None and need_segments:
                raise ValueError(f"segments: site {site!r} needs key segments (segment_mass capture or a segment "
                                 "intervention) but the trace's `segments` gives none for it")
        if bounds is not None:
            if isinstance(bounds, Tensor):
                bounds = bounds.tolist()
            bounds = [int(b) for b in bounds]
            args["segments"] = bounds
        gate = logit_scale = seg_bias = out_bias = patch = patch_mask = None
        for iv in plan.interventions:
            sel = (select_mask(iv.rows, B, "rows", device)[:, None]
                   & select_mask(iv.heads, H, "heads", device)[None, :])  # [B, H]
            if iv.kind == "gate":
                gate = torch.ones(B, H, device=device) if gate is None else gate
                gate = torch.where(sel, gate * iv.value, gate)
            elif iv.kind == "logit_scale":
                logit_scale = torch.ones(B, H, device=device) if logit_scale is None else logit_scale
                logit_scale = torch.where(sel, torch.full_like(logit_scale, iv.value), logit_scale)
            elif iv.kind == "segment_bias":
                G = len(bounds) - 1
                segs = select_mask(iv.segments, G, "segments", device)
                seg_bias = torch.zeros(B, H, G, device=device) if seg_bias is None else seg_bias
                seg_bias = torch.where(sel[:, :, None] & segs, seg_bias + iv.value, seg_bias)
            elif iv.kind == "key_mask":
                keep = ~(select_mask(iv.rows, B, "rows", device)[:, None] & select_mask(iv.value, Nk, "keys", device))
                current = args["key_padding_mask"]
                args["key_padding_mask"] = keep if current is None else current & keep
            elif iv.kind == "patch":
                try:
                    value = torch.broadcast_to(iv.value.to(device=device, dtype=q.dtype), (B, H, Nq, Dv))
                except RuntimeError:
                    raise ValueError(f"patch_output value of shape {tuple(iv.value.shape)} is not broadcastable "
                                     f"to [B, H, Nq, Dv] = {(B, H, Nq, Dv)} at site {site!r}") from None
                patch = value if patch is None else torch.where(sel[:, :, None, None], value, patch)
                patch_mask = sel if patch_mask is None else patch_mask | sel
            elif iv.kind == "bias":
                try:
                    vec = torch.broadcast_to(iv.value.to(device=device, dtype=torch.float32), (H, Dv))
                except RuntimeError:
                    raise ValueError(f"steer vector of shape {tuple(iv.value.shape)} is not broadcastable to "
                                     f"[H, Dv] = {(H, Dv)} at site {site!r}") from None
                out_bias = torch.zeros(B, H, Dv, device=device) if out_bias is None else out_bias
                out_bias = out_bias + sel[:, :, None] * vec
        for name, value in (("head_gate", gate), ("logit_scale", logit_scale), ("segment_bias", seg_bias),
                            ("out_bias", out_bias), ("out_patch", patch), ("patch_mask", patch_mask)):
            if value is not None:
                args[name] = value.contiguous() if name == "out_patch" else value
        return args


def _finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def _check_pattern_slice(pattern_slice):
    if pattern_slice is None:
        return (None, None)
    if not isinstance(pattern_slice, (tuple, list)) or len(pattern_slice) != 2:
        raise TypeError("pattern_slice must be a pair (heads, queries); use None for 'all'")
    heads, queries = pattern_slice
    if isinstance(queries, tuple) and len(queries) == 2 and all(isinstance(x, int) for x in queries):
        queries = slice(*queries)  # (start, stop)
    return (heads, queries)


# ---------------------------------------------------------------------------------------------- slices
def attention_scores(q: Tensor, k: Tensor, scale: float, args: dict, heads: Tensor, queries: Tensor) -> Tensor:
    """float32 logits [B, h, n, Nk] for the given head and query indices, as the operator defines them
    (scale * logit_scale * q.k + segment_bias + attn_bias; masked keys -inf)."""
    H, Hkv = q.shape[1], k.shape[1]
    qs = q.index_select(1, heads).index_select(2, queries).float()
    ks = k.index_select(1, torch.div(heads, H // Hkv, rounding_mode="floor")).float()
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    if args.get("logit_scale") is not None:
        s = s * args["logit_scale"].index_select(1, heads)[:, :, None, None]
    if args.get("segment_bias") is not None:
        bounds = torch.tensor(args["segments"][1:], device=q.device)
        seg_of_key = torch.bucketize(torch.arange(k.shape[2], device=q.device), bounds, right=True)
        s = s + args["segment_bias"].index_select(1, heads)[:, :, seg_of_key][:, :, None, :]
    bias = args.get("attn_bias")
    if bias is not None:
        bias = bias if bias.shape[1] == 1 else bias.index_select(1, heads)
        s = s + (bias if bias.shape[2] == 1 else bias.index_select(2, queries))
    kpm = args.get("key_padding_mask")
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    return s


def pattern_from_scores(scores: Tensor, lse: Tensor, heads: Tensor, queries: Optional[Tensor]) -> Tensor:
    """exp(scores - lse) with the operator's final lse; an all-masked row gives 0."""
    lse = lse.index_select(1, heads)
    if queries is not None:
        lse = lse.index_select(2, queries)
    lse = lse[..., None]
    alive = torch.isfinite(lse)
    return torch.where(alive, torch.exp(scores - torch.where(alive, lse, 0.0)), 0.0)


# ---------------------------------------------------------------------------------------------- functions
def trace(model: nn.Module, sites: SiteSpec = "*", capture: Sequence[str] = (), **kwargs) -> Trace:
    """`with trace(model, sites=..., capture=...) as tr:` -- see `Trace`."""
    return Trace(model, sites, capture, **kwargs)


def run_with_cache(model: nn.Module, *inputs, names_filter=None, pattern_slice=None, segments=None,
                   backend: str = "auto", **kwargs) -> tuple[Any, dict]:
    """Run `model(*inputs, **kwargs)` once; return (output, {hook name: tensor}).

    names_filter: None (every hook name of every site, full patterns included), a name / glob / list of them,
    or a predicate name -> bool. pattern_slice=(heads, queries) bounds what hook_pattern / hook_attn_scores
    materialize (heads: index selector over H; queries: selector or (start, stop)).
    """
    with Trace(model, segments=segments, backend=backend) as tr:
        tr.cache_hooks(names_filter, pattern_slice)
        output = model(*inputs, **kwargs)
    return output, tr.cache


def run_with_hooks(model: nn.Module, *inputs, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (),
                   pattern_slice=None, segments=None, backend: str = "auto", **kwargs):
    """Run `model(*inputs, **kwargs)` with fwd_hooks = [(name or predicate, fn(tensor, hook))] installed."""
    if list(bwd_hooks):
        raise ValueError("bwd_hooks are not supported (the probed operator has no backward)")
    with Trace(model, segments=segments, backend=backend) as tr:
        tr.pattern_slice = _check_pattern_slice(pattern_slice)
        for entry in fwd_hooks:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise TypeError("fwd_hooks must be a list of (name, fn) pairs")
            tr.add_hook(*entry)
        return model(*inputs, **kwargs)
