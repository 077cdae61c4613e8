"""Interception of attention calls in arbitrary modules, without code changes.

An `Interceptor` routes every attention call of a model to one `SiteHandler`, naming each call by a *site*:

- models with an `attention_router` (SAM Audio, `latentflow_fast.models`): a handler is installed on every
  router site, and the router's own names are used ("layers.3.self_attn", "layers.3.cross_attn");
- `nn.MultiheadAttention` modules: their `forward` is swapped, while the interceptor is active, for a faithful
  re-implementation that sends the core attention to the handler; site = the module's path
  ("encoder.layers.0.self_attn");
- everything else that calls `torch.nn.functional.scaled_dot_product_attention`: while active, that attribute
  of `torch.nn.functional` is a (thread-checked) wrapper, so only SDPA calls pay anything -- Hugging Face, timm,
  diffusers and torch.nn code look the function up there at call time. Code that bound the function at import
  (`from torch.nn.functional import scaled_dot_product_attention`) needs `intercept_sdpa="mode"`: a
  `TorchFunctionMode` that sees every torch call (~1-4 us each, the cost of a catch-all). Either way the
  site is the innermost module of the model whose method is on the Python stack at the call (found by walking
  the frames, only at SDPA calls); site = the calling module's path, with
  "#1", "#2", ... for the second, third, ... call inside one forward of that module. A call made directly in
  the root module's forward is named "root". (The count restarts at each forward of that module: while the
  interceptor is active, the modules that called SDPA, and they only, get their `forward` wrapped.)

The handler says per site whether it wants the call (`wants(site)`); a call nobody wants runs the original
code (plain SDPA / the native MultiheadAttention forward), so an unprobed site costs a dict lookup and a
frame walk. No per-module hooks: a traced forward of a model whose sites are unprobed runs at the untraced
speed (router models need no SDPA interception at all).
While active on a model with MultiheadAttention modules, `torch.backends.mha` fast paths are switched off
(restored on exit), so `nn.TransformerEncoderLayer`'s fused eval path reaches the swapped `self_attn`.

Argument conversion (SDPA -> operator): q/k/v [*batch, H, N, D] (leading dims flattened into B); a bool
`attn_mask`, or a float one holding only 0 / -inf, that is constant over heads and queries becomes the
operator's `key_padding_mask` [B, Nk]; `scale` and `enable_gqa` are honoured. `is_causal=True` becomes
`AttentionCall.causal` (the operator's `causal`, top-left aligned like SDPA). Any other mask (masks that vary
over queries or heads, additive float biases; MultiheadAttention's `attn_mask`) is carried as
`AttentionCall.attn_bias`, which the operator takes as its `attn_mask`: every case runs fused.
`dropout_p > 0` and q/k/v of rank 3 at a *probed* site raise `UnsupportedAttentionError`; at unprobed
sites everything runs unchanged.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..models.attention import live

_SDPA = torch._C._nn.scaled_dot_product_attention
_HAS_SELF: dict = {}  # code object -> whether it has a local named self (bounded: cleared past 4096 entries)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
ROOT_SITE = "root"


class UnsupportedAttentionError(ValueError):
    """A probed attention call uses a feature the probed operator cannot reproduce exactly."""


@dataclass
class AttentionCall:
    """One attention call, in the operator's conventions.

    q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (head h reads kv head h // (H // Hkv));
    key_padding_mask bool [B, Nk], True = attend; scale None = 1/sqrt(D). `need_weights`: the caller (an
    `nn.MultiheadAttention` asked for `need_weights=True`) also needs the probabilities [B, H, Nq, Nk].
    attn_bias: any other mask, as a float additive bias (-inf = blocked) of 4 dims broadcastable to
    [B, H, Nq, Nk] (per-query masks, additive position biases); None for the common case.
    causal: SDPA's is_causal (query i sees keys j <= i), on top of the masks above.
    """

    site: str
    q: Tensor
    k: Tensor
    v: Tensor
    key_padding_mask: Optional[Tensor] = None
    scale: Optional[float] = None
    need_weights: bool = False
    attn_bias: Optional[Tensor] = None
    causal: bool = False


class SiteHandler(Protocol):
    def wants(self, site: str) -> bool:
        """Whether calls at `site` go to `attend` (False: the original code runs)."""

    def attend(self, call: AttentionCall) -> tuple[Tensor, Optional[Tensor]]:
        """-> (out [B, H, Nq, Dv] in q's dtype, probabilities [B, H, Nq, Nk] if call.need_weights else None)."""

    # Optional: `output_transform(site)` -> None, or a function f(out [B, H, Nq, Dv]) -> out. Where it returns a
    # function, the interceptor runs the model's own attention (SDPA / the router's plain path) and applies f to
    # its output instead of building an AttentionCall: interventions that only act on the head outputs (a head
    # ablation is SDPA with the head's rows zeroed) need no probed kernel. The output handed to f is fresh (no
    # other handler or trace has seen it), so f may edit it in place. nn.MultiheadAttention sites always go
    # through `attend` (the native forward does not expose the per-head outputs).


def _output_transform(handler, site: str):
    transform = getattr(handler, "output_transform", None)
    return None if transform is None else transform(site)


# ---------------------------------------------------------------------------------------------- masks
def _bias_from_mask(mask: Tensor, blocked_is_true: bool) -> Tensor:
    """A bool mask -> float32 additive bias (0 / -inf); a float mask is already additive."""
    if mask.dtype == torch.bool:
        blocked = mask if blocked_is_true else ~mask
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(blocked, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask


def _sdpa_mask(site: str, mask: Tensor, batch_shape: tuple, nk: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """An SDPA attn_mask -> (key_padding_mask bool [B, Nk], None) when it only depends on (batch, key) and
    blocks with -inf; otherwise (None, additive bias broadcastable to [B, H, Nq, Nk])."""
    full_rank = len(batch_shape) + 3
    if mask.dim() > full_rank:
        raise ValueError(f"site {site!r}: attn_mask has more dims than the query")
    m = mask.reshape((1,) * (full_rank - mask.dim()) + tuple(mask.shape))
    if m.shape[-3] == 1 and m.shape[-2] == 1:
        if m.dtype == torch.bool:
            keep = m
        elif m.is_floating_point() and bool(((m == 0) | (m == float("-inf"))).all()):
            keep = m == 0
        else:
            keep = None
        if keep is not None:
            return torch.broadcast_to(keep, batch_shape + (1, 1, nk)).reshape(-1, nk).contiguous(), None
    bias = _bias_from_mask(m, blocked_is_true=False)
    if len(batch_shape) != 1:
        bias = torch.broadcast_to(bias, batch_shape + tuple(bias.shape[-3:])).reshape((-1,) + tuple(bias.shape[-3:]))
    return None, bias


def sdpa_to_call(site: str, query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p=0.0,
                 is_causal=False, scale=None, enable_gqa=False) -> tuple[AttentionCall, tuple]:
    """Convert F.scaled_dot_product_attention arguments -> (AttentionCall, query batch shape)."""
    if dropout_p and dropout_p > 0:
        raise UnsupportedAttentionError(
            f"site {site!r}: attention dropout (dropout_p={dropout_p}) cannot be probed; call model.eval()")
    if is_causal and attn_mask is not None:
        raise ValueError(f"site {site!r}: scaled_dot_product_attention takes attn_mask or is_causal, not both")
    if query.dim() < 4 or key.dim() != query.dim() or value.dim() != query.dim():
        raise UnsupportedAttentionError(
            f"site {site!r}: probing needs q/k/v of shape [..., H, N, D] (rank >= 4, equal ranks); got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch_shape = tuple(query.shape[:-3])
    H, Nq = query.shape[-3], query.shape[-2]
    Hkv, Nk = key.shape[-3], key.shape[-2]
    if Hkv != H and not (Hkv == 1 or (enable_gqa and H % Hkv == 0)):
        raise ValueError(f"site {site!r}: q has {H} heads and k has {Hkv}; pass enable_gqa=True for grouped "
                         "query attention (H % Hkv == 0)")
    q = query.reshape((-1,) + tuple(query.shape[-3:]))
    k = torch.broadcast_to(key, batch_shape + tuple(key.shape[-3:])).reshape((-1,) + tuple(key.shape[-3:]))
    v = torch.broadcast_to(value, batch_shape + tuple(value.shape[-3:])).reshape((-1,) + tuple(value.shape[-3:]))
    kpm = bias = None
    if attn_mask is not None:
        kpm, bias = _sdpa_mask(site, attn_mask, batch_shape, Nk)
    return AttentionCall(site, q, k, v, kpm, scale, attn_bias=bias, causal=bool(is_causal)), batch_shape


# ---------------------------------------------------------------------------------- per-interceptor state
@dataclass
class _State:
    """Per-interceptor bookkeeping, touched only in the thread that entered it (calls from other threads pass
    through before reaching it)."""

    calls: dict = field(default_factory=dict)  # id(module) -> SDPA calls so far in its current forward
    suspended: int = 0


class _SDPAMode(TorchFunctionMode):
    def __init__(self, interceptor: "Interceptor"):
        super().__init__()
        self.interceptor = interceptor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:  # the hot path: every other torch call passes straight through
            return func(*args, **kwargs)
        return self.interceptor._on_sdpa(func, args, kwargs)


# ---------------------------------------------------------------------------------- MultiheadAttention
def _mha_key_padding(site: str, mask: Optional[Tensor], batch: int, nk: int):
    """nn.MultiheadAttention's key_padding_mask (bool True = IGNORE, or additive float) -> (bool [B, S] True =
    attend, None), or (None, additive bias [B, 1, 1, S]) for a float mask with values other than 0 / -inf."""
    if mask is None:
        return None, None
    if mask.shape != (batch, nk):
        raise ValueError(f"site {site!r}: key_padding_mask must have shape {(batch, nk)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return ~mask, None
    blocked = mask == float("-inf")
    if bool(((mask == 0) | blocked).all()):
        return ~blocked, None
    return None, mask[:, None, None, :]


def probed_mha_forward(mha: nn.MultiheadAttention, site: str, handler: SiteHandler, query: Tensor, key: Tensor,
                       value: Tensor, key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                       attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                       is_causal: bool = False):
    """nn.MultiheadAttention.forward, with the core attention done by `handler` (same math as torch's)."""
    if is_causal and attn_mask is None:
        raise ValueError(f"site {site!r}: nn.MultiheadAttention needs attn_mask with the is_causal hint")
    if mha.training and mha.dropout > 0:
        raise UnsupportedAttentionError(
            f"site {site!r}: attention dropout ({mha.dropout}) cannot be probed in training mode; call model.eval()")
    batched = query.dim() == 3
    if not batched:  # unbatched [L, E]: add the batch dim where the layout expects it
        query, key, value = (t.unsqueeze(0 if mha.batch_first else 1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if not mha.batch_first:  # [L, B, E] -> [B, L, E]
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    B, L, E = query.shape
    H, hd = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = (None, None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)
    kpm, bias = _mha_key_padding(site, key_padding_mask, B, key.shape[1])
    extra = 0
    if mha.bias_k is not None:  # learned extra key/value, always attended
        k = torch.cat([k, mha.bias_k.reshape(1, 1, E).expand(B, 1, E)], dim=1)
        v = torch.cat([v, mha.bias_v.reshape(1, 1, E).expand(B, 1, E)], dim=1)
        extra += 1
    q = q.reshape(B, L, H, hd).transpose(1, 2)  # heads are contiguous channel blocks, as in torch
    k = k.reshape(B, -1, H, hd).transpose(1, 2)
    v = v.reshape(B, -1, H, hd).transpose(1, 2)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(B, H, 1, hd)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, 1, hd)], dim=2)
        extra += 1
    if kpm is not None and extra:
        kpm = torch.cat([kpm, kpm.new_ones(B, extra)], dim=1)
    if attn_mask is not None:  # [L, S] or [B * H, L, S]; bool True = NOT allowed, or additive float
        mask_bias = _bias_from_mask(attn_mask, blocked_is_true=True)
        mask_bias = mask_bias[None, None] if mask_bias.dim() == 2 else mask_bias.reshape(B, H, L, -1)
        bias = mask_bias if bias is None else bias + mask_bias
    if bias is not None and extra:  # the extra keys are attended by every query
        bias = F.pad(bias, (0, extra))
    out, weights = handler.attend(AttentionCall(site, q, k, v, kpm, None, need_weights, bias))
    out = F.linear(out.transpose(1, 2).reshape(B, L, E), mha.out_proj.weight, mha.out_proj.bias)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if need_weights:
        weights = weights.to(out.dtype)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        weights = None
    if not batched:
        out = out.squeeze(0 if mha.batch_first else 1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


# ---------------------------------------------------------------------------------- the module tree
@dataclass(frozen=True, eq=False)
class ModelTree:
    """One walk of a model's module tree, reused by every trace of that model while the tree is unchanged
    (a trace per probe in a loop would otherwise walk it twice per probe). The root module is left out of
    the stored lists (a cached value that held the model would keep its weak key alive forever); `named()`
    adds it back, and SDPA call naming checks the root first.

    children: a copy of every module's `_modules` dict, the root's first, then those of `below` in order;
    `current(model)` compares them with the live dicts (C-level dict equality: modules compare by identity),
    so a module added, removed, replaced or moved anywhere in the tree invalidates the walk.
    """

    children: tuple
    below: tuple  # ((path, module), ...) of every module under the root, as model.named_modules() gives them
    modules: tuple  # the modules of `below`, for the validity check
    paths: dict  # id(module) -> (site path, module) for the modules under the root
    router: object  # the attention router found on a module under the root (the root's own is looked up live)
    mha: tuple  # ((path, module), ...) of the nn.MultiheadAttention modules under the root

    def named(self, model: nn.Module) -> list:
        return [("", model), *self.below]

    def current(self, model: nn.Module) -> bool:
        """Whether the model's module tree is still the one walked. (A reordering of children that keeps
        every name and module is not seen: it changes no path.)"""
        try:
            return (model._modules == self.children[0]
                    and tuple(map(_CHILDREN, self.modules)) == self.children[1:])
        except Exception:  # a module class with an __eq__ that cannot compare: treat the tree as changed
            return False


_CHILDREN = operator.attrgetter("_modules")
_TREES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_tree(model: nn.Module) -> ModelTree:
    """The model's `ModelTree`, rebuilt only when a module was added, removed, renamed or moved."""
    tree = _TREES.get(model)
    if tree is not None and tree.current(model):
        return tree
    below = tuple((path, module) for path, module in model.named_modules() if module is not model)
    modules = tuple(module for _, module in below)
    children = (dict(model._modules),) + tuple(dict(module._modules) for module in modules)
    router = next((r for r in map(_own_router, modules) if r is not None), None)
    mha = tuple((path, module) for path, module in below if isinstance(module, nn.MultiheadAttention))
    tree = ModelTree(children, below, modules, {id(module): (path, module) for path, module in below}, router, mha)
    if all(child is not model for found in children for child in found.values()):
        _TREES[model] = tree  # (a module cycle through the root would keep the weak key alive: not cached)
    return tree


def is_cached_tree(model: nn.Module, tree: ModelTree) -> bool:
    """Whether `tree` is the one cached for `model` (values derived from an uncached tree must not be cached
    under the model's weak key either: the tree holds the model)."""
    return _TREES.get(model) is tree


def _own_router(module: nn.Module):
    # look where an attribute can live before getattr: nn.Module.__getattr__ raises (slowly) on a miss
    if ("attention_router" in module.__dict__ or "attention_router" in module._modules
            or hasattr(type(module), "attention_router")):
        return getattr(module, "attention_router", None)
    return None


def find_router(model: nn.Module, tree: Optional[ModelTree] = None):
    """The model's attention router (an object with a `handlers` dict), or None: the root's own, else the
    first found on a module under it."""
    router = _own_router(model)
    if router is None:
        router = (tree or model_tree(model)).router
    return router if router is not None and isinstance(getattr(router, "handlers", None), dict) else None


def router_sites(model: nn.Module, router, tree: Optional[ModelTree] = None) -> list[str]:
    """Sites of the modules that call `router` (they carry `.site` and `.router`)."""
    names = [m.site for _, m in (tree or model_tree(model)).named(model)
             if getattr(m, "router", None) is router and isinstance(getattr(m, "site", None), str)]
    return list(dict.fromkeys(names))


def _plain_router_attention(q, k, v, key_padding_mask):
    """What the router runs with no handler (models.attention.sdpa), so that an unprobed site of a traced
    model gives the untraced model's bits (strided heads are made contiguous, as the router does)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask)


def static_sites(model: nn.Module) -> list[str]:
    """Sites known without running the model: router sites and nn.MultiheadAttention paths.

    Sites of modules that call F.scaled_dot_product_attention are only known once the model has run
    (see `Interceptor.seen`).
    """
    router = find_router(model)
    names = router_sites(model, router) if router is not None else []
    names += [p or ROOT_SITE for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return names


# ---------------------------------------------------------------------------------- process-wide state
# torch.backends.mha's fast-path switch is one flag for the whole process. Interceptors in several threads
# share it through a count: the first one to need it off turns it off, the last one to leave restores the
# value it found (a per-interceptor save/restore would let one thread switch it back on under another).
_FASTPATH_LOCK = threading.Lock()
_fastpath_users = 0
_fastpath_saved = True


def _fastpath_off() -> None:
    global _fastpath_users, _fastpath_saved
    with _FASTPATH_LOCK:
        if _fastpath_users == 0:
            _fastpath_saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fastpath_users += 1


def _fastpath_release() -> None:
    global _fastpath_users
    with _FASTPATH_LOCK:
        _fastpath_users -= 1
        if _fastpath_users == 0:
            torch.backends.mha.set_fastpath_enabled(_fastpath_saved)


# Skip handlers / forwards of interceptors that have exited (left in a chain by a later one); the chain
# protocol is shared with the router's scoped installations (models/attention.py).
_live = live


# ---------------------------------------------------------------------------------- the interceptor
class Interceptor:
    """Context manager: while active, attention calls of `model` that `handler.wants` go to `handler.attend`.

    intercept_sdpa: catch F.scaled_dot_product_attention calls (None = yes, except for router models,
    whose router already names every attention call).

    Scope: an interceptor acts only on calls made in the thread that entered it, and only while it is
    active; it leaves nothing behind. Calls of the same model from other threads run as if it were not
    there (or reach those threads' own interceptors), so two threads can trace different models, or the
    same one, at once, and leave in any order. The only process-wide setting it touches, torch's MHA fast
    path switch, is shared by count (off while any interceptor needs it, then restored).
    """

    def __init__(self, model: nn.Module, handler: SiteHandler, intercept_sdpa=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if intercept_sdpa not in (None, True, False, "mode"):
            raise ValueError(f"intercept_sdpa must be None, True, False or 'mode', got {intercept_sdpa!r}")
        self.model = model
        self.handler = handler
        self._intercept_sdpa = intercept_sdpa
        # set on entering, from the module tree as it is then:
        self.router = None  # the model's attention router, if any
        self.intercept_sdpa = None  # "patch": wrap F.scaled_dot_product_attention; "mode": a TorchFunctionMode
        self._paths: dict[int, tuple] = {}  # id(module) -> (path, module) below the root, naming SDPA call sites
        self._counted: set = set()  # ids of the modules given a call-count restart wrapper
        self.seen: dict[str, None] = {}  # every site called while active, in first-call order
        self._state = _State()
        self._undo: list[Callable[[], None]] = []
        self._mode: Optional[_SDPAMode] = None
        self._owner: Optional[int] = None  # the thread that entered
        self._active = False

    def _mine(self) -> bool:
        """Whether the current call is this interceptor's to handle (active, and in the entering thread)."""
        return self._active and threading.get_ident() == self._owner

    # -- bookkeeping
    def _see(self, site: str) -> None:
        if site not in self.seen:
            self.seen[site] = None

    @contextlib.contextmanager
    def _suspended(self):
        """SDPA calls made here (e.g. a router's plain path) are not intercepted again. (Another thread's calls
        never reach this interceptor's SDPA path: nothing to suspend there.)"""
        if not self._mine():
            yield
            return
        state = self._state
        state.suspended += 1
        try:
            yield
        finally:
            state.suspended -= 1

    # -- install / remove
    def __enter__(self) -> "Interceptor":
        return self.enter(model_tree(self.model))  # cached: one cheap check unless the module tree changed

    def enter(self, tree: ModelTree) -> "Interceptor":
        """`__enter__` with the model's current ModelTree (for a caller that has just obtained it)."""
        if self._undo or self._mode is not None or self._active:
            raise RuntimeError("this Interceptor is already active; create a new one to nest")
        self.router = find_router(self.model, tree)
        via = self.router is None if self._intercept_sdpa is None else self._intercept_sdpa
        self.intercept_sdpa = "mode" if via == "mode" else ("patch" if via else None)
        self._owner = threading.get_ident()
        self._state = _State()
        self._active = True
        try:
            if self.router is not None:
                self._install_router(tree)
            root_mha = ((ROOT_SITE, self.model),) if isinstance(self.model, nn.MultiheadAttention) else ()
            self._install_mha(root_mha + tree.mha)
            if self.intercept_sdpa:
                self._paths = tree.paths
                self._counted = set()
                if self.intercept_sdpa == "mode":
                    self._mode = _SDPAMode(self)
                    self._mode.__enter__()
                else:
                    self._install_sdpa_patch()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._owner is not None and threading.get_ident() != self._owner:
            raise RuntimeError("an Interceptor must be exited in the thread that entered it")
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        self._remove()

    def _remove(self) -> None:
        self._active = False  # from now on, any of our handlers still in a chain pass calls through
        while self._undo:
            self._undo.pop()()

    def _install_router(self, tree: ModelTree) -> None:
        router = self.router
        for site in router_sites(self.model, router, tree):
            previous = router.handlers.get(site)
            handler = self._router_handler(previous)
            router.handlers[site] = handler

            def undo(s=site, mine=handler, p=previous):
                # Another interceptor installed after us and still active keeps its handler (which passes
                # through ours, now inactive); else put back the first live one before us.
                if router.handlers.get(s) is mine:
                    p = _live(p)
                    if p is None:
                        router.handlers.pop(s, None)
                    else:
                        router.handlers[s] = p

            self._undo.append(undo)

    def _router_handler(self, previous):
        def handle(site, q, k, v, key_padding_mask=None):
            if not self._mine() or not self._want(site):
                before = _live(previous)
                with self._suspended():
                    if before is not None:
                        return before(site, q, k, v, key_padding_mask)
                    return _plain_router_attention(q, k, v, key_padding_mask)
            post = _output_transform(self.handler, site)
            with self._suspended():
                if post is not None:  # the plain path, then the output edit (we handle the site, as attend would)
                    return post(_plain_router_attention(q, k, v, key_padding_mask))
                out, _ = self.handler.attend(AttentionCall(site, q, k, v, key_padding_mask))
            return out

        handle._latentflow_interceptor = self
        handle._latentflow_previous = previous
        return handle

    def _want(self, site: str) -> bool:
        self._see(site)
        return self.handler.wants(site)

    def _install_mha(self, modules) -> None:
        """modules: ((site path, nn.MultiheadAttention), ...)."""
        found = False
        for path, module in modules:
            if not found:  # the fused TransformerEncoderLayer / MHA eval path would skip the swapped forward
                found = True
                _fastpath_off()
                self._undo.append(_fastpath_release)
            site = path or ROOT_SITE
            had_own = "forward" in module.__dict__
            own = module.__dict__.get("forward")
            original = own if had_own else type(module).forward.__get__(module)
            forward = self._mha_forward(module, site, original)
            module.forward = forward

            def undo(m=module, mine=forward, h=had_own, o=own):
                if m.__dict__.get("forward") is mine:  # else a later, still active one passes through ours
                    _restore_forward(m, o if h else None)

            self._undo.append(undo)

    def _mha_forward(self, module, site, original):
        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if not self._mine() or not self._want(site):
                with self._suspended():
                    return _live(original)(query, key, value, key_padding_mask=key_padding_mask,
                                           need_weights=need_weights, attn_mask=attn_mask,
                                           average_attn_weights=average_attn_weights, is_causal=is_causal)
            with self._suspended():
                return probed_mha_forward(module, site, self.handler, query, key, value, key_padding_mask,
                                          need_weights, attn_mask, average_attn_weights, is_causal)

        forward._latentflow_interceptor = self
        forward._latentflow_previous = original
        return forward

    def _install_sdpa_patch(self) -> None:
        previous = F.scaled_dot_product_attention  # the builtin, or an earlier interceptor's wrapper

        def sdpa(*args, **kwargs):
            before = _live(previous)
            if not self._mine():  # other threads, or after exit (a later interceptor's wrapper chains to us)
                return before(*args, **kwargs)
            return self._on_sdpa(before, args, kwargs)

        sdpa._latentflow_interceptor = self
        sdpa._latentflow_previous = previous
        F.scaled_dot_product_attention = sdpa

        def undo():
            if F.scaled_dot_product_attention is sdpa:  # else a later, still active wrapper passes through ours
                F.scaled_dot_product_attention = _live(previous)

        self._undo.append(undo)

    def _caller(self):
        """(path, module) of the innermost module of the model with a method on this thread's Python stack (a
        frame whose `self` is that module), or None: an SDPA call made outside the model's forward."""
        # above _caller and _on_sdpa: our SDPA wrapper (no self) or the mode's __torch_function__
        frame = sys._getframe(2)
        paths, root = self._paths, self.model
        while frame is not None:
            # f_locals builds a dict of every local: only for code that has a `self` at all (cached per code)
            code = frame.f_code
            has_self = _HAS_SELF.get(code)
            if has_self is None:
                if len(_HAS_SELF) > 4096:  # code made at run time (exec) would otherwise pile up
                    _HAS_SELF.clear()
                has_self = _HAS_SELF[code] = "self" in code.co_varnames or "self" in code.co_cellvars \
                    or "self" in code.co_freevars
            obj = frame.f_locals.get("self") if has_self else None
            if obj is not None:
                if obj is root:
                    return ROOT_SITE, obj
                found = paths.get(id(obj))
                if found is not None and found[1] is obj:
                    return found
            frame = frame.f_back
        return None

    def _count_call(self, module: nn.Module) -> int:
        """The index of this SDPA call within the module's current forward (0, 1, ...)."""
        calls = self._state.calls
        key = id(module)
        if key not in self._counted:  # first call seen from this module: restart its count at each forward
            self._counted.add(key)
            self._install_restart(module, key)
        n = calls.get(key, 0)
        calls[key] = n + 1
        return n

    def _install_restart(self, module: nn.Module, key: int) -> None:
        """Each forward of the module restarts its SDPA call count (`wrap_forward`: cheaper than a forward
        pre-hook, which sends every call of the module through torch's hook path and costs a handle to
        register and remove; a trace per probe pays this per SDPA-calling module)."""
        calls = self._state.calls

        def restart():
            calls[key] = 0

        self._undo.append(wrap_forward(module, self, restart))

    # -- the SDPA path
    def _on_sdpa(self, func, args, kwargs):
        if self._state.suspended:
            return func(*args, **kwargs)
        found = self._caller()
        if found is None:  # outside the model's forward: not a site
            return func(*args, **kwargs)
        path, module = found
        n = self._count_call(module)
        site = path if n == 0 else f"{path}#{n}"
        self._see(site)
        if not self.handler.wants(site):
            return func(*args, **kwargs)
        bound = dict(zip(_SDPA_ARGS, args))
        for name, value in kwargs.items():
            if name not in _SDPA_ARGS:
                raise TypeError(f"scaled_dot_product_attention got an unexpected argument {name!r}")
            bound[name] = value
        post = _output_transform(self.handler, site)
        if post is not None and not bound.get("dropout_p") and bound["query"].dim() >= 4:
            # output-only interventions: the model's own SDPA call, unchanged (same kernel, same bits as an
            # untraced run), then the edit on a [B, H, Nq, Dv] view of its output
            with torch._C.DisableTorchFunction():  # outer traces' wrappers / modes: the innermost that wants a
                out = _SDPA(*args, **kwargs)           # site handles it
            if out.dim() == 4:
                return post(out)
            return post(out.reshape((-1,) + tuple(out.shape[-3:]))).reshape(out.shape)
        call, batch_shape = sdpa_to_call(site, **bound)
        out, _ = self.handler.attend(call)
        return out.reshape(batch_shape + tuple(out.shape[1:]))


def wrap_forward(module: nn.Module, owner: Interceptor, before: Callable[[], None]) -> Callable[[], None]:
    """Make `module.forward` (an instance attribute) call `before()` -- for calls that are `owner`'s to handle
    (active, entering thread) -- and then the forward it replaced; return the undo. Chains like the
    MultiheadAttention swap: a forward someone else put on the instance (nnsight's, accelerate's) is called
    through and put back, an ended one of ours is skipped, and inspect.signature still sees the model's."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    original = own if had_own else type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        if owner._mine():
            before()
        return (_live(original) if had_own else original)(*args, **kwargs)

    forward._latentflow_interceptor = owner
    forward._latentflow_previous = original
    forward.__wrapped__ = original
    module.__dict__["forward"] = forward

    def undo():
        if module.__dict__.get("forward") is forward:  # else a later, still active one passes through ours
            _restore_forward(module, own if had_own else None)

    return undo


def _restore_forward(module: nn.Module, own) -> None:
    """Put back the instance forward `own` (None: there was none), skipping ended installations of ours in its
    chain; a chain that ends at the class's own forward means no instance attribute at all."""
    live = _live(own) if own is not None else None
    if live is None or (getattr(live, "__func__", None) is getattr(type(module), "forward", None)
                        and getattr(live, "__self__", None) is module):
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = live


def intercept(model: nn.Module, handler: SiteHandler, intercept_sdpa: Optional[bool] = None) -> Interceptor:
    """`with intercept(model, handler): model(...)` routes the attention calls `handler` wants to it."""
    return Interceptor(model, handler, intercept_sdpa)
