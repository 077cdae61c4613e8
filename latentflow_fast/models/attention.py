"""Site-aware attention: every attention module of the DiT asks one router, at two levels.

A site is named relative to the transformer, e.g. "layers.3.self_attn" or "layers.3.cross_attn"; it names
both the attention call and the attention module (q/k/v projections, norms, RoPE, the call, `wo`).

- Attention level, `router(site, q, k, v, key_padding_mask)`: with no handler in `handlers` the router runs
  plain F.scaled_dot_product_attention; a handler `(site, q, k, v, key_padding_mask) -> out` replaces the
  computation (the probe engine, the Interceptor).
- Module level, `router.module_output(site, compute)`: with no handler in `module_handlers` it returns
  `compute()`, the module's own output; a handler `(site, compute) -> out` may return something else without
  calling `compute` at all, which skips the projections, the attention and `wo` (LSAC, `lsac.py`).

With no handler the only overhead of either level is one dict lookup. Code that installs handlers uses
`router.install(...)`, which scopes them to the installing thread and to the installation's lifetime.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# handler(site, q, k, v, key_padding_mask) -> out [B, H, Nq, hd]
AttentionHandler = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# module handler(site, compute) -> the module's output [B, T, D]; compute() runs the module itself
ModuleHandler = Callable[[str, Callable[[], torch.Tensor]], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain attention as SAM Audio runs it: key_padding_mask bool [B, Nk], True = attend."""
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    # Strided heads arrive non-contiguous; CPU SDPA would fall back to its slow math path on them.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=attn_mask)


def live(fn):
    """Skip handlers (or forwards) of installations that have ended but are still in a chain.

    Chain protocol: a scoped handler carries `_latentflow_interceptor` (an object with `_active`) and
    `_latentflow_previous` (what it replaced). A later installation that is still active keeps an ended
    one in its chain; calls then pass through to the first live one before it."""
    while fn is not None and getattr(fn, "_latentflow_interceptor", None) is not None \
            and not fn._latentflow_interceptor._active:
        fn = fn._latentflow_previous
    return fn


class Installation:
    """Handlers installed on a router by `AttentionRouter.install`, scoped to the installing thread.

    While active, calls made in the installing thread reach the installed handlers; calls from other threads
    go to the handler each site had before (or the plain computation). `remove()` (or leaving the `with`
    block) deactivates them and puts back, at each site still holding ours, the handler we replaced; a site
    where another installation put its handler meanwhile keeps it (ours, now inactive, passes calls through).
    Installations nest: the innermost active one of the calling thread handles the call.
    """

    def __init__(self, router: "AttentionRouter", handlers: dict, module_handlers: dict):
        self.owner = threading.get_ident()
        self._active = True
        self._ours: list = []  # (table, site, our handler, the one it replaced)
        for site, fn in handlers.items():
            self._put(router.handlers, site, fn, _scoped_attention)
        for site, fn in module_handlers.items():
            self._put(router.module_handlers, site, fn, _scoped_module)

    def _put(self, table: dict, site: str, fn, scoped) -> None:
        previous = table.get(site)
        handler = scoped(self, fn, previous)
        handler._latentflow_interceptor = self
        handler._latentflow_previous = previous
        table[site] = handler
        self._ours.append((table, site, handler, previous))

    @property
    def active(self) -> bool:
        return self._active

    def mine(self) -> bool:
        """Whether the current call is ours to handle: installed, and made in the installing thread."""
        return self._active and threading.get_ident() == self.owner

    def remove(self) -> None:
        """Deactivate and unwind (idempotent; may run in any thread, e.g. a finaliser)."""
        self._active = False
        while self._ours:
            table, site, handler, previous = self._ours.pop()
            if table.get(site) is handler:
                before = live(previous)
                if before is None:
                    table.pop(site, None)
                else:
                    table[site] = before

    def __enter__(self) -> "Installation":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _scoped_attention(installation: Installation, fn: AttentionHandler, previous) -> AttentionHandler:
    def handle(site, q, k, v, key_padding_mask=None):
        if installation._active and threading.get_ident() == installation.owner:
            return fn(site, q, k, v, key_padding_mask)
        before = live(previous)
        return sdpa(q, k, v, key_padding_mask) if before is None else before(site, q, k, v, key_padding_mask)

    return handle


def _scoped_module(installation: Installation, fn: ModuleHandler, previous) -> ModuleHandler:
    def handle(site, compute):
        if installation._active and threading.get_ident() == installation.owner:
            return fn(site, compute)
        before = live(previous)
        return compute() if before is None else before(site, compute)

    return handle


class AttentionRouter:
    """Dispatches attention by site name, at the attention level and at the module level (module docstring).

    q [B,H,Nq,hd], k/v [B,H,Nk,hd] arrive after head split, q/k RMSNorm and RoPE (self-attention).
    """

    def __init__(self):
        self.handlers: dict[str, AttentionHandler] = {}
        self.module_handlers: dict[str, ModuleHandler] = {}

    def __call__(self, site: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        handler = self.handlers.get(site)
        if handler is None:
            return sdpa(q, k, v, key_padding_mask)
        return handler(site, q, k, v, key_padding_mask)

    def module_output(self, site: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The output of the attention module at `site`: `compute()` unless a module handler answers."""
        handler = self.module_handlers.get(site)
        if handler is None:
            return compute()
        return handler(site, compute)

    def install(self, handlers: Optional[dict] = None, module_handlers: Optional[dict] = None) -> Installation:
        """Install attention-level and / or module-level handlers, {site: handler}, scoped to the calling
        thread until `remove()` (use as a context manager). See `Installation` for the rules."""
        handlers, module_handlers = dict(handlers or {}), dict(module_handlers or {})
        for name, table in (("handlers", handlers), ("module_handlers", module_handlers)):
            for site, fn in table.items():
                if not isinstance(site, str):
                    raise TypeError(f"{name}: site names must be strings, got {site!r}")
                if not callable(fn):
                    raise TypeError(f"{name}[{site!r}] must be callable, got {type(fn).__name__}")
        return Installation(self, handlers, module_handlers)

    def __repr__(self) -> str:
        return f"AttentionRouter(handlers={sorted(self.handlers)}, module_handlers={sorted(self.module_handlers)})"


def site_name(layer: int, kind: str) -> str:
    """Site of layer `layer`'s attention; kind is "self_attn" or "cross_attn"."""
    if kind not in ("self_attn", "cross_attn"):
        raise ValueError(f"kind must be 'self_attn' or 'cross_attn', got {kind!r}")
    return f"layers.{layer}.{kind}"
