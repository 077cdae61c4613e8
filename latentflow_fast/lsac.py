"""Layer-Selective Attention Caching (LSAC) and attention-output freezing for the sampler.

LSAC (the paper's speed-up, docs/design.md, section 6, P6): the self-attention of the *stable* layers (whose
attention converges early in the sampling trajectory) is recomputed only every `refresh` network
evaluations; in between, the layer reuses its last computed self-attention output. The first evaluation
always computes. Everything else (FFN, cross-attention, the other layers) runs as usual, and the cached
output is still scaled by the current evaluation's adaLN gate.

    model.separate(audio, 16000, "sine tone", steps=16, method="midpoint",
                   lsac=LSACConfig(layers=(0, 1), refresh=2))

What is cached, and what a cached evaluation skips: the output of the whole self-attention module
(`layers.{l}.attention`, i.e. after `wo`) is stored per layer. A cached evaluation returns it without
running the module at all, so it skips the q/k/v projections, the q/k RMSNorm and RoPE, the attention
itself (no attention-level router handler is called) and the output projection `wo`. Since `wo` is linear
and deterministic, returning the stored post-`wo` output is bitwise what `wo(cached head outputs)` would give.

How: through the attention router's module-level entry (models/attention.py). Each attention module asks
`router.module_output(site, compute)` for its output; the cache installs a module handler at every
`layers.{l}.self_attn` site that either returns the stored output or calls `compute()` and stores it. The
installation is scoped like the probe engine's (same `AttentionRouter.install`): only the entering thread,
only while entered, and on exit each site gets back the handler it had. No `forward` is replaced.

Counting: every self-attention call of every layer is counted as computed or skipped. Per layer in the
cached set S, with E evaluations, ceil(E / N) evaluations compute (0, N, 2N, ...); the fraction of all
self-attention calls saved is |S| * (E - ceil(E / N)) / (L * E), which equals the paper's
|S| / L * (1 - 1 / N) whenever N divides E (`expected_saved_fraction` gives both).

This is the user-facing sampler option. The protocol's experiments (P4 freezing, P6 LSAC frontier) run
freezing and caching through the probe engine instead (`latentflow_fast.probe.Reuse`), which also caches
attention maps and branches from a clean trajectory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampler import SampleResult, num_evaluations, sample_ode

# reuse(layer, evaluation) -> True to answer the layer's self-attention from the cache
ReusePolicy = Callable[[int, int], bool]


@dataclass(frozen=True)
class LSACConfig:
    """Which layers cache their self-attention, and every how many evaluations they recompute it."""

    layers: tuple = ()
    refresh: int = 2

    def __post_init__(self):
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of layer indices, got {self.layers!r}")
        layers = tuple(self.layers)
        if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
            raise ValueError(f"layers must hold non-negative ints, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat, got {layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh must be a positive int, got {self.refresh!r}")

    def check(self, n_layers: int) -> None:
        bad = [l for l in self.layers if l >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n_layers} layers")


def expected_saved_fraction(n_layers: int, evaluations: int, config: LSACConfig) -> dict:
    """Self-attention calls saved, as a fraction of all L * E calls: exact count and the paper's formula."""
    S, N, E, L = len(config.layers), config.refresh, evaluations, n_layers
    computed_per_layer = math.ceil(E / N)
    return {
        "exact": S * (E - computed_per_layer) / (L * E),
        "paper": S / L * (1 - 1 / N),
        "self_attention_calls": L * E - S * (E - computed_per_layer),
    }


