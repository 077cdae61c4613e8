"""The hook-library-shaped face of the probe engine: `trace` (baukit / nnsight style) and TransformerLens-style
`run_with_cache` / `run_with_hooks` over named attention sites.

Sites are named by `intercept.Interceptor` ("layers.3.self_attn" on SAM Audio, module paths elsewhere).
Every probed call runs the fused `probed_attention` operator once, with the interventions set on the trace
as per-(row, head) operator arguments (causal, per-query and additive masks included: the operator's `causal`
and `attn_mask`); sites with nothing to capture, intervene on or hook run the model's own attention untouched. Traces nest: the innermost trace that wants a site handles it.

Hook names, per site (layouts as TransformerLens uses them; B batch, H heads, N positions):

    {site}.hook_q / hook_k / hook_v   [B, N, H, D]   what the attention receives (after RoPE / q-k norms);
                                                      a hook may return a replacement
    {site}.hook_attn_scores           [B, h, n, Nk]  float32 logits after interventions; masked keys = -inf
    {site}.hook_pattern               [B, h, n, Nk]  float32 probabilities, exp(score - final lse)
    {site}.hook_z                     [B, Nq, H, Dv] per-head outputs before the output projection, after the
                                                      operator's interventions; a hook may return a replacement
    {site}.hook_lse / hook_max / hook_entropy [B, H, Nq], hook_segment_mass [B, H, Nq, G],
    {site}.hook_key_mass [B, H, Nk]                   the operator's float32 captures
    {site}.hook_result                [B, Nq, H, d_model] head h's term of the output projection (no bias), at
                                                      sites whose output projection the model structure gives
                                                      (router `Attention.wo`, `MultiheadAttention.out_proj`)

Residual-stream hook points [B, N, d_model] (`activation_points`): `layers.{i}.hook_resid_pre / hook_attn_out /
hook_cross_attn_out / hook_resid_mid / hook_mlp_out / hook_resid_post` on SAM Audio's DiT (identity modules),
`{path}.hook_resid_pre / hook_attn_out / hook_mlp_out / hook_resid_post` on nn.TransformerEncoderLayer /
DecoderLayer and GPT-2 / LLaMA-style blocks (forward hooks); a hook may return a replacement. `dry_trace` lists every name without computing.

`h`, `n` are the heads and queries of `pattern_slice=(heads, queries)` (default: all): scores and patterns
are recomputed from q and k for that slice only, so the full [B, H, Nq, Nk] map exists only when asked for.
hook_z's `z[b, i, h]` is head h's output at query i; how heads merge into channels is the model's business
(SAM Audio and nn.MultiheadAttention both merge "(h d)", so `z.flatten(2)` is the input of the output
projection).

Per call, hooks run in this order: hook_q/k/v (may edit) -> hook_attn_scores -> hook_pattern (may edit: see
below) -> the operator, with the trace's interventions -> statistics -> hook_z (may edit) -> hook_result.
With no hook function on scores / patterns (caching only) they are recomputed after the operator from its lse.

Score / pattern edits: edits that an operator argument expresses are fused -- scores + b[key] (the same for
every query; b may be -inf: a key mask) become a per-key segment bias, scores * c a logit scale, pattern * c
(0: head removed) a head gate; other edits (or edits of a query slice) are computed eagerly for the edited
(row, head) pairs only, with a warning giving the size of the map materialised. Statistics and hook_result
are read-only: a hook that returns or edits them raises ValueError naming the interventions that change
the distribution.

Never silent: at the end of a traced forward pass, a capture site pattern, intervention, hook name or cache
filter that matched nothing raises `NothingMatchedError` listing the names that exist. Gradients flow
through the operator (ops/autograd.py); `bwd_hooks` reach hook_q/k/v, hook_z and the residual hook points.
"""

from __future__ import annotations

import array
import difflib
import fnmatch
import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import CAPTURE_NAMES, probed_attention
from . import interventions as vocabulary
from .intercept import (AttentionCall, Interceptor, UnsupportedAttentionError, intercept, is_cached_tree, model_tree,
                        static_sites, wrap_forward)

__all__ = [
    "HOOK_KINDS",
    "AttentionCall",
    "HookPoint",
    "NothingMatchedError",
    "Interceptor",
    "SiteRecord",
    "Trace",
    "UnsupportedAttentionError",
    "intercept",
    "dry_trace",
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
GRAD_HOOKS = INPUT_HOOKS + ("hook_z",)  # values on the path from inputs to the output: bwd_hooks reach them
_ALTERNATIVES = (
    "editing the operator's statistics or hook_result from a hook is not supported; change the distribution "
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
    """Whether `site` matches one of the glob `patterns` (fnmatch's case-sensitive rules)."""
    test = _MATCHERS.get(patterns)
    if test is None:
        test = _matcher(patterns)
    return test(site)


def _matcher(patterns: tuple) -> Callable[[str], bool]:
    """One test per pattern tuple, kept: a trace per probe matches every site against every intervention.
    Plain names (no glob character) become a set lookup; globs, one compiled regex for the tuple."""
    plain = frozenset(p for p in patterns if not _GLOB_CHARS.intersection(p))
    globs = [p for p in patterns if p not in plain]
    if not globs:
        test = plain.__contains__
    else:
        regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globs)).match  # translate anchors at \Z
        test = (lambda site: site in plain or regex(site) is not None) if plain else \
            (lambda site: regex(site) is not None)
    if len(_MATCHERS) > 4096:  # patterns made per probe (f-strings) would otherwise pile up
        _MATCHERS.clear()
    _MATCHERS[patterns] = test
    return test


