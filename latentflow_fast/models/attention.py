"""Site-aware attention: every attention call of the DiT goes through one router.

A site is named relative to the transformer, e.g. "layers.3.self_attn" or "layers.3.cross_attn".
With no handler registered for a site the router runs plain F.scaled_dot_product_attention; the only
overhead is one dict lookup. Probing / caching code installs handlers to replace the computation.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# handler(site, q, k, v, key_padding_mask) -> out [B, H, Nq, hd]
AttentionHandler = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain attention as SAM Audio runs it: key_padding_mask bool [B, Nk], True = attend."""
    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    # Strided heads arrive non-contiguous; CPU SDPA would fall back to its slow math path on them.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=attn_mask)


class AttentionRouter:
    """Dispatches attention by site name.

    q [B,H,Nq,hd], k/v [B,H,Nk,hd] arrive after head split, q/k RMSNorm and RoPE (self-attention).
    """

    def __init__(self):
        self.handlers: dict[str, AttentionHandler] = {}

    def __call__(self, site: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        handler = self.handlers.get(site)
        if handler is None:
            return sdpa(q, k, v, key_padding_mask)
        return handler(site, q, k, v, key_padding_mask)

    def __repr__(self) -> str:
        return f"AttentionRouter(handlers={sorted(self.handlers)})"


def site_name(layer: int, kind: str) -> str:
    """Site of layer `layer`'s attention; kind is "self_attn" or "cross_attn"."""
    if kind not in ("self_attn", "cross_attn"):
        raise ValueError(f"kind must be 'self_attn' or 'cross_attn', got {kind!r}")
    return f"layers.{layer}.{kind}"
