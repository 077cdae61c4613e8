"""Values vs weights of cross-attention: read the keys and/or the values of another prompt's text (P1).

A cross-attention head computes ``o = softmax(q K^T / sqrt(d)) V`` with K, V projected from the text memory
(``memory_proj(text) + timestep_emb(t)``, then the y-embedder); in this DiT text reaches the model only
there (models/dit.py). With prompt A's run as the clean run and prompt B's (the counterfactual) as source:

* ``weights swap``: K <- K_B, V = V_A: the weights B's text would give these queries, applied to A's values;
* ``values swap``: K = K_A, V <- V_B: A's weights applied to B's values;
* ``text swap`` (both): K_B and V_B, i.e. exactly cross-attention over B's text. At every layer from the
  first evaluation on it reproduces the B-prompted run bitwise (a known-by-construction check).

K_B and V_B depend on B's text and on t only, not on the state, so they are recorded once per
(site, evaluation) while B's clean trajectory runs (`record_text`). The two prompts must have the same
number of text tokens (the clip design guarantees it, clips.py); keys/values are swapped position by
position. With A's own run as source every swap is an identity (effects exactly 0, tested).

Rows are ordinary `Probe`s with intervention "none" and one of the labels in SWAP_LABELS (with the
swapped site pattern, evaluation, window and `source` = the recorded run's name), so they share sweeps,
stores and probe ids with the engine's built-in interventions. Because "none" rows count as identities for
the engine's prefix reuse, this engine runs every continuation from layer 0 (prefix_reuse=False).
"""

from __future__ import annotations

from typing import Optional

from ..probe import Probe, ProbeEngine

# label -> (swap keys, swap values)
SWAP_LABELS = {"weights swap": (True, False), "values swap": (False, True), "text swap": (True, True)}


def swap_kind(label: str) -> Optional[tuple]:
    """(swap keys, swap values) of a probe label such as "p1:weights swap"; None for other labels."""
    return SWAP_LABELS.get(str(label).split(":", 1)[-1].replace(" (identity)", ""))


def swap_probe(kind: str, source: str, site: str = "layers.*.cross_attn", evaluation: int = 0,
               window: Optional[int] = None, label_prefix: str = "") -> Probe:
    """A probe row for `TextSwapEngine`: kind in SWAP_LABELS (or the label with " (identity)" appended)."""
    base = kind.replace(" (identity)", "")
    if base not in SWAP_LABELS:
        raise ValueError(f"kind must be one of {sorted(SWAP_LABELS)}, got {kind!r}")
    if not site.endswith("cross_attn"):
        raise ValueError(f"site must name cross-attention sites, got {site!r}")
    return Probe(site=site, intervention="none", evaluation=evaluation, window=window, source=source,
                 label=label_prefix + kind)


class TextSwapEngine(ProbeEngine):
    """ProbeEngine whose cross-attention rows can read keys/values recorded from another prompt's run."""

    def __init__(self, model, **kwargs):
        kwargs["prefix_reuse"] = False  # swap rows are "none" probes to the engine (module docstring)
        super().__init__(model, **kwargs)
        self.text_kv: dict = {}  # run name -> {(site, evaluation): (k [1, Hk, L, d], v [1, Hk, L, d])}
        self._recording: Optional[dict] = None

    def record_text(self, name: str, clip, prompt: Optional[str] = None, **trajectory_kwargs):
        """Run the clean trajectory of `clip` with `prompt`, record its cross-attention K/V under `name`
        (and register the run as a patch source of that name); returns the Trajectory."""
        self._recording = {}
        try:
            traj = self.trajectory(clip, prompt=prompt, name=name, **trajectory_kwargs)
            self.text_kv[name] = self._recording
        finally:
            self._recording = None
        return traj

    def forget(self, name: str) -> None:
        self.text_kv.pop(name, None)
        self.runs.pop(name, None)

    def _handle(self, site, q, k, v, key_padding_mask):
        ctx = self._ctx
        if site.endswith("cross_attn"):
            if self._recording is not None:
                self._recording[(site, ctx.evaluation)] = (k[:1].clone(), v[:1].clone())
            swaps = [(r, p, swap_kind(p.label)) for r, p in enumerate(ctx.rows)
                     if p is not None and p.intervention == "none" and swap_kind(p.label) is not None
                     and p.matches(site) and p.active_at(ctx.evaluation)]
            if swaps:
                k, v = k.clone(), v.clone()
                for r, p, (swap_k, swap_v) in swaps:
                    recorded = self.text_kv.get(p.source)
                    if recorded is None:
                        raise ValueError(f"probe {p.probe_id} ({p.label}): no text recorded as {p.source!r} "
                                         "(TextSwapEngine.record_text)")
                    src_k, src_v = recorded[(site, ctx.evaluation)]
                    if src_k.shape[1:] != k.shape[1:]:
                        raise ValueError(f"probe {p.label} at {site}: the source text has {src_k.shape[2]} tokens, "
                                         f"this run's has {k.shape[2]}; values/weights swaps need equal lengths")
                    if swap_k:
                        k[r] = src_k[0]
                    if swap_v:
                        v[r] = src_v[0]
        return super()._handle(site, q, k, v, key_padding_mask)


__all__ = ["SWAP_LABELS", "TextSwapEngine", "swap_kind", "swap_probe"]