@dataclass
class CacheStats:
    """Self-attention calls per layer: computed and skipped (one call = one layer at one evaluation)."""

    computed: dict = field(default_factory=dict)  # layer -> calls computed
    skipped: dict = field(default_factory=dict)  # layer -> calls answered from the cache
    wall_seconds: float = 0.0  # sampling time (the ODE integration only)

    @property
    def total_computed(self) -> int:
        return sum(self.computed.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def saved_fraction(self) -> float:
        total = self.total_computed + self.total_skipped
        return self.total_skipped / total if total else 0.0

    def as_dict(self) -> dict:
        return {"self_attention_computed": self.total_computed, "self_attention_skipped": self.total_skipped,
                "saved_fraction": self.saved_fraction, "wall_seconds": self.wall_seconds,
                "computed_per_layer": dict(self.computed), "skipped_per_layer": dict(self.skipped)}


def lsac_policy(config: LSACConfig) -> ReusePolicy:
    """Reuse in the cached layers at every evaluation that is not a multiple of `refresh`."""
    cached = frozenset(config.layers)
    return lambda layer, evaluation: layer in cached and evaluation % config.refresh != 0


class SelfAttentionCache:
    """Context manager: answers every layer's self-attention module through a cache with a reuse policy.

    Inside the context, set `evaluation` before each network evaluation (or use `velocity_fn`).

    Mechanism: a module-level handler of the attention router (`AttentionRouter.install(module_handlers=...)`
    at the sites `layers.{l}.self_attn`), the same router and the same scoping as the probe engine's
    handlers: the cache acts only on forward passes made in the thread that entered it and only while it
    is entered; another thread's forward of the same model runs as if it were not there. On exit each site
    gets back the handler it had (unless another installation took it meanwhile). Caches nest: the
    innermost active one of the calling thread answers. Attention-level handlers (a probe engine, an
    Interceptor) still see every call the cache computes, and none of those it skips.
    """

    def __init__(self, model, policy: ReusePolicy):
        layers = getattr(getattr(model, "transformer", None), "layers", None)
        if layers is None:
            raise TypeError("model must be a SAM-Audio-architecture model (model.transformer.layers)")
        if not callable(policy):
            raise TypeError("policy must be callable: policy(layer, evaluation) -> bool")
        modules = [block.attention for block in layers]
        self.router = modules[0].router if modules else None
        if any(getattr(m, "router", None) is not self.router or not isinstance(getattr(m, "site", None), str)
               for m in modules) or not hasattr(self.router, "install"):
            raise TypeError("model must be a SAM-Audio-architecture model whose self-attention modules share "
                            "one attention router (latentflow_fast.models)")
        self.sites = [m.site for m in modules]  # layer l's self-attention module: layers.{l}.self_attn
        self.policy = policy
        self.evaluation = 0
        self.cache: dict = {}  # layer -> last output [B, T, D]
        self.stats = CacheStats({l: 0 for l in range(len(modules))}, {l: 0 for l in range(len(modules))})
        self._installation = None

    def _handler(self, layer: int):
        def handle(site, compute):
            reuse = bool(self.policy(layer, self.evaluation))
            cached = self.cache.get(layer)
            if reuse and cached is None:
                raise RuntimeError(f"layer {layer}: reuse requested at evaluation {self.evaluation} "
                                   "but nothing was computed before")
            if reuse:  # the module does not run: no projections, no attention, no `wo`
                self.stats.skipped[layer] += 1
                return cached
            self.stats.computed[layer] += 1
            out = self.cache[layer] = compute()
            return out

        return handle

    def __enter__(self):
        if self._installation is not None:
            raise RuntimeError("this SelfAttentionCache is already entered; create a new one to nest")
        self._installation = self.router.install(
            module_handlers={site: self._handler(layer) for layer, site in enumerate(self.sites)})
        return self

    def __exit__(self, *exc):
        installation, self._installation = self._installation, None
        if installation is not None:
            installation.remove()
        return False

    def velocity_fn(self, fn: Callable) -> Callable:
        """Wrap a sampler velocity function so that the cache knows the evaluation index."""

        def wrapped(state, t, evaluation):
            self.evaluation = evaluation
            return fn(state, t, evaluation)

        return wrapped


@torch.no_grad()
def sample_with_cache(model, inputs, policy: ReusePolicy, steps: int = 16, method: str = "midpoint",
                      record: bool = False) -> tuple[SampleResult, CacheStats]:
    """Sample one prepared separation (model.prepare) with the self-attention cache policy installed."""
    num_evaluations(steps, method)  # validates steps / method
    with SelfAttentionCache(model, policy) as cache:
        started = time.perf_counter()
        result = sample_ode(cache.velocity_fn(model.velocity_fn(inputs)), inputs.noise, steps=steps,
                            method=method, record=record)
        cache.stats.wall_seconds = time.perf_counter() - started
    return result, cache.stats


def sample_with_lsac(model, inputs, config: LSACConfig, steps: int = 16, method: str = "midpoint",
                     record: bool = False) -> tuple[SampleResult, CacheStats]:
    """LSAC sampling (what `SAMAudio.separate(..., lsac=config)` runs)."""
    if not isinstance(config, LSACConfig):
        raise TypeError(f"lsac must be an LSACConfig, got {type(config).__name__}")
    config.check(model.config.n_layers)
    return sample_with_cache(model, inputs, lsac_policy(config), steps=steps, method=method, record=record)


__all__ = [
    "CacheStats", "LSACConfig", "SelfAttentionCache", "expected_saved_fraction",
    "lsac_policy", "sample_with_cache", "sample_with_lsac",
]
