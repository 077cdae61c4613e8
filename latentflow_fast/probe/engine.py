"""The probe engine: one clean trajectory, then thousands of probes branched from it as batch rows.

1. `trajectory(clip)` runs the clean sampling once, every attention site going through the probed
   operator (with neutral arguments), and caches the state and velocity of every evaluation, the
   requested captures, and the per-head outputs that patching needs.
2. `sweep(trajectory, probes)` groups probes by the evaluation they branch at and the first layer they
   act at; each group runs as the rows of one batch, every row carrying its own intervention through the
   operator's per-row arguments (head_gate, logit_scale, segment_bias, out_patch/patch_mask, out_bias).
   The local effect is the change of the predicted velocity; with `end_effect=True` the batch is
   integrated on to t=1 (by the one sampler, `sampler.sample_ode`), decoded and compared with the clean
   output and the reference stems.

Work a probe cannot change is skipped, not repeated per row:
- prefix reuse: the clean run records every layer's input (the residual stream) per evaluation, within
  `prefix_cache_bytes`; a batch whose probes all act at layer >= l starts at layer l from that record;
- shared conditioning: the rows of a batch share one prompt and one evaluation, so the time embedding,
  the text memory and the cross-attention keys and values are computed once and broadcast.

Reuse rows (`probes.Reuse`: freezing, layer-selective caching of attention outputs or maps) run as batch
rows like probes: a row branches at the last computed evaluation before its first reuse and carries its
cache through the continued run. Map reductions (`probes.Reduction`) reduce the map of a site at every
evaluation of a clean trajectory, so experiments that need whole-trajectory maps run it once.

Clean and probed runs share one numerical path (the operator is batch invariant), so a probe that changes
nothing has effects that are exactly zero, and results do not depend on how probes were batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from ..models.attention import sdpa
from ..ops import probed_attention
from ..ops.profiling import nvtx_range
from ..fingerprint import weights_digest
from ..numerics import NonFiniteError, check_finite, first_nonfinite_module
from ..sampler import METHODS, evaluation_schedule, sample_ode
from . import distributed
from .batching import BatchSizer, is_out_of_memory
from .invariance import batch_invariant, intra_op_threads, layers_switch_themselves, single_threaded
from .interventions import logit_scale
from .probes import MapRequest, Probe, Reduction, Reuse, expand_sites
from .store import ResultStore


@dataclass
class Clip:
    """One separation to probe: a mono mixture, its prompt and (optionally) the reference stems."""

    clip_id: str
    mixture: torch.Tensor  # [S]
    sample_rate: int
    prompt: str
    target: Optional[torch.Tensor] = None  # [S] reference stem of the prompted source
    residual: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Trajectory:
    """The cached clean run of one clip (batch size 1 everywhere)."""

    clip: Clip
    inputs: object  # SeparationInputs
    steps: int
    method: str
    seed: int
    schedule: list  # [(evaluation, t)]
    states: list  # state at every evaluation, [1, T, 2C]
    velocities: list  # velocity at every evaluation, [1, T, 2C]
    step_starts: list  # state at the start of every step, [1, T, 2C]
    final: torch.Tensor  # [1, T, 2C]
    target: torch.Tensor  # clean decoded target wave [S]
    residual: torch.Tensor
    captures: dict  # site -> capture name -> [E, H, ...] float32 (CPU)
    head_outputs: dict  # site -> [E, H, Nq, hd] (model dtype, model device)
    maps: dict  # (site, evaluation) -> [h, q, Nk] exact attention probabilities
    segments: dict  # site -> list of key-segment boundaries used for captures and segment probes
    wall_seconds: float = 0.0  # the whole call: preparing the inputs, sampling, decoding
    sampling_seconds: float = 0.0  # the sampler loop only
    # evaluation -> [layer input of every layer, each [1, T, D]] (prefix reuse; absent beyond the budget)
    layer_inputs: dict = field(default_factory=dict)
    # sites computed by the probed kernel in this run (those with captures); the others ran torch SDPA
    kernel_sites: frozenset = frozenset()
    # reduction name -> site -> [E, ...] per-evaluation reductions of exact maps (Reduction)
    reductions: dict = field(default_factory=dict)
    # intra-op threads the sampling ran on after its first evaluation (exact mode: > 1 only where a check
    # found them bitwise equal to one thread, see ProbeEngine.trajectory); None: torch's count, not pinned
    threads: Optional[int] = None

    @property
    def num_evaluations(self) -> int:
        return len(self.schedule)


def expand_inputs(inputs, rows: int):
    """A batch-1 SeparationInputs repeated to `rows` rows (the shared inputs of a batch of probes)."""

    def grow(x):
        return None if x is None else x.expand(rows, *x.shape[1:]).contiguous()

    return dataclasses.replace(inputs, mixture=grow(inputs.mixture), text=grow(inputs.text),
                               text_mask=grow(inputs.text_mask), noise=grow(inputs.noise),
                               prompts=list(inputs.prompts) * rows, squeeze=False)


def model_sites(model) -> list[str]:
    """Attention site names of a model with an attention router, in layer order."""
    return [m.site for m in model.modules() if hasattr(m, "site") and hasattr(m, "router")]


def time_bins(num_frames: int, bins: int) -> list[int]:
    """Boundaries of `bins` near-equal contiguous time bins over `num_frames` frames (fewer if short)."""
    bins = max(1, min(bins, num_frames))
    return [round(i * num_frames / bins) for i in range(bins + 1)]


def _same_evaluation(a, b) -> bool:
    """Two clean evaluations (context, recorded layer inputs, velocity) hold the same bits everywhere."""
    (ca, ra, va), (cb, rb, vb) = a, b

    def same(x, y):  # NaN never equals itself: such a run keeps one thread (the safe answer)
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        return x.dtype == y.dtype and torch.equal(x, y)

    if not same(va, vb) or len(ra) != len(rb) or not all(same(x, y) for x, y in zip(ra, rb)):
        return False
    for mine, theirs in ((ca.captured, cb.captured), (ca.head_outputs, cb.head_outputs)):
        if mine.keys() != theirs.keys():
            return False
        for key in mine:
            x, y = mine[key], theirs[key]
            if isinstance(x, dict):  # captures: name -> tensor
                if x.keys() != y.keys() or not all(same(x[n], y[n]) for n in x):
                    return False
            elif not same(x, y):
                return False
    return True


@dataclass
class _Context:
    """What the site handler does during one forward pass."""

    evaluation: int = 0
    rows: Sequence = ()  # Probe (or None) per batch row
    capture: dict = field(default_factory=dict)  # site -> capture names
    cache_heads: frozenset = frozenset()  # sites whose head outputs are recorded
    captured: dict = field(default_factory=dict)  # site -> {name: tensor}
    head_outputs: dict = field(default_factory=dict)  # site -> tensor
    trajectory: Optional[Trajectory] = None  # clean run being probed (None while recording it)
    maps: dict = field(default_factory=dict)  # site -> MapRequest: exact map slices to materialise
    map_results: dict = field(default_factory=dict)  # site -> [h, q, Nk] probabilities (row 0)
    attention_calls: int = 0
    # sites where rows without an intervention also go through the probed kernel (the clean run captured
    # there); elsewhere they run native attention (torch SDPA), the same path as in the clean run
    kernel_sites: frozenset = frozenset()
    # Reuse rows (freezing / caching): (site, "output" | "map") -> [R, H, Nq, hd | Nk] last computed value
    reuse_cache: dict = field(default_factory=dict)
    reused_calls: int = 0  # (site, batch) calls where every row reused: the attention itself was skipped
    reductions: dict = field(default_factory=dict)  # site -> [Reduction]: reduce the exact map of row 0
    reduced: dict = field(default_factory=dict)  # (reduction name, site) -> reduced value of this evaluation


class ProbeEngine:
    """Run probes on a SAM-Audio-architecture model (anything with an `attention_router`).

    backend: operator backend ("auto" picks the fused kernel for the device).
    time_bins: number of time bins = key segments of self-attention sites (captures and segment probes);
        cross-attention segments are the text tokens.
    exact: bitwise batch invariance on CPU (default True): forward passes run on one intra-op thread, so
        a probe's row has the same bits whatever else is in its batch (identity probes give effects of
        exactly 0; sweeps give identical tables however they are batched or sharded). With exact=False
        CPU forwards use all torch threads and such rows may differ in the last bits (~1e-7 relative).
        To use every core in exact mode, use workers. No effect on CUDA.
    workers: sweeps run in this many single-threaded worker processes (CPU models; see `workers.py`):
        exact mode on every core, same table bitwise as workers=1 (in-process). Call `close()` (or use the
        engine as a context manager) to stop them early; they also stop with the process.
    trajectory_threads: intra-op threads of the clean trajectory in exact mode on CPU (default None: torch's
        count when `trajectory` is called). It runs at batch 1, always the same way, so it may use several
        threads when they give one thread's bits: the first trajectory of each configuration compares its
        first evaluation on one thread and on these threads, and falls back to one thread if any bit differs.
        Set 1 where other processes already use the other cores (clip-sharded protocol runs).
    """

    def __init__(self, model, backend: str = "auto", time_bins: int = 16, exact: bool = True,
                 prefix_reuse: bool = True, prefix_cache_bytes: int = 2 << 30, workers: int = 1,
                 trajectory_threads: Optional[int] = None):
        if not hasattr(model, "attention_router"):
            raise TypeError("model must expose an `attention_router` (a SAM-Audio-architecture model); "
                            "for other modules use latentflow_fast.probe.trace")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            from ..ops.backends import unavailable_reason

            device = next(model.parameters()).device.type
            reason = unavailable_reason(backend, device)
            if reason is not None:
                raise ValueError(f"backend: {reason}")
        self.model = model.eval()
        self.backend = backend
        self.time_bins = int(time_bins)
        self.exact = bool(exact)
        self.prefix_reuse = bool(prefix_reuse)
        if isinstance(prefix_cache_bytes, bool) or not isinstance(prefix_cache_bytes, int) or prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be a non-negative int, got {prefix_cache_bytes!r}")
        self.prefix_cache_bytes = prefix_cache_bytes
        from .workers import check_workers

        self.workers = check_workers(workers)
        if trajectory_threads is not None and (isinstance(trajectory_threads, bool)
                                               or not isinstance(trajectory_threads, int) or trajectory_threads < 1):
            raise ValueError(f"trajectory_threads must be None or a positive int, got {trajectory_threads!r}")
        self.trajectory_threads = trajectory_threads
        # (threads, shapes, what the run records) -> bool: does a clean evaluation on that many threads give
        # one thread's bits? Decided once per configuration by ProbeEngine._clean_threads.
        self._thread_verdicts: dict = {}
        if self.workers > 1 and next(model.parameters()).device.type != "cpu":
            raise ValueError(f"workers={workers}: worker processes are for CPU models (on a GPU exact mode keeps "
                             "the device busy in one process); use workers=1")
        self._pool = None
        # the model's layers are batch invariant by themselves: no TorchFunctionMode around every torch call
        self._native_invariance = layers_switch_themselves(model)
        self.sites = model_sites(model)
        self.site_layers = {s: site_layer(s) for s in self.sites}
        self.num_heads = model.config.n_heads
        self.runs: dict = {}  # name -> Trajectory: sources for output patches and swaps
        self.vectors: dict = {}  # name -> [H, hd] steering vectors
        self._ctx = _Context()

    def close(self) -> None:
        """Stop the worker processes, if any were started (a later sweep starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "ProbeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # a worker pool does not travel with the engine
        return {**self.__dict__, "_pool": None}

    # ------------------------------------------------------------------ site handler
    @contextlib.contextmanager
    def _installed(self, ctx: _Context):
        # Scoped by the router (AttentionRouter.install, shared with LSAC): our handlers act only in this
        # thread and only while installed; other threads' calls, and calls after we left, go to the handler
        # we replaced. On exit only sites still holding our handler are put back, so handlers another
        # thread installed meanwhile are left alone.
        self._ctx = ctx
        try:
            with self.model.attention_router.install(handlers={site: self._handle for site in self.sites}):
                yield ctx
        finally:
            self._ctx = _Context()

    def _segments(self, site: str, num_keys: int) -> list[int]:
        if site.endswith("cross_attn"):
            return list(range(num_keys + 1))  # one segment per text token
        return time_bins(num_keys, self.time_bins)

    def _handle(self, site, q, k, v, key_padding_mask):
        ctx = self._ctx
        ctx.attention_calls += 1
        segments = self._segments(site, k.shape[2])
        kwargs, post, kernel_rows = self._row_arguments(site, q, v, segments)
        capture = ctx.capture.get(site, ())
        R = q.shape[0]
        reusing, storing = self._reuse_rows(site)
        with nvtx_range(f"latentflow.site.{site}"):
            try:
                if len(reusing) == R and not capture:
                    # every row answers from its cache: the attention itself is skipped
                    ctx.reused_calls += 1
                    out = q.new_empty(q.shape[:3] + (v.shape[3],))
                    captured = {}
                elif capture or site in ctx.kernel_sites or len(kernel_rows) == R:
                    out, captured = probed_attention(q, k, v, key_padding_mask=key_padding_mask, segments=segments,
                                                     capture=capture, backend=self.backend, **kwargs)
                else:
                    # Rows with nothing to do here run native attention (as in the clean run); only the rows
                    # that intervene go through the probed kernel. Both are batch invariant per row.
                    out, captured = sdpa(q, k, v, key_padding_mask), {}
                    if kernel_rows:
                        idx = torch.tensor(kernel_rows, device=q.device)
                        sub = {name: t.index_select(0, idx) for name, t in kwargs.items()}
                        mask = None if key_padding_mask is None else key_padding_mask.index_select(0, idx)
                        out[idx], _ = probed_attention(q.index_select(0, idx), k.index_select(0, idx),
                                                       v.index_select(0, idx), key_padding_mask=mask,
                                                       segments=segments, backend=self.backend, **sub)
            except NonFiniteError as exc:  # NaN/Inf activations: say where (the operator only sees tensors)
                raise NonFiniteError(f"evaluation {ctx.evaluation}, {site}: {exc}") from None
        if reusing or storing:
            out = self._apply_reuse(site, out, q, k, v, key_padding_mask, reusing, storing)
        if post is not None:
            out = post(out)
        if captured:
            ctx.captured[site] = captured
        if site in ctx.cache_heads:
            ctx.head_outputs[site] = out
        if site in ctx.maps:
            ctx.map_results[site] = self._exact_map(ctx.maps[site], q, k, key_padding_mask, segments)
        if site in ctx.reductions:
            # float32 map of row 0 (what the kernel computes, to float32 rounding), reduced and dropped
            mask = None if key_padding_mask is None else key_padding_mask[:1]
            p = self._attention_map(q[:1], k[:1], mask)[0].cpu()
            for reduction in ctx.reductions[site]:
                ctx.reduced[(reduction.name, site)] = reduction.apply(p, site, ctx.evaluation)
        return out

    # ------------------------------------------------------------------ reuse (freezing / caching)
    def _reuse_rows(self, site):
        """Rows that reuse at this site and evaluation, and rows that must store what they compute now
        (their schedule reuses at the next evaluation): [(row, what)] each."""
        ctx = self._ctx
        reusing, storing = [], []
        for r, p in enumerate(ctx.rows):
            if isinstance(p, Reuse) and p.matches(site):
                if p.reuses(site, ctx.evaluation):
                    reusing.append((r, p.what))
                elif p.reuses(site, ctx.evaluation + 1):
                    storing.append((r, p.what))
        return reusing, storing

    @staticmethod
    def _attention_map(q, k, key_padding_mask) -> torch.Tensor:
        """Attention probabilities [R, H, Nq, Nk] in float32 (materialised for map reuse)."""
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if key_padding_mask is not None:
            logits = logits.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
        return torch.softmax(logits, dim=-1)

    def _apply_reuse(self, site, out, q, k, v, key_padding_mask, reusing, storing):
        ctx = self._ctx
        for r, what in storing:
            key = (site, what)
            if key not in ctx.reuse_cache:
                shape = out.shape if what == "output" else q.shape[:3] + (k.shape[2],)
                ctx.reuse_cache[key] = torch.zeros(shape, dtype=out.dtype if what == "output" else torch.float32,
                                                   device=out.device)
            if what == "output":
                ctx.reuse_cache[key][r] = out[r]
            else:
                mask = None if key_padding_mask is None else key_padding_mask[r:r + 1]
                ctx.reuse_cache[key][r] = self._attention_map(q[r:r + 1], k[r:r + 1], mask)[0]
        if reusing:
            out = out.clone()
            for r, what in reusing:
                cached = ctx.reuse_cache.get((site, what))
                if cached is None:
                    raise RuntimeError(f"{site}: row {r} reuses its {what} at evaluation {ctx.evaluation} "
                                       "but nothing was stored before (the branch started too late)")
                if what == "output":
                    out[r] = cached[r]
                else:  # the cached map applied to the current values
                    out[r] = torch.matmul(cached[r], v[r].float()).to(out.dtype)
        return out

    def _exact_map(self, request: MapRequest, q, k, key_padding_mask, segments) -> torch.Tensor:
        """The slice p[row 0, heads, queries, :] of the attention map, computed by the reference in float64."""
        from ..ops import build_plan, reference_attention

        heads = list(range(q.shape[1])) if request.heads is None else list(request.heads)
        start, stop = (0, q.shape[2]) if request.queries is None else request.queries
        qs = q[:1, heads, start:stop]
        ks = k[:1].repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:, heads]
        mask = None if key_padding_mask is None else key_padding_mask[:1]
        plan = build_plan(qs, ks, ks[..., :1], key_padding_mask=mask, segments=segments)
        # Identity matrix as V turns the output into the attention probabilities themselves.
        eye = torch.eye(ks.shape[2], dtype=ks.dtype, device=ks.device).expand(1, len(heads), -1, -1)
        plan.v = eye
        probs, _ = reference_attention(plan, torch.float64)
        return probs[0].float().cpu()

    def _source_output(self, probe: Probe, site: str, evaluation: int) -> torch.Tensor:
        run = self.runs.get(probe.source)
        if run is None:
            raise KeyError(f"source run {probe.source!r} is not registered (engine.add_run)")
        e = evaluation if probe.source_evaluation is None else probe.source_evaluation + (evaluation - probe.evaluation)
        e = min(e, run.num_evaluations - 1)
        return run.head_outputs[site][e]  # [H, Nq, hd]

    def _row_arguments(self, site, q, v, segments):
        """Per-row operator arguments (and a post-op for component swaps) for the rows active at `site`."""
        ctx = self._ctx
        active = [(r, p) for r, p in enumerate(ctx.rows)
                  if isinstance(p, Probe) and not p.is_identity and p.matches(site) and p.active_at(ctx.evaluation)]
        if not active:
            return {}, None, []
        R, H, Nq = q.shape[0], q.shape[1], q.shape[2]
        Dv = v.shape[3]
        G = len(segments) - 1
        dev = q.device
        kwargs: dict = {}
        swaps = []

        def tensor(name, shape, fill, dtype=torch.float32):
            if name not in kwargs:
                kwargs[name] = torch.full(shape, fill, dtype=dtype, device=dev)
            return kwargs[name]

        kernel_rows = sorted(r for r, p in active if p.intervention not in ("additive_swap", "routing_swap"))
        for r, p in active:
            heads = list(range(H)) if p.heads is None else list(p.heads)
            kind = p.intervention
            if kind == "head_ablation":
                tensor("head_gate", (R, H), 1.0)[r, heads] = p.value
            elif kind in ("temperature", "logit_scale"):  # one meaning each: see interventions.py
                tensor("logit_scale", (R, H), 1.0)[r, heads] = logit_scale(kind, p.value)
            elif kind in ("segment_knockout", "segment_bias"):
                bias = -math.inf if kind == "segment_knockout" else p.value
                seg_bias = tensor("segment_bias", (R, H, G), 0.0)
                for h in heads:
                    seg_bias[r, h, list(p.segments)] = bias
            elif kind in ("mean_ablation", "output_patch"):
                if kind == "mean_ablation":
                    clean = ctx.trajectory.head_outputs[site][ctx.evaluation]
                    patch = clean.mean(dim=1, keepdim=True).expand_as(clean)
                else:
                    patch = self._source_output(p, site, ctx.evaluation)
                tensor("out_patch", (R, H, Nq, Dv), 0.0, dtype=q.dtype)[r, heads] = patch[heads].to(q.dtype)
                tensor("patch_mask", (R, H), False, dtype=torch.bool)[r, heads] = True
            elif kind == "output_bias":
                vector = self.vectors[p.source]
                tensor("out_bias", (R, H, Dv), 0.0)[r, heads] = p.value * vector[heads].to(dev, torch.float32)
            elif kind in ("additive_swap", "routing_swap"):
                swaps.append((r, heads, kind, self._source_output(p, site, ctx.evaluation)))

        post = None
        if swaps:
            def post(out):
                # Swaps as deltas, out + (component_src - component_live): exactly out when src == live.
                out = out.clone()
                for r, heads, kind, src in swaps:
                    live = out[r, heads]
                    src = src[heads].to(out.dtype)
                    live_mean, src_mean = live.mean(dim=1, keepdim=True), src.mean(dim=1, keepdim=True)
                    if kind == "additive_swap":
                        delta = src_mean - live_mean
                    else:
                        delta = (src - src_mean) - (live - live_mean)
                    out[r, heads] = live + delta
                return out
        return kwargs, post, kernel_rows

    # ------------------------------------------------------------------ forward helpers
    def _forward(self, ctx: _Context, inputs, state: torch.Tensor, evaluation: int, t: float,
                 start_layer: int = 0, hidden: Optional[torch.Tensor] = None,
                 layer_inputs: Optional[list] = None, threads: Optional[int] = None) -> torch.Tensor:
        """One evaluation of the rows of `state`; `inputs` (batch 1) are shared by every row.
        `threads`: intra-op threads (CPU); default one in exact mode, torch's count otherwise."""
        ctx.evaluation = evaluation
        if threads is not None and state.device.type == "cpu":
            threads = intra_op_threads(threads)
        elif self.exact and state.device.type == "cpu":
            threads = single_threaded()
        else:
            threads = contextlib.nullcontext()
        with self._installed(ctx), batch_invariant(self._native_invariance), threads, nvtx_range(f"latentflow.evaluation.{evaluation}"):
            time_ = torch.full((1,), t, dtype=torch.float32, device=state.device)
            return self.model(state, time_, inputs.mixture, inputs.text, inputs.text_mask,
                              start_layer=start_layer, hidden=hidden, layer_inputs=layer_inputs)

    def first_layer(self, probes: Sequence[Probe]) -> int:
        """The first layer any of `probes` acts at: the layers before it are the same as in the clean run."""
        layers = [self.site_layers[s] for p in probes if not p.is_identity for s in self.sites
                  if p.matches(s)]
        layers = [layer for layer in layers if layer is not None]
        return min(layers, default=len(self.model.transformer.layers) - 1)

    # ------------------------------------------------------------------ clean trajectory
    @torch.no_grad()
    def trajectory(self, clip: Clip, steps: int = 16, method: str = "midpoint", seed: int = 0,
                   capture: Sequence[str] = (), capture_sites="*", cache_heads="*",
                   maps: Sequence[MapRequest] = (), prompt: Optional[str] = None,
                   name: Optional[str] = None, reductions: Sequence[Reduction] = ()) -> Trajectory:
        """Run and cache the clean trajectory of `clip` (with `prompt` overriding the clip's prompt).

        capture: capture names recorded at `capture_sites` (glob patterns) at every evaluation.
        cache_heads: sites (patterns) whose per-head outputs are cached (needed by patching / mean ablation).
        maps: exact attention-map slices to materialise. `name` registers the run as a patch source.
        reductions: per-evaluation reductions of exact maps (`Reduction`): at every evaluation the map of
            each matching site is materialised, reduced by the callback and dropped; the results are in
            `Trajectory.reductions[name][site]`, stacked over evaluations.
        """
        started = time.perf_counter()
        model = self.model
        inputs = model.prepare(clip.mixture, clip.sample_rate, prompt or clip.prompt, seed=seed)
        schedule = evaluation_schedule(steps, method)
        capture_at = expand_sites(capture_sites, self.sites) if capture else []
        heads_at = frozenset(expand_sites(cache_heads, self.sites)) if cache_heads else frozenset()
        captures: dict = {s: {n: [] for n in capture} for s in capture_at}
        head_outputs: dict = {s: [] for s in heads_at}
        states, velocities = [], []
        map_results: dict = {}
        layer_cache: dict = {}
        reduce_at = {s: [r for r in reductions if r.matches(s)] for s in self.sites}
        reduce_at = {s: rs for s, rs in reduce_at.items() if rs}
        reduced: dict = {(r.name, s): [] for s, rs in reduce_at.items() for r in rs}
        cache_left = self.prefix_cache_bytes if self.prefix_reuse else 0
        # threads: None = the engine's default (one in exact mode); an int once the check has run
        threads, verdict_key = self._clean_threads(inputs, capture, capture_at, heads_at, maps, reduce_at)

        def run(state, t, evaluation, threads):
            ctx = _Context(rows=[None], capture={s: tuple(capture) for s in capture_at}, cache_heads=heads_at,
                           kernel_sites=frozenset(capture_at))
            ctx.maps = {m.site: m for m in maps if m.evaluations is None or evaluation in m.evaluations}
            ctx.reductions = reduce_at
            recorded: list = []
            try:
                v = self._forward(ctx, inputs, state, evaluation, t, layer_inputs=recorded, threads=threads)
            except NonFiniteError as exc:
                raise NonFiniteError(f"clean run of clip {clip.clip_id!r}: {exc}") from None
            check_finite(v, f"clean velocity of clip {clip.clip_id!r} at evaluation {evaluation} (t={t:.4f})",
                         where=lambda: first_nonfinite_module(model, lambda: self._forward(
                             _Context(rows=[None]), inputs, state, evaluation, t)))
            return ctx, recorded, v

        def evaluate(state, t, evaluation):
            nonlocal cache_left, threads
            if verdict_key is not None and verdict_key not in self._thread_verdicts:
                # First run of this configuration: the evaluation on one thread is the result; the same
                # evaluation on `threads` threads decides whether the rest of the run (and later runs) may
                # use them. Which path each op takes (kernel choice, how a tensor is split between threads)
                # depends on shapes and the thread count only, the same at every evaluation.
                ctx, recorded, v = run(state, t, evaluation, 1)
                same = _same_evaluation((ctx, recorded, v), run(state, t, evaluation, verdict_key[0]))
                self._thread_verdicts[verdict_key] = same
                threads = verdict_key[0] if same else None
            else:
                ctx, recorded, v = run(state, t, evaluation, threads)
            size = sum(x.numel() * x.element_size() for x in recorded)
            if recorded and size <= cache_left:
                layer_cache[evaluation] = recorded
                cache_left -= size
            states.append(state.clone())
            velocities.append(v.clone())
            for s in capture_at:
                for n in capture:
                    captures[s][n].append(ctx.captured[s][n][0].cpu())
            for s in heads_at:
                head_outputs[s].append(ctx.head_outputs[s][0])
            for s, p in ctx.map_results.items():
                map_results[(s, evaluation)] = p
            for key, value in ctx.reduced.items():
                reduced[key].append(torch.as_tensor(value))
            return v

        x = sample_ode(evaluate, inputs.noise, steps=steps, method=method).final
        sampling_seconds = time.perf_counter() - started
        per_step = METHODS[method]
        step_starts = [states[k * per_step] for k in range(steps)] + [x.clone()]
        target, residual = model.decode(x, inputs)
        traj = Trajectory(
            clip=clip, inputs=inputs, steps=steps, method=method, seed=seed, schedule=schedule,
            states=states, velocities=velocities, step_starts=step_starts, final=x,
            target=target.reshape(-1), residual=residual.reshape(-1),
            captures={s: {n: torch.stack(ts) for n, ts in d.items()} for s, d in captures.items()},
            head_outputs={s: torch.stack(ts) for s, ts in head_outputs.items()},
            maps=map_results,
            segments={s: self._segments(s, inputs.text.shape[1] if s.endswith("cross_attn") else x.shape[1])
                      for s in self.sites},
            wall_seconds=time.perf_counter() - started,
            sampling_seconds=sampling_seconds,
            layer_inputs=layer_cache,
            kernel_sites=frozenset(capture_at),
            threads=threads if threads is not None else (1 if self.exact and x.device.type == "cpu" else None),
        )
        for (rname, s), values in reduced.items():
            traj.reductions.setdefault(rname, {})[s] = torch.stack(values)
        if name is not None:
            self.runs[name] = traj
        return traj

    def _clean_threads(self, inputs, capture, capture_at, heads_at, maps, reduce_at):
        """-> (threads for the clean run, or None for the default; the key of a thread check still to run, or
        None). Only exact mode on CPU pins one thread, so only there can more threads be worth a check.
        Runs with map requests or reductions keep the default: the check would call the reduction callbacks
        twice, and materialising maps dominates their cost anyway."""
        threads = self.trajectory_threads or torch.get_num_threads()
        if not self.exact or inputs.noise.device.type != "cpu" or threads == 1 or maps or reduce_at:
            return None, None
        key = (threads, tuple(inputs.noise.shape), tuple(inputs.text.shape), str(inputs.noise.dtype),
               tuple(capture), tuple(sorted(capture_at)), tuple(sorted(heads_at)))
        verdict = self._thread_verdicts.get(key)
        if verdict is None:
            return None, key
        return (threads if verdict else None), None

    def add_vector(self, name: str, vector) -> None:
        """Register a steering vector for `output_bias` probes (`Probe.source` = `name`): one [hd] vector
        for every head, or [H, hd] with one per head. A probe adds `value * vector[head]` to the head's
        output at every query."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        vector = torch.as_tensor(vector, dtype=torch.float32)
        hd = self.model.config.head_dim
        if vector.shape == (hd,):
            vector = vector.expand(self.num_heads, hd)
        if vector.shape != (self.num_heads, hd):
            raise ValueError(f"vector must be [{hd}] or [{self.num_heads}, {hd}] (heads, head dim), "
                             f"got {tuple(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise ValueError(f"vector {name!r} holds NaN or Inf")
        self.vectors[name] = vector.clone()

    def add_run(self, name: str, trajectory: Trajectory) -> None:
        """Register a trajectory as a patch source (`Probe.source`)."""
        self.runs[name] = trajectory

    # ------------------------------------------------------------------ sweeps
    def branch_evaluation(self, probe, traj: Trajectory) -> int:
        """The clean-trajectory evaluation a row branches at: a Probe's `evaluation`; for a Reuse, the last
        computed evaluation before its first reuse (what it stores there is what it reuses), or the last
        evaluation when the schedule changes nothing in this run (an identity row)."""
        if isinstance(probe, Reuse):
            first = probe.first_reuse(traj.num_evaluations)
            return traj.num_evaluations - 1 if first is None else first - 1
        return probe.evaluation

    def _check_probe(self, probe: Probe, traj: Trajectory) -> None:
        if isinstance(probe, Reuse):
            unknown = [s for s in probe.sites if s not in self.sites]
            if unknown:
                raise ValueError(f"reuse {probe.probe_id}: unknown sites {unknown}; sites look like {self.sites[:2]}")
            return
        where = f"probe {probe.probe_id} ({probe.intervention} at {probe.site})"
        sites = [s for s in self.sites if probe.matches(s)]
        if not sites:
            raise ValueError(f"{where}: unknown site {probe.site!r}; sites look like {self.sites[:2]}")
        if probe.evaluation >= traj.num_evaluations:
            raise ValueError(f"{where}: evaluation {probe.evaluation} >= {traj.num_evaluations}")
        if probe.heads is not None and max(probe.heads) >= self.num_heads:
            raise ValueError(f"{where}: head {max(probe.heads)} >= {self.num_heads} heads")
        if probe.intervention == "output_bias" and probe.source not in self.vectors:
            raise ValueError(f"{where}: steering vector {probe.source!r} not registered")
        run = None
        if probe.intervention in ("output_patch", "additive_swap", "routing_swap"):
            run = self.runs.get(probe.source)
            if run is None:
                raise ValueError(f"{where}: source run {probe.source!r} not registered")
        for site in sites:
            if probe.segments is not None:
                G = len(traj.segments[site]) - 1
                if max(probe.segments) >= G or min(probe.segments) < 0:
                    raise ValueError(f"{where}: segments {probe.segments} out of range 0..{G - 1} at {site}")
            if run is not None and site not in run.head_outputs:
                raise ValueError(f"{where}: source run {probe.source!r} did not cache {site}")
            if probe.intervention == "mean_ablation" and site not in traj.head_outputs:
                raise ValueError(f"{where}: the clean run did not cache head outputs of {site}")

    def fingerprint(self, traj: Trajectory, probes: Sequence[Probe], end_effect: bool) -> dict:
        """What must agree between ranks (and between a sweep and the one it resumes)."""
        import hashlib

        ids = sorted(p.probe_id for p in probes)
        return {
            "model": weights_digest(self.model),  # full sha256 of the weights (cached on the model)
            "clip": traj.clip.clip_id,
            "mixture": hashlib.sha1(traj.inputs.mixture.detach().cpu().numpy().tobytes()).hexdigest()[:16],
            "prompt": traj.inputs.prompts[0],
            "sampler": [traj.steps, traj.method, traj.seed],
            "probes": hashlib.sha1("".join(ids).encode()).hexdigest()[:16],
            "end_effect": bool(end_effect),
            "backend": self.backend,
            "time_bins": self.time_bins,
            "exact": self.exact,
        }

    @torch.no_grad()
    def run_batch(self, traj: Trajectory, evaluation: int, probes: Sequence[Probe],
                  end_effect: bool = False, end_metrics: Optional[Callable] = None,
                  timing: bool = False) -> list[dict]:
        """Run probes branching at `evaluation` as the rows of one batch; one result dict per probe.
        With `timing` (and end_effect) each row gets `batch_sampling_seconds`: the batch's sampling time
        from the branch to t=1, decoding excluded (a measurement: it makes rows differ between runs)."""
        R = len(probes)
        inputs = traj.inputs  # batch 1: shared by every row
        state = traj.states[evaluation].expand(R, *traj.states[evaluation].shape[1:]).contiguous()
        t = traj.schedule[evaluation][1]
        ctx = _Context(rows=list(probes), trajectory=traj, kernel_sites=traj.kernel_sites)
        start, hidden = 0, None
        cached = traj.layer_inputs.get(evaluation) if self.prefix_reuse else None
        if cached is not None:
            start = self.first_layer(probes)
            if start > 0:
                hidden = cached[start].expand(R, *cached[start].shape[1:]).contiguous()
        started = time.perf_counter()
        with nvtx_range(f"latentflow.probe_batch.e{evaluation}.l{start}.r{R}"):
            v = self._forward(ctx, inputs, state, evaluation, t, start_layer=start, hidden=hidden)
        if not bool(torch.isfinite(v).all()):
            bad = [p.probe_id for r, p in enumerate(probes) if not bool(torch.isfinite(v[r]).all())]
            where = first_nonfinite_module(self.model, lambda: self._forward(
                _Context(rows=list(probes), trajectory=traj, kernel_sites=traj.kernel_sites), inputs,
                state, evaluation, t))
            raise NonFiniteError(
                f"clip {traj.clip.clip_id!r}, evaluation {evaluation}: probe(s) {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''} gave non-finite velocities"
                + (f" (first at {where})" if where else ""))
        clean_v = traj.velocities[evaluation]
        diff = (v - clean_v).float()
        clean_norm = clean_v.float().norm()
        local = (diff.flatten(1).norm(dim=1) / clean_norm).cpu()
        frame = (diff.norm(dim=2) / clean_v.float().norm(dim=2).clamp_min(1e-12)).cpu()  # [R, T]
        rows = []
        for r, p in enumerate(probes):
            row = {"clip_id": traj.clip.clip_id, **p.describe(), "t": t,
                   "local_effect": float(local[r]), "local_effect_frames": frame[r].tolist()}
            rows.append(row)
        if end_effect:
            final = self._continue(traj, evaluation, probes, v, ctx)
            seconds = time.perf_counter() - started  # the batch's sampling, from the branch to t=1 (no decoding)
            for row in rows:  # calls (site, evaluation) of this batch whose attention was skipped entirely
                row["batch_attention_calls_skipped"] = ctx.reused_calls
                if timing:
                    row["batch_sampling_seconds"] = seconds
            rows = self._end_metrics(traj, final, expand_inputs(traj.inputs, R), rows, end_metrics)
        return rows

    def _continue(self, traj, evaluation, probes, v, ctx: Optional[_Context] = None):
        """Integrate the branched rows from `evaluation` (velocity `v`) to t=1 with the one sampler.
        `ctx` is the branch evaluation's context: what Reuse rows stored there carries on."""
        step = evaluation // METHODS[traj.method]
        x = traj.step_starts[step].expand(len(probes), *traj.step_starts[step].shape[1:])
        if ctx is None:
            ctx = _Context(rows=list(probes), trajectory=traj, kernel_sites=traj.kernel_sites)

        def velocity(state, t, e):
            return self._forward(ctx, traj.inputs, state, e, t)

        final = sample_ode(velocity, x, steps=traj.steps, method=traj.method, start_evaluation=evaluation,
                           velocity=v).final
        return check_finite(final, f"final latent of probes branching at evaluation {evaluation}")

    def _end_metrics(self, traj, final, inputs, rows, end_metrics):
        from .. import metrics

        target, residual = self.model.decode(final, inputs)  # [R, S]
        clean_target = traj.target[None]
        latent_change = ((final - traj.final).flatten(1).norm(dim=1) / traj.final.norm()).cpu()
        mrstft = metrics.multi_resolution_stft_distance(target, clean_target.expand_as(target))
        logmel = metrics.log_mel_distance(target, clean_target.expand_as(target), sample_rate=traj.inputs.sample_rate)
        ref = traj.clip.target
        if ref is not None:
            ref = torch.as_tensor(ref, dtype=torch.float32).reshape(1, -1)
            clean_sdr = metrics.si_sdr(clean_target, ref)[0]
            delta_sdr = metrics.si_sdr(target, ref.expand_as(target)) - clean_sdr
        for r, row in enumerate(rows):
            row["end_latent_change"] = float(latent_change[r])
            row["end_mrstft_to_clean"] = float(mrstft[r])
            row["end_logmel_to_clean"] = float(logmel[r])
            if ref is not None:
                row["end_delta_si_sdr"] = float(delta_sdr[r])
        if end_metrics is not None:
            extra = end_metrics(target, residual, traj)
            for row, values in zip(rows, extra):
                row.update(values)
        return rows

    def sweep(self, traj: Trajectory, probes: Sequence[Probe], *, end_effect: bool = False,
              store: Optional[ResultStore] = None, batch_size: Optional[int] = None,
              memory_budget: Optional[int] = None, progress: bool = True,
              end_metrics: Optional[Callable] = None, shard: Optional[tuple] = None,
              timing: bool = False) -> pd.DataFrame:
        """Run `probes` against the clean trajectory `traj`.

        Results go to `store` (Parquet shards, resumable) if given, one batch at a time; already stored
        (clip, probe) pairs are skipped. `shard=(rank, world)` keeps only this rank's share of the probes
        (a deterministic function of clip and probe ids); under an initialised torch.distributed process
        group it defaults to the group's rank and size, the ranks check that they run the same
        configuration, and every rank returns the merged table (read from the shared store).
        `probes` may mix `Probe` and `Reuse` rows (Reuse needs end_effect=True). `timing=True` adds the
        measured `batch_sampling_seconds` of each batch to its rows.
        Returns the results of this call's probes.
        With `workers` > 1 (and no shard / torch.distributed), the probes run in the engine's worker
        processes (see `workers.py`); the result is the same.
        """
        from tqdm.auto import tqdm

        if self.workers > 1 and shard is None and distributed.current() is None:
            from .workers import pooled_sweep

            return pooled_sweep(self, traj, probes, end_effect=end_effect, store=store, batch_size=batch_size,
                                memory_budget=memory_budget, progress=progress, end_metrics=end_metrics)

        unique = list({p.probe_id: p for p in probes}.values())
        for p in unique:
            self._check_probe(p, traj)
        if not end_effect and any(isinstance(p, Reuse) for p in unique):
            raise ValueError("end_effect: Reuse rows act after their branch evaluation; run them with end_effect=True")
        info = distributed.current()
        if shard is None:
            shard = (0, 1) if info is None else (info.rank, info.world_size)
        rank, world = shard
        if info is not None and info.world_size > 1:
            if store is None:
                raise ValueError("store: a distributed sweep needs a ResultStore on a filesystem all ranks see")
            distributed.check_consistent(self.fingerprint(traj, unique, end_effect))
        clip_id = traj.clip.clip_id
        mine = [p for p in unique if shard_of(clip_id, p.probe_id, world) == rank]
        done = store.done_keys() if store is not None else set()
        todo = [p for p in mine if (clip_id, p.probe_id) not in done]
        sizer = BatchSizer(self.model, traj, batch_size=batch_size, memory_budget=memory_budget,
                           end_effect=end_effect)
        # one group per (branch evaluation, first layer acted at): a batch starts at its group's layer
        by_evaluation: dict = {}
        for p in todo:
            by_evaluation.setdefault((self.branch_evaluation(p, traj), self.first_layer([p])), []).append(p)
        results = []
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="probe", disable=not progress,
                   desc=f"probes {clip_id}", dynamic_ncols=True)
        try:
            for evaluation in sorted(by_evaluation):
                pending = by_evaluation[evaluation]
                while pending:
                    size = sizer.size()
                    batch = pending[:size]
                    try:
                        rows = self.run_batch(traj, evaluation[0], batch, end_effect, end_metrics, timing)
                    except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                        if not is_out_of_memory(exc) or size == 1:
                            raise
                        sizer.halve()
                        continue
                    sizer.observe(len(batch))
                    if store is not None:
                        store.write_shard(rows)
                    results.extend(rows)
                    pending = pending[len(batch):]
                    bar.update(len(batch))
        finally:
            bar.close()
        if info is not None:
            distributed.barrier()  # every rank's shards are written before anyone reads the merged table
        if store is not None:
            stored = store.load()
            ids = {p.probe_id for p in mine}
            return stored[(stored["clip_id"] == clip_id) & stored["probe_id"].isin(ids)].reset_index(drop=True)
        return pd.DataFrame(results)


def site_layer(site: str) -> Optional[int]:
    """The layer index of a site name "layers.{i}.<kind>" (None for other names)."""
    parts = site.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def shard_of(clip_id: str, probe_id: str, world: int) -> int:
    """The rank that owns a (clip, probe) pair: a stable hash, independent of probe order."""
    import hashlib

    digest = hashlib.sha1(f"{clip_id}/{probe_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % max(1, world)