_GLOB_CHARS = frozenset("*?[")
_MATCHERS: dict = {}  # patterns tuple -> test(site)


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


def select_indices(selector: Selector, n: int, name: str) -> list:
    """The indices `select_mask` would pick, as a Python list (no tensor work for int / slice / list
    selectors: a sweep's trace sets one selector per probe)."""
    if selector is None:
        return list(range(n))
    if isinstance(selector, int) and not isinstance(selector, bool):
        if not -n <= selector < n:
            raise ValueError(f"{name}: index {selector} out of range for {n} items")
        return [selector % n]
    if isinstance(selector, slice):
        return list(range(n)[selector])
    return select_mask(selector, n, name).nonzero().flatten().tolist()


def _gate_factors(interventions, B: int, H: int) -> list:
    """head_gate [B, H] of gate interventions (ablate_heads / scale_heads) as B float32 arrays: the products
    taken in Python floats, then rounded to float32 as `_operator_args`' head_gate tensor is."""
    gate = [[1.0] * H for _ in range(B)]
    for iv in interventions:
        heads = select_indices(iv.heads, H, "heads")
        for r in select_indices(iv.rows, B, "rows"):
            for h in heads:
                gate[r][h] *= iv.value
    return [array.array("f", row) for row in gate]


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


class NothingMatchedError(ValueError):
    """A requested site, hook name or intervention matched nothing in a traced forward pass."""


_IV_NAMES = {"gate": "ablate_heads/scale_heads", "logit_scale": "set_temperature",
             "segment_bias": "knockout_segments/bias_segments", "key_mask": "knockout_keys",
             "patch": "patch_output", "bias": "steer"}


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
    hooks: dict = field(default_factory=dict)  # kind -> [fn]
    bwd_hooks: dict = field(default_factory=dict)  # kind -> [fn], called with gradients
    cache: tuple = ()  # kinds cached
    output_edit: dict = field(default_factory=dict)  # (B, H, Dv, device, dtype) -> (gate, bias): output_transform

    @property
    def active(self) -> bool:
        return bool(self.record or self.interventions or self.hooks or self.bwd_hooks or self.cache)


