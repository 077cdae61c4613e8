#!/usr/bin/env python
"""The hook-style API (`latentflow_fast.probe.trace`) against plain torch forward hooks, side by side.

Workload: every single-head ablation (one probe per (layer, head)) on a random-init GPT-style decoder
(causal SDPA) and a BERT-style encoder (bidirectional SDPA with a padded batch), both written from torch.nn
with the head merge followed by an output projection `proj`. Variants:

  trace batched   one traced forward over P rows (row r carries probe r: `tr.ablate_heads(site, h, rows=r)`)
  hooks batched   plain torch: one forward over P rows, SDPA everywhere, a forward pre-hook on each block's
                  `proj` zeroing head h's channels of row r (what a competent hook user writes)
  trace loop      one traced forward per probe at batch 1
  hooks loop      one plain-hook forward per probe at batch 1

Printed per (model, tokens): probes/s of each variant (median over rounds), peak memory on CUDA, and the
agreement of the traced outputs with the plain hooks relative to the probes' effect (max |trace - hooks| /
max |hooks - clean|).

Peers: nnsight and TransformerLens are not run by this script; they are optional extras, and the
environment this was written in had neither (nor `transformers`, whose GPT-2 / BERT the issue names).
Adding them means one more variant function each, timed the same way.

    python benchmarks/dropin_peers.py                       # 64..512 tokens, both models
    python benchmarks/dropin_peers.py --tokens 64 --rounds 1 --layers 2 --threads 1   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast.probe import trace


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, keep):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(z.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class Net(nn.Module):
    def __init__(self, d: int, heads: int, layers: int, causal: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, causal) for _ in range(layers))

    def forward(self, x, keep):
        for block in self.blocks:
            x = block(x, keep)
        return x


def probes_of(model: Net) -> list:
    return [(layer, h) for layer in range(len(model.blocks)) for h in range(model.blocks[0].heads)]


def trace_batched(model, x, keep, probes, backend):
    P = len(probes)
    with torch.no_grad(), trace(model, backend=backend) as tr:
        for r, (layer, h) in enumerate(probes):
            tr.ablate_heads(f"blocks.{layer}", heads=h, rows=r)
        return model(x.expand(P, -1, -1), keep.expand(P, -1))


def hooks_batched(model, x, keep, probes):
    P = len(probes)
    hd = model.blocks[0].proj.in_features // model.blocks[0].heads
    handles = []
    for layer, block in enumerate(model.blocks):
        rows = [(r, h) for r, (pl, h) in enumerate(probes) if pl == layer]

        def zero(module, args, rows=rows):
            z = args[0].clone()
            for r, h in rows:
                z[r, :, h * hd:(h + 1) * hd] = 0
            return (z,)

        handles.append(block.proj.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return model(x.expand(P, -1, -1), keep.expand(P, -1))
    finally:
        for handle in handles:
            handle.remove()


def loop(fn, model, x, keep, probes, *args):
    return torch.cat([fn(model, x, keep, [p], *args) for p in probes])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, rounds):
    times, out, peak = [], None, None
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return statistics.median(times), out, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="64,128,256,512")
    parser.add_argument("--models", default="gpt,bert")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads (0 = torch's default; 1 on a shared, loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, d={args.dim}, "
          f"H={args.heads}, layers={args.layers}, rounds={args.rounds} (median)")
    print(f"{'model':5} {'N':>4} {'variant':14} {'probes/s':>9} {'peak MiB':>9} {'agreement':>10}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = Net(args.dim, args.heads, args.layers, causal=name == "gpt").to(device).eval()
        probes = probes_of(model)
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(1, n, args.dim, device=device)
            keep = torch.ones(1, n, dtype=torch.bool, device=device)
            if name == "bert":
                keep[0, n - n // 8:] = False  # a padded batch row
            with torch.no_grad():
                clean = model(x, keep)
            variants = {
                "hooks batched": lambda: hooks_batched(model, x, keep, probes),
                "trace batched": lambda: trace_batched(model, x, keep, probes, args.backend),
                "hooks loop": lambda: loop(hooks_batched, model, x, keep, probes),
                "trace loop": lambda: loop(trace_batched, model, x, keep, probes, args.backend),
            }
            reference = None
            for label, fn in variants.items():
                seconds, out, peak = timed(fn, device, args.rounds)
                if reference is None:
                    reference = out
                    effect = (out - clean).abs().max().item()
                agree = (out - reference).abs().max().item() / max(effect, 1e-30)
                mem = f"{peak / 2**20:9.1f}" if peak is not None else f"{'n/a':>9}"
                print(f"{name:5} {n:4d} {label:14} {len(probes) / seconds:9.1f} {mem} {agree:10.1e}")


if __name__ == "__main__":
    main()