_IDLE_PLAN = _SitePlan()  # shared by every site with nothing configured: never modified (output_transform and
# attend are only reached for active plans)


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
        intercept_sdpa: see `Interceptor` (None: wrap torch.nn.functional.scaled_dot_product_attention unless
            the model has an attention router; "mode": catch every SDPA call with a TorchFunctionMode, for code
            that bound the function at import; False: no SDPA interception).

    Interventions (site: a name or glob pattern; heads / rows: None = all, an int, slice, list or tensor;
    rows index the batch of the attention call). They apply wherever their pattern matches, whether or not
    the site is in `sites`, and they combine: gates multiply, biases add, a later patch wins.
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "*", capture: Sequence[str] = (), *,
                 segments=None, backend: str = "auto", history: bool = False,
                 intercept_sdpa=None):
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
        self._cache_spec = None
        self._forwards = 0
        self.pattern_slice = (None, None)
        self._plans: dict[str, _SitePlan] = {}
        self._interceptor = Interceptor(model, self, intercept_sdpa)
        # hook name -> (how, module) and site -> out projection, from the module tree: looked up on entering (or
        # when first asked for before that), through caches kept per model, so a trace per probe costs one
        # check of the tree (`model_tree`) and no walk
        self._tree_info: Optional[tuple] = None
        self._point_plans: dict[str, tuple] = {}
        self._point_handles: dict = {}  # name -> handle, for the points installed (see _install_wanted_points)
        self._inside = False

    def _structure_now(self) -> tuple:
        if self._tree_info is None:  # asked before entering: from the tree as it is now
            self._tree_info = _structure(self.model, model_tree(self.model))
        return self._tree_info

    @property
    def _points(self) -> dict:
        return self._structure_now()[0]

    @property
    def _out_projs(self) -> dict:
        return self._structure_now()[1]

    # -- context
    def __enter__(self) -> "Trace":
        if self._inside:
            raise RuntimeError("this trace is already active; create a new one to nest")
        tree = model_tree(self.model)  # cached per model: unless the tree changed, one cheap check and no walk
        self._tree_info = _structure(self.model, tree)
        self._forwards = 0
        # forwards of the model (for the never-silent check): a forward wrapper, cheaper than a pre-hook, which
        # would send the model's call through torch's hook path
        self._uncount = wrap_forward(self.model, self._interceptor, self._count_forward)
        self._point_handles = {}
        self._inside = True
        try:
            self._install_wanted_points()
            self._interceptor.enter(tree)
        except BaseException:
            self._remove_points()
            raise
        return self

    def _install_wanted_points(self) -> None:
        """Residual-stream points get a module hook only once a hook function or the cache names them (also
        when that happens inside the context): an unhooked point costs nothing."""
        if not self._inside or not (self._hooks or self._cache_filter is not None):
            return
        for name, (how, module) in self._points.items():
            if name in self._point_handles:
                continue
            if any(test(name) for test, _, _ in self._hooks) or (self._cache_filter is not None
                                                                  and self._cache_filter(name)):
                self._point_handles[name] = self._install_point(name, how, module)

    def _remove_points(self) -> None:
        self._inside = False
        self._uncount()
        while self._point_handles:
            self._point_handles.popitem()[1].remove()

    def _install_point(self, name: str, how: str, module: nn.Module):
        """A forward (pre-)hook that hands the activation to `_on_point` and puts back its replacement."""
        if how == "pre":  # the first input of `module`: positional, else its first tensor keyword argument
            def pre(mod, args, kwargs):
                if args:
                    new = self._on_point(name, args[0])
                    return None if new is args[0] else ((new,) + tuple(args[1:]), kwargs)
                key = next((key for key, val in kwargs.items() if isinstance(val, Tensor)), None)
                if key is None:
                    return None
                new = self._on_point(name, kwargs[key])
                return None if new is kwargs[key] else (args, {**kwargs, key: new})

            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(mod, args, output):
            # "out0": the first element of a tuple output; "first": that, when the output is a tuple
            first = how == "out0" or (how == "first" and isinstance(output, tuple))
            value = output[0] if first else output
            new = self._on_point(name, value)
            if new is value:
                return None
            return (new,) + tuple(output[1:]) if first else new

        return module.register_forward_hook(post)

    def _on_point(self, name: str, value: Tensor) -> Tensor:
        entry = self._point_plans.get(name)
        if entry is None:
            fwd = [fn for test, fn, d in self._hooks if d == "fwd" and test(name)]
            bwd = [fn for test, fn, d in self._hooks if d == "bwd" and test(name)]
            cached = self._cache_filter is not None and self._cache_filter(name)
            entry = self._point_plans[name] = (fwd, bwd, cached)
        fwd, bwd, cached = entry
        if not (fwd or bwd or cached) or not isinstance(value, Tensor):
            return value
        site, _, kind = name.rpartition(".")
        point = HookPoint(name, site, kind)
        for fn in fwd:
            result = fn(value, point)
            if result is not None:
                if not isinstance(result, Tensor) or result.shape != value.shape:
                    raise ValueError(f"hook on {name} must return None or a tensor of shape {tuple(value.shape)}")
                value = result.to(value.dtype)
        if cached:
            self.cache[name] = value.detach()
        if bwd and value.requires_grad:
            def call(grad, fns=bwd):
                for fn in fns:
                    result = fn(grad, point)
                    if result is not None:
                        grad = result
                return grad

            value.register_hook(call)
        return value

    def _count_forward(self) -> None:
        self._forwards += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._interceptor.__exit__(exc_type, exc, tb)
        self._remove_points()
        if exc_type is None:
            self._check_matched()

    def _site_kinds(self, site: str) -> tuple:
        return HOOK_KINDS + (("hook_result",) if site in self._out_projs else ())

    def hook_names(self) -> list[str]:
        """Every hook name: those of the attention sites called (before a forward pass: the sites known
        statically; `dry_run` lists them all without computing), then the residual-stream hook points."""
        return [f"{site}.{kind}" for site in self.sites for kind in self._site_kinds(site)] + list(self._points)

    def _check_matched(self) -> None:
        """Never silent: after a traced forward pass, every requested site pattern, intervention, hook name and
        cache filter must have matched something; otherwise NothingMatchedError lists what exists."""
        seen = list(self._interceptor.seen)
        if not seen and not self._forwards:
            return  # the model did not run inside the trace: nothing to judge
        problems = []
        if self.capture and not any(_matches(site, self.site_patterns) for site in seen):
            problems.append(f"sites={list(self.site_patterns)} (capture {list(self.capture)})")
        for iv in self._interventions:
            if not any(_matches(site, iv.sites) for site in seen):
                problems.append(f"intervention {_IV_NAMES.get(iv.kind, iv.kind)} on {list(iv.sites)}")
        names = ([f"{site}.{kind}" for site in seen for kind in self._site_kinds(site)] + list(self._points)
                 if self._hook_specs or self._cache_filter is not None else [])
        for spec, _ in self._hook_specs:
            if not any(_name_filter(spec)(n) for n in names):
                close = difflib.get_close_matches(spec, names, n=1, cutoff=0.6) if isinstance(spec, str) else []
                problems.append(f"hook {spec!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if self._cache_filter is not None and not any(self._cache_filter(n) for n in names):
            problems.append("cache names_filter" + (f" {self._cache_spec!r}" if self._cache_spec is not None else ""))
        if not problems:
            return
        if seen:
            where = (f"sites called: {seen}; hook names are '<site>.<kind>' with kinds {', '.join(HOOK_KINDS)}"
                     + (", hook_result" if self._out_projs else "")
                     + (f"; residual-stream hook points: {_abbreviate(list(self._points))}" if self._points else ""))
        else:
            where = ("the model ran but made no attention call that can be probed (none through "
                     "F.scaled_dot_product_attention, nn.MultiheadAttention or an attention router): an eager "
                     "matmul/softmax attention implementation cannot be probed; switch the model to SDPA (for "
                     "Hugging Face models: attn_implementation='sdpa'); code that bound "
                     "scaled_dot_product_attention at import is only seen with intercept_sdpa='mode'")
        raise NothingMatchedError("matched nothing: " + "; ".join(problems) + ". " + where)

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
        self._point_plans.clear()

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

    def knockout_keys(self, site: SiteSpec, keys: Selector, rows: Selector = None,
                      heads: Selector = None) -> "Trace":
        """No attention to individual keys: for every head through the key padding mask, or for `heads` only
        through a per-head key bias (fused: the site's key segments are refined at the knocked-out keys)."""
        return self._add(site, "key_mask", heads, rows, keys)

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

    def add_hook(self, name, fn: Callable, dir: str = "fwd") -> "Trace":
        """Call fn(tensor, hook: HookPoint) at hook `name` (exact name, glob, list of them, or a predicate);
        dir="bwd": call fn(gradient, hook) when the backward pass reaches that value (TransformerLens's
        bwd hooks; a returned tensor replaces the gradient)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        self._hooks.append((_name_filter(name), fn, dir))
        self._hook_specs.append((name, fn))
        self._changed()
        self._install_wanted_points()
        return self

    def cache_hooks(self, names_filter=None, pattern_slice=None) -> "Trace":
        """Store the values of the hooks passing `names_filter` in `tr.cache` (see the module doc)."""
        self._cache_filter = _name_filter(names_filter)
        self._cache_spec = names_filter if isinstance(names_filter, (str, list, tuple)) else None
        self.pattern_slice = _check_pattern_slice(pattern_slice)
        self._changed()
        self._install_wanted_points()
        return self

    # -- SiteHandler protocol
    def _plan(self, site: str) -> _SitePlan:
        plan = self._plans.get(site)
        if plan is None:
            record = self.capture if self.capture and _matches(site, self.site_patterns) else ()
            interventions = [iv for iv in self._interventions if _matches(site, iv.sites)]
            if not (record or interventions or self._hooks or self._cache_filter is not None):
                self._plans[site] = _IDLE_PLAN  # nothing here (most sites of a trace per probe): no new object
                return _IDLE_PLAN
            plan = _SitePlan(record, interventions)
            for kind in self._site_kinds(site) if self._hooks else ():
                name = f"{site}.{kind}"
                for direction, hooks in (("fwd", plan.hooks), ("bwd", plan.bwd_hooks)):
                    fns = [fn for test, fn, d in self._hooks if d == direction and test(name)]
                    if fns:
                        hooks[kind] = fns
            bad = sorted(set(plan.bwd_hooks) - set(GRAD_HOOKS))
            if bad:
                raise ValueError(f"bwd_hooks on {', '.join(f'{site}.{b}' for b in bad)}: these values are not part "
                                 f"of the forward graph; gradients reach {', '.join(GRAD_HOOKS)}")
            if self._cache_filter is not None:
                plan.cache = tuple(k for k in self._site_kinds(site) if self._cache_filter(f"{site}.{k}"))
            self._plans[site] = plan
        return plan

    def wants(self, site: str) -> bool:
        return self._plan(site).active

    def output_transform(self, site: str):
        """At a site whose only interventions act on the head outputs (ablate_heads / scale_heads: head_gate,
        steer: out_bias) and where nothing is captured, hooked or cached, the probed kernel buys nothing: the
        model's own attention followed by out * gate + bias is the operator's contract exactly (its step order:
        gate, then bias). This returns that edit, so the interceptor runs plain SDPA there -- as fast as the
        model untraced. backend="auto" only: a named backend runs the operator at every probed site."""
        if self.backend != "auto":
            return None
        plan = self._plan(site)
        if (plan.record or plan.hooks or plan.bwd_hooks or plan.cache or not plan.interventions
                or any(iv.kind not in ("gate", "bias") for iv in plan.interventions)):
            return None

        def edit(out: Tensor) -> Tensor:
            B, H, Nq, Dv = out.shape
            key = (B, H, Dv, out.device, out.dtype)
            found = plan.output_edit.get(key)
            if found is None:  # per shape, once per configuration (plans are dropped when it changes)
                if all(iv.kind == "gate" for iv in plan.interventions):
                    # no tensor work: a trace per probe builds this for every probe
                    factors = _gate_factors(plan.interventions, B, H)
                    pairs = [(r, h, g) for r, row in enumerate(factors) for h, g in enumerate(row) if g != 1.0]
                    found = (factors, pairs, None)
                else:
                    args = self._operator_args(plan, site, None, B, H, Nq, 0, Dv, out)
                    gate, bias = args.get("head_gate"), args.get("out_bias")
                    pairs = None
                    if gate is not None:
                        rows, heads = (gate != 1).nonzero(as_tuple=True)  # the (row, head) pairs the gate changes
                        pairs = list(zip(rows.tolist(), heads.tolist(), gate[rows, heads].tolist()))
                    found = (gate, pairs, None if bias is None else bias.to(out.dtype)[:, :, None, :])
                plan.output_edit[key] = found
            gate, pairs, bias = found
            if pairs:
                if out.requires_grad:
                    if not isinstance(gate, Tensor):
                        gate = torch.tensor([list(row) for row in gate], dtype=torch.float32, device=out.device)
                    out = out * gate.to(out.dtype)[:, :, None, None]
                elif len(pairs) <= 32:
                    # the interceptor hands over a fresh output nobody else holds: edit in place, and only the
                    # gated (row, head) slices (a sweep ablates one head per row: 1/H of the output or less)
                    for r, h, value in pairs:  # views: each touches only its [Nq, Dv] slice
                        out[r, h].mul_(value)
                else:  # many pairs: one indexed multiply instead of a Python loop
                    rows = torch.tensor([r for r, _, _ in pairs], device=out.device)
                    heads = torch.tensor([h for _, h, _ in pairs], device=out.device)
                    values = torch.tensor([g for _, _, g in pairs], dtype=out.dtype, device=out.device)
                    out[rows, heads] = out[rows, heads] * values[:, None, None]
            if bias is not None:
                out = out + bias if out.requires_grad else out.add_(bias)
            return out

        return edit

    def attend(self, call: AttentionCall) -> tuple[Tensor, Optional[Tensor]]:
        plan = self._plan(call.site)
        site = call.site
        q, k, v = (self._input_hook(plan, site, kind, t)
                   for kind, t in zip(INPUT_HOOKS, (call.q, call.k, call.v)))
        B, H, Nq, _ = q.shape
        args = self._operator_args(plan, site, call.key_padding_mask, B, H, Nq, k.shape[2], v.shape[3], q)
        if call.attn_bias is not None:
            args["attn_bias"] = call.attn_bias  # for the score / pattern slices (attention_scores)
        if call.causal:
            args["causal"] = True
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        kinds = set(plan.hooks) | set(plan.cache)
        segment_of = args.get("_segment_of")
        if "segments" not in args or (segment_of is not None and segment_of[1] is None):
            kinds.discard("hook_segment_mass")  # no user segments at this site
        heads = rows = None
        if kinds & set(MAP_HOOKS):
            heads = select_mask(self.pattern_slice[0], H, "pattern_slice heads", q.device).nonzero().flatten()
            rows = select_mask(self.pattern_slice[1], Nq, "pattern_slice queries", q.device).nonzero().flatten()
        edited = None  # (bool [B, h] pairs computed eagerly, their pattern [B, h, n, Nk])
        if any(kind in plan.hooks for kind in MAP_HOOKS):
            # hook functions on scores / patterns run before the operator, so that their edits change it
            edited = self._map_hooks(plan, site, q, k, scale, args, heads, rows)

        capture = {n for n in plan.record if n in CAPTURE_NAMES}
        capture |= {kind[len("hook_"):] for kind in kinds if kind in STAT_HOOKS}
        post_maps = bool(kinds & set(MAP_HOOKS)) and edited is None
        if post_maps or call.need_weights:
            capture.add("lse")  # patterns are exp(score - final lse)
        op_args = {n: t for n, t in args.items() if not n.startswith("_") and n not in ("attn_bias", "causal")}
        out, caps = probed_attention(q, k, v, scale=call.scale, capture=tuple(capture), backend=self.backend,
                                     causal=call.causal, attn_mask=call.attn_bias, **op_args)
        caps = _user_segments(caps, args)
        if edited is not None and edited[0].any():
            out = _write_eager_slice(out, edited, v, args, heads, rows)

        for kind in STAT_HOOKS:
            if kind in kinds:
                self._read_only_hook(plan, site, kind, caps[kind[len("hook_"):]])
        if post_maps:  # caching only: the slice is recomputed from q, k and the operator's lse
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
        self._bwd_hook(plan, site, "hook_z", z)
        if "hook_result" in plan.hooks or "hook_result" in plan.cache:
            self._read_only_hook(plan, site, "hook_result", head_results(z, self._out_projs[site].weight))
        out = z.transpose(1, 2)
        if "hook_z" in plan.cache:
            self.cache[f"{site}.hook_z"] = z.detach()
        self._record(plan, site, caps, out)
        return out, weights

    def _map_hooks(self, plan: _SitePlan, site: str, q, k, scale, args: dict, heads: Tensor, rows: Tensor):
        """Run the scores / pattern hook functions on the slice; fuse what their edits mean into `args` where an
        operator argument expresses it, and return (bool [B, h] pairs to compute eagerly, their pattern)."""
        B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
        all_rows = rows.numel() == Nq
        scores = attention_scores(q, k, scale, args, heads, rows)
        new_scores = self._editable_hook(plan, site, "hook_attn_scores", scores)
        eager = torch.zeros(B, heads.numel(), dtype=torch.bool, device=q.device)
        if new_scores is not scores:
            changed = _changed(new_scores, scores, (2, 3))
            key_bias, ratio, fitted = _fit_score_edit(scores, new_scores, changed, all_rows,
                                                      "segment_bias" not in args and "attn_bias" not in args)
            if ratio is not None:
                full = torch.ones(B, H, device=q.device)
                full[:, heads] = ratio
                args["logit_scale"] = full if args.get("logit_scale") is None else args["logit_scale"] * full
            if key_bias is not None:
                full = torch.zeros(B, H, k.shape[2], device=q.device)
                full[:, heads] = key_bias
                add_key_bias(args, full)
            eager |= changed & ~fitted
        pattern = _softmax_rows(new_scores)
        if "hook_pattern" in plan.hooks or "hook_pattern" in plan.cache:
            new_pattern = self._editable_hook(plan, site, "hook_pattern", pattern)
            if new_pattern is not pattern:
                changed = _changed(new_pattern, pattern, (2, 3))
                gate, fitted = _fit_pattern_gate(pattern, new_pattern, changed & ~eager) if all_rows else (None, None)
                if gate is not None:
                    full = torch.ones(B, H, device=q.device)
                    full[:, heads] = gate
                    args["head_gate"] = full if args.get("head_gate") is None else args["head_gate"] * full
                    changed = changed & ~fitted
                eager |= changed
                pattern = new_pattern
        if eager.any():
            n_pairs = int(eager.sum())
            warnings.warn(f"{site}: a score/pattern hook edit that no fused intervention expresses; {n_pairs} "
                          f"(row, head) pair(s) x {rows.numel()} queries x {k.shape[2]} keys computed eagerly "
                          f"(materialised {n_pairs * rows.numel() * k.shape[2] * 4} bytes of map)", stacklevel=4)
        return eager, pattern

    def _editable_hook(self, plan: _SitePlan, site: str, kind: str, value: Tensor) -> Tensor:
        """Run the hook functions of a scores / pattern hook; a returned or in-place edited tensor is the new
        value (returned as a different object, so the caller knows it was edited)."""
        name = f"{site}.{kind}"
        fns = plan.hooks.get(kind, ())
        current = value.clone() if fns else value
        for fn in fns:
            result = fn(current, HookPoint(name, site, kind))
            if result is not None:
                if not isinstance(result, Tensor) or result.shape != value.shape:
                    raise ValueError(f"hook on {name} must return None or a tensor of shape {tuple(value.shape)}")
                current = result.to(torch.float32)
        if kind in plan.cache:
            self.cache[name] = current.detach()
        if fns and not torch.equal(torch.nan_to_num(current), torch.nan_to_num(value)):
            return current
        return value

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
        self._bwd_hook(plan, site, kind, x)
        return x.transpose(1, 2)

    def _bwd_hook(self, plan: _SitePlan, site: str, kind: str, x: Tensor) -> None:
        """TransformerLens bwd_hooks: fn(gradient of x, hook) when the backward reaches x; a returned tensor
        replaces the gradient."""
        fns = plan.bwd_hooks.get(kind, ())
        if not fns or not x.requires_grad:
            return
        point = HookPoint(f"{site}.{kind}", site, kind)

        def call(grad, fns=fns, point=point):
            for fn in fns:
                result = fn(grad, point)
                if result is not None:
                    grad = result
            return grad

        x.register_hook(call)

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
        gate = logit_scale = seg_bias = out_bias = patch = patch_mask = key_bias = None
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
            elif iv.kind == "key_mask" and iv.heads is None:
                keep = ~(select_mask(iv.rows, B, "rows", device)[:, None] & select_mask(iv.value, Nk, "keys", device))
                current = args["key_padding_mask"]
                args["key_padding_mask"] = keep if current is None else current & keep
            elif iv.kind == "key_mask":  # per head: a -inf key bias on the selected (row, head) pairs
                keys = select_mask(iv.value, Nk, "keys", device)
                key_bias = torch.zeros(B, H, Nk, device=device) if key_bias is None else key_bias
                key_bias = torch.where(sel[:, :, None] & keys, float("-inf"), key_bias)
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
        if key_bias is not None:
            add_key_bias(args, key_bias)
        return args


# ---------------------------------------------------------------------------------- hook points
_STRUCTURE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (tree, points, projections)


def _structure(model: nn.Module, tree) -> tuple[dict, dict]:
    """(activation_points, output_projections) of `model`, recomputed only when its module tree changed
    (`tree`: its ModelTree): a trace per probe in a loop would otherwise classify every module each time.
    Read-only: callers must not modify the dicts."""
    found = _STRUCTURE.get(model)
    if found is None or found[0] is not tree:  # model_tree returns the same object while the tree is unchanged
        points, projections = activation_points(model), output_projections(model)
        found = (tree, points, projections)
        # a value holding the model itself (a root-level block, or a tree with a cycle through the root, which
        # model_tree does not cache either) would keep the weak key alive forever
        if all(module is not model for _, module in points.values()) and is_cached_tree(model, tree):
            _STRUCTURE[model] = found
    return found[1], found[2]


def activation_points(model: nn.Module) -> dict:
    """Residual-stream hook names of the model -> (how, module): "out" = the module's output, "out0" = the
    first element of its output tuple, "pre" = its first input.

    - `HookPointModule`s (the DiT's blocks: layers.{i}.hook_resid_pre / attn_out / cross_attn_out / resid_mid /
      mlp_out / resid_post), by their own names;
    - nn.TransformerEncoderLayer / nn.TransformerDecoderLayer at path P: P.hook_resid_pre (the layer input),
      P.hook_attn_out (self_attn's output, before dropout1 and, for post-norm layers, before norm1),
      P.hook_cross_attn_out (decoder layers), P.hook_mlp_out (linear2's output), P.hook_resid_post (the output);
    - GPT-2 / LLaMA-style blocks (a child named mlp and an attention child named attn / self_attn / attention
      / self_attention; Hugging Face's layout): P.hook_resid_pre (the block's first input), P.hook_attn_out and
      P.hook_mlp_out (those children's outputs, the first element when a tuple), P.hook_resid_post (the
      block's output, likewise).
    """
    from ..models.hook_points import HookPointModule

    points: dict = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPointModule):
            points[module.name] = ("out", module)
        elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            prefix = f"{path}." if path else ""
            points[f"{prefix}hook_resid_pre"] = ("pre", module)
            points[f"{prefix}hook_attn_out"] = ("out0", module.self_attn)
            if isinstance(module, nn.TransformerDecoderLayer):
                points[f"{prefix}hook_cross_attn_out"] = ("out0", module.multihead_attn)
            points[f"{prefix}hook_mlp_out"] = ("out", module.linear2)
            points[f"{prefix}hook_resid_post"] = ("out", module)
        elif _decoder_block_parts(module) is not None and not any(
                isinstance(m, HookPointModule) for m in module.children()):
            attn, mlp = _decoder_block_parts(module)
            prefix = f"{path}." if path else ""
            points[f"{prefix}hook_resid_pre"] = ("pre", module)
            points[f"{prefix}hook_attn_out"] = ("first", attn)
            points[f"{prefix}hook_mlp_out"] = ("first", mlp)
            points[f"{prefix}hook_resid_post"] = ("first", module)
    return points


_ATTENTION_CHILDREN = ("attn", "self_attn", "attention", "self_attention")


def _decoder_block_parts(module: nn.Module):
    """(attention, mlp) children of a transformer block laid out as GPT-2 / LLaMA-style models name them (an
    attention child named attn / self_attn / attention / self_attention and a child named mlp), or None."""
    children = dict(module.named_children())
    mlp = children.get("mlp")
    if mlp is None:
        return None
    for name in _ATTENTION_CHILDREN:
        if name in children:
            return children[name], mlp
    return None


def output_projections(model: nn.Module) -> dict:
    """site -> the nn.Linear that maps the merged head outputs "(h d)" to the model width, where the model
    structure says so: router attention modules (`.site`, `.wo`) and nn.MultiheadAttention (`out_proj`)."""
    from .intercept import ROOT_SITE

    found = {}
    for path, module in model.named_modules():
        if isinstance(getattr(module, "site", None), str) and isinstance(getattr(module, "wo", None), nn.Linear):
            found[module.site] = module.wo
        elif isinstance(module, nn.MultiheadAttention):
            found[path or ROOT_SITE] = module.out_proj
    return found


def head_results(z: Tensor, weight: Tensor) -> Tensor:
    """TransformerLens's hook_result: head h's term of the output projection, [B, N, H, d_model] =
    z[b, n, h] @ W_O[:, h*Dv:(h+1)*Dv]^T (no output bias; heads merge contiguously "(h d)")."""
    B, N, H, Dv = z.shape
    w = weight.reshape(weight.shape[0], H, Dv)
    return torch.einsum("bnhd,mhd->bnhm", z.to(w.dtype), w)


def _abbreviate(names: list, keep: int = 8) -> str:
    return ", ".join(names[:keep]) + (f", ... ({len(names)} in all)" if len(names) > keep else "")


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


# ---------------------------------------------------------------------------------------------- key bias
# -------------------------------------------------------------------------------- recognising hook edits
def _changed(new: Tensor, old: Tensor, dims) -> Tensor:
    """bool [B, h]: which (row, head) pairs an edit touched (-inf compares equal to -inf)."""
    same = (new == old) | (torch.isnan(new) & torch.isnan(old))
    return ~same.all(dim=dims[-1]).all(dim=dims[0])


def _fit_score_edit(old: Tensor, new: Tensor, changed: Tensor, all_rows: bool, scale_ok: bool):
    """Which edited (row, head) pairs of scores [B, h, n, Nk] an operator argument reproduces:
    new = old + b[key] (b finite or -inf: an additive per-key bias / key mask, same for every query), or
    new = c * old (a temperature, only where the logits are scale * q.k alone).
    -> (key bias [B, h, Nk] or None, logit-scale factor [B, h] or None, bool [B, h] fitted)."""
    fitted = torch.zeros_like(changed)
    if not all_rows or not changed.any():  # a slice of the queries: fused arguments would touch all of them
        return None, None, fitted
    old_fin, new_fin = torch.isfinite(old), torch.isfinite(new)
    blocked = (new == float("-inf"))
    bad = (~old_fin & ~blocked) | torch.isnan(new) | (new == float("inf"))  # cannot unmask a key
    dont_care = ~old_fin & blocked
    delta = torch.where(old_fin & new_fin, new - torch.where(old_fin, old, 0.0),
                        torch.full_like(new, float("-inf")))
    hi = torch.where(dont_care, float("-inf"), delta).amax(dim=2)
    lo = torch.where(dont_care, float("inf"), delta).amin(dim=2)
    both_inf = (hi == float("-inf")) & (lo == float("-inf"))
    none = dont_care.all(dim=2)
    close = torch.where(torch.isfinite(hi) & torch.isfinite(lo), (hi - lo).abs() <= 1e-5 * (1 + hi.abs()), both_inf)
    bias_ok = changed & ~bad.flatten(2).any(-1) & (close | none).all(-1)
    key_bias = None
    if bias_ok.any():
        key_bias = torch.where(bias_ok[..., None] & ~none, hi, 0.0)
        fitted |= bias_ok
    ratio = None
    rest = changed & ~fitted
    if scale_ok and rest.any():
        same_mask = (old_fin == new_fin).flatten(2).all(-1)
        o, n_ = torch.where(old_fin, old, 0.0), torch.where(new_fin, new, 0.0)
        c = (o * n_).sum((2, 3)) / (o * o).sum((2, 3)).clamp_min(1e-30)
        ok = ((n_ - c[..., None, None] * o).abs() <= 1e-5 * (1 + n_.abs())).flatten(2).all(-1)
        ratio_ok = rest & same_mask & ok
        if ratio_ok.any():
            ratio = torch.where(ratio_ok, c, 1.0)
            fitted |= ratio_ok
    return key_bias, ratio, fitted


def _fit_pattern_gate(old: Tensor, new: Tensor, changed: Tensor):
    """Edited pattern pairs with new = c * old (c = 0: the head removed) are a head gate.
    -> (gate [B, h] or None, bool [B, h] fitted)."""
    c = (old * new).sum((2, 3)) / (old * old).sum((2, 3)).clamp_min(1e-30)
    ok = ((new - c[..., None, None] * old).abs() <= 1e-6 + 1e-5 * new.abs()).flatten(2).all(-1)
    fitted = changed & ok
    return (torch.where(fitted, c, 1.0), fitted) if fitted.any() else (None, fitted)


def _softmax_rows(scores: Tensor) -> Tensor:
    """softmax over keys; a row with every key blocked gives 0, not NaN."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    alive = torch.isfinite(lse)
    return torch.where(alive, torch.exp(scores - torch.where(alive, lse, 0.0)), 0.0)


def _write_eager_slice(out: Tensor, edited, v: Tensor, args: dict, heads: Tensor, rows: Tensor) -> Tensor:
    """Overwrite the eagerly computed (row, head) pairs of the slice: edited pattern @ v, then the operator's
    patch / gate / bias for those heads, as the contract orders them."""
    eager, pattern = edited
    H, Hkv = out.shape[1], v.shape[1]
    vh = v.index_select(1, torch.div(heads, H // Hkv, rounding_mode="floor")).float()
    value = torch.matmul(pattern, vh)  # [B, h, n, Dv]
    if args.get("patch_mask") is not None:  # patched heads keep the patch
        eager = eager & ~args["patch_mask"].index_select(1, heads)
    if args.get("head_gate") is not None:
        value = value * args["head_gate"].index_select(1, heads)[:, :, None, None]
    if args.get("out_bias") is not None:
        value = value + args["out_bias"].index_select(1, heads)[:, :, None, :]
    index = (slice(None), heads[:, None], rows[None, :])
    out = out.clone()
    out[index] = torch.where(eager[:, :, None, None], value.to(out.dtype), out[index])
    return out


def add_key_bias(args: dict, key_bias: Tensor) -> None:
    """Fuse a per-(row, head, key) additive logit bias [B, H, Nk] (-inf = knocked out) into the operator's
    segments: the key segments are refined at every key where the bias (or a user boundary) changes, and the
    bias becomes the refined segments' segment_bias. The user's segments stay what captures report:
    args["_segment_of"] maps refined segments to them (segment_mass is summed back, see `_user_segments`)."""
    B, H, Nk = key_bias.shape
    device = key_bias.device
    user = args.get("segments")
    change = torch.zeros(Nk, dtype=torch.bool, device=device)
    change[0] = True
    if Nk > 1:
        prev, cur = key_bias[..., :-1], key_bias[..., 1:]
        change[1:] = ((prev != cur) & ~(torch.isinf(prev) & torch.isinf(cur) & (prev == cur))).flatten(0, 1).any(0)
    if user is not None:
        change[torch.tensor(user[:-1], dtype=torch.long, device=device)] = True
    starts = change.nonzero().flatten()
    bounds = starts.tolist() + [Nk]
    refined_bias = key_bias.index_select(2, starts)  # constant within each refined segment
    user_of = torch.zeros(len(starts), dtype=torch.long, device=device)
    if user is not None:
        user_of = torch.bucketize(starts, torch.tensor(user[1:], device=device), right=True)
        old = args.get("segment_bias")
        if old is not None:
            refined_bias = refined_bias + old.index_select(2, user_of)
    groups = None if user is None else len(user) - 1
    prior = args.get("_segment_of")
    if prior is not None:  # `user` was already a refinement (e.g. knockout_keys(heads=) and a score edit)
        user_of, groups = prior[0].index_select(0, user_of), prior[1]
    args["segments"] = bounds
    args["segment_bias"] = refined_bias.contiguous()
    args["_segment_of"] = (user_of, groups)


def _user_segments(caps: dict, args: dict) -> dict:
    """Sum segment_mass over refined segments back to the user's segments (see `add_key_bias`)."""
    segment_of = args.get("_segment_of")
    if segment_of is None or "segment_mass" not in caps:
        return caps
    user_of, groups = segment_of
    mass = caps["segment_mass"]
    if groups is None:
        caps = dict(caps)
        caps.pop("segment_mass")
        return caps
    summed = mass.new_zeros(mass.shape[:-1] + (groups,)).index_add_(-1, user_of, mass)
    return {**caps, "segment_mass": summed}


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
    if args.get("causal"):  # top-left aligned, as SDPA's is_causal: query i sees keys j <= i
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device) > queries[:, None], float("-inf"))
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
def dry_trace(model: nn.Module, *inputs, meta: bool = True, intercept_sdpa=None,
              **kwargs) -> Trace:
    """Learn a model's site and hook names without computing: `dry_trace(model, x).hook_names()`.

    meta=True runs `model(*inputs, **kwargs)` once on meta tensors (parameters, buffers and tensor inputs
    swapped for shape-only copies with torch.func.functional_call; nothing is computed or allocated, the
    model is not modified). Models whose forward reads tensor values (.item(), data-dependent control flow)
    cannot run on meta tensors: meta=False runs a real forward under no_grad with nothing probed.
    Returns the (exited) Trace: `.sites` in call order, `.hook_names()`.
    """
    tr = Trace(model, intercept_sdpa=intercept_sdpa)
    if not meta:
        with torch.no_grad(), tr:
            model(*inputs, **kwargs)
        return tr

    def to_meta(x):
        if isinstance(x, Tensor):
            return torch.empty_like(x, device="meta")
        if isinstance(x, (list, tuple)):
            return type(x)(to_meta(i) for i in x)
        if isinstance(x, dict):
            return {key: to_meta(val) for key, val in x.items()}
        return x

    state = {name: to_meta(t) for name, t in model.named_parameters()}
    state.update({name: to_meta(t) for name, t in model.named_buffers()})
    try:
        with torch.no_grad(), tr:
            torch.func.functional_call(model, state, to_meta(tuple(inputs)), to_meta(kwargs))
    except (NotImplementedError, RuntimeError) as exc:
        raise RuntimeError(f"dry_trace: the model cannot run on meta tensors ({type(exc).__name__}: {exc}); "
                           "pass meta=False for a real forward pass with nothing probed") from exc
    return tr


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
    with Trace(model, segments=segments, backend=backend) as tr:
        tr.pattern_slice = _check_pattern_slice(pattern_slice)
        for direction, entries in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for entry in entries:
                if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                    raise TypeError(f"{direction}_hooks must be a list of (name, fn) pairs")
                tr.add_hook(*entry, dir=direction)
        return model(*inputs, **kwargs)
