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

Printed per (model, tokens): probes/s of each variant (median over rounds, variants interleaved within a
round), its speed relative to "hooks batched" in wall time (x hooks) and in process CPU time (x cpu: less
sensitive to other load on a shared machine; with --threads 1), peak memory, and the agreement of each variant's output with the plain hooks relative to the probes'
effect (max |variant - hooks| / max |hooks - clean|).

Peers, when importable (`pip install -e .[peers]`; none is a runtime dependency): random-init Hugging Face
GPT-2 (`hf-gpt2`, causal) and BERT (`hf-bert`, a padded batch row) built from `transformers` configs with
attn_implementation="sdpa" (vocabulary 1000), the single-head ablations written the way each library's users
write them:

  hooks batched / loop    a forward pre-hook on the attention output projection (GPT-2 `attn.c_proj`, BERT
                          `attention.output.dense`) zeroing head h's channels of row r
  nnsight batched / loop  `NNsight(model).trace(...)`: `proj.input[r, :, h*D:(h+1)*D] = 0` per probe
  tl batched / loop       TransformerLens 4's `TransformerBridge` around a copy of the model,
                          `run_with_hooks` with a `blocks.{l}.attn.hook_z` hook zeroing z[r, :, h]
  trace batched / loop    as above, on the site `transformer.h.{l}.attn` / `bert.encoder.layer.{l}.attention.self`

Memory: on CUDA, torch.cuda.max_memory_allocated over the timed call. On CPU (--memory), one more untimed call
per variant under torch.profiler(profile_memory=True): the peak of the live bytes of the tensors allocated
during the call (its allocation/free records replayed in order) -- the same quantity, not RSS (which mostly
shows the allocator's caching).

    python benchmarks/dropin_peers.py                       # 64..512 tokens, every model available
    python benchmarks/dropin_peers.py --tokens 64 --rounds 1 --layers 2 --threads 1   # quick
    python benchmarks/dropin_peers.py --models hf-gpt2,hf-bert --memory              # + CPU peak memory
    python benchmarks/dropin_peers.py --overhead 2000 --dim 16 --tokens 4 --threads 1   # per-probe cost of each loop
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

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


PEERS = {name: importlib.util.find_spec(name) is not None for name in ("transformers", "nnsight", "transformer_lens")}


@dataclass
class Case:
    """One model at one length: how to call it on P copies of its input, and where its heads are."""

    model: nn.Module
    inputs: Callable[[int], tuple]  # P -> (args, kwargs) of a forward over P identical rows
    output: Callable  # the model's return value -> the tensor compared
    layers: int
    heads: int
    head_dim: int
    proj: str  # path of layer {l}'s attention output projection (its input: the merged heads "(h d)")
    site: str  # trace site of layer {l}
    tl_arch: str = ""  # TransformerLens architecture name ("" = TL cannot wrap this model)
    hf_config: object = None
    peers: dict = field(default_factory=dict)  # lazily built nnsight / TransformerLens wrappers

    def probes(self) -> list:
        return [(layer, h) for layer in range(self.layers) for h in range(self.heads)]

    def run(self, P: int):
        args, kwargs = self.inputs(P)
        return self.output(self.model(*args, **kwargs))


def build_case(name: str, n: int, args, device) -> Case:
    torch.manual_seed(0)
    d, H, L = args.dim, args.heads, args.layers
    if name in ("gpt", "bert"):
        model = Net(d, H, L, causal=name == "gpt").to(device).eval()
        x = torch.randn(1, n, d, device=device)
        keep = torch.ones(1, n, dtype=torch.bool, device=device)
        if name == "bert":
            keep[0, n - n // 8:] = False  # a padded batch row
        return Case(model, lambda P: ((x.expand(P, -1, -1), keep.expand(P, -1)), {}), lambda o: o, L, H, d // H,
                    "blocks.{l}.proj", "blocks.{l}")
    import transformers

    vocab = 1000
    ids = torch.randint(0, vocab, (1, n), device=device)
    if name == "hf-gpt2":
        cfg = transformers.GPT2Config(n_layer=L, n_embd=d, n_head=H, vocab_size=vocab, n_positions=max(n, 1024),
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
        return Case(model, lambda P: ((), {"input_ids": ids.expand(P, -1)}), lambda o: o.logits, L, H, d // H,
                    "transformer.h.{l}.attn.c_proj", "transformer.h.{l}.attn", "GPT2LMHeadModel", cfg)
    if name == "hf-bert":
        cfg = transformers.BertConfig(num_hidden_layers=L, hidden_size=d, num_attention_heads=H,
                                      intermediate_size=4 * d, vocab_size=vocab, max_position_embeddings=max(n, 512),
                                      attn_implementation="sdpa")
        model = transformers.BertForMaskedLM(cfg).to(device).eval()
        mask = torch.ones(1, n, dtype=torch.long, device=device)
        mask[0, n - n // 8:] = 0  # a padded batch row
        return Case(model, lambda P: ((), {"input_ids": ids.expand(P, -1), "attention_mask": mask.expand(P, -1)}),
                    lambda o: o.logits, L, H, d // H, "bert.encoder.layer.{l}.attention.output.dense",
                    "bert.encoder.layer.{l}.attention.self", "BertForMaskedLM", cfg)
    raise ValueError(f"--models: unknown model {name!r}")


# ---------------------------------------------------------------------------------------------- variants
def by_layer(probes) -> dict:
    """layer -> [(row, head)]: row r of the batch carries probe r."""
    rows: dict = {}
    for r, (layer, h) in enumerate(probes):
        rows.setdefault(layer, []).append((r, h))
    return rows


def trace_batched(case: Case, probes, backend="auto"):
    with torch.no_grad(), trace(case.model, backend=backend) as tr:
        for r, (layer, h) in enumerate(probes):
            tr.ablate_heads(case.site.format(l=layer), heads=h, rows=r)
        return case.run(len(probes))


def hooks_batched(case: Case, probes):
    hd, handles = case.head_dim, []
    for layer, rows in by_layer(probes).items():
        def zero(module, args, rows=rows):
            z = args[0].clone()
            for r, h in rows:
                z[r, :, h * hd:(h + 1) * hd] = 0
            return (z,) + tuple(args[1:])

        handles.append(case.model.get_submodule(case.proj.format(l=layer)).register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return case.run(len(probes))
    finally:
        for handle in handles:
            handle.remove()


def _envoy(root, path: str):
    for part in path.split("."):
        if part.isdigit():
            root = root[int(part)]
        else:  # a submodule named like a value nnsight serves (BERT's `output`) is reached as `E_output`
            root = getattr(root, f"{root.OVERLOAD_PREFIX}{part}" if part in ("output", "input") else part)
    return root


def nnsight_batched(case: Case, probes):
    if "nnsight" not in case.peers:
        from nnsight import NNsight

        case.peers["nnsight"] = NNsight(case.model)
    nm, hd = case.peers["nnsight"], case.head_dim
    args, kwargs = case.inputs(len(probes))
    with torch.no_grad(), nm.trace(*args, **kwargs):
        for layer, rows in sorted(by_layer(probes).items()):  # nnsight wants modules in execution order
            z = _envoy(nm, case.proj.format(l=layer)).input
            for r, h in rows:
                z[r, :, h * hd:(h + 1) * hd] = 0
        out = nm.output.save()
    return case.output(out)


def tl_batched(case: Case, probes):
    if "tl" not in case.peers:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        # the bridge rewires the model it wraps (and may switch its attention implementation): give it a copy
        case.peers["tl"] = build_bridge_from_module(copy.deepcopy(case.model), case.tl_arch, hf_config=case.hf_config)
    bridge = case.peers["tl"]
    hooks = []
    for layer, rows in by_layer(probes).items():
        def zero(z, hook, rows=rows):  # z [B, N, H, D]
            for r, h in rows:
                z[r, :, h] = 0
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", zero))
    args, kwargs = case.inputs(len(probes))
    with torch.no_grad():
        return bridge.run_with_hooks(kwargs["input_ids"], fwd_hooks=hooks,
                                     **{k: v for k, v in kwargs.items() if k != "input_ids"})


def looped(fn):
    return lambda case, probes: torch.cat([fn(case, [p]) for p in probes])


def variants_for(case: Case, backend: str) -> dict:
    found = {"hooks batched": hooks_batched, "trace batched": lambda c, p: trace_batched(c, p, backend)}
    if PEERS["nnsight"]:
        found["nnsight batched"] = nnsight_batched
    if PEERS["transformer_lens"] and case.tl_arch:
        found["tl batched"] = tl_batched
    for label in list(found):
        found[label.replace("batched", "loop")] = looped(found[label])
    return found


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn) -> int:
    """Peak live bytes of the CPU tensors allocated during one call of fn (torch.profiler's allocation records,
    replayed in time order): what torch.cuda.max_memory_allocated measures on a GPU, without the allocator's
    caching or the process's other memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:  # + allocation, - free
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="64,128,256,512")
    parser.add_argument("--models", default="gpt,bert,hf-gpt2,hf-bert")
    parser.add_argument("--variants", default="", help="comma-separated labels to run (default: all available)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads (0 = torch's default; 1 on a shared, loaded machine)")
    parser.add_argument("--memory", action="store_true", help="CPU: peak live tensor bytes per variant (profiler)")
    parser.add_argument("--overhead", type=int, default=0, metavar="PAIRS",
                        help="instead of the table: each loop variant's cost per probe over a plain forward, as the "
                             "median of PAIRS paired differences (use with small --dim / --tokens)")
    args = parser.parse_args()
    if args.overhead < 0:
        parser.error(f"--overhead must be a number of pairs >= 1 (0 = print the table), got {args.overhead}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.overhead:
        return per_probe_overhead(args, device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, d={args.dim}, "
          f"H={args.heads}, layers={args.layers}, rounds={args.rounds} (median, variants interleaved)")
    print("peers: " + ", ".join(f"{k} {_version(k)}" for k in PEERS))
    mem_label = "peak MiB" if device.type == "cuda" or args.memory else "mem"
    print(f"{'model':8} {'N':>4} {'variant':16} {'probes/s':>9} {'x hooks':>8} {'x cpu':>8} {mem_label:>9} "
          f"{'agreement':>10}")
    for name, n, case in cases(args, device):
        probes = case.probes()
        variants = variants_for(case, args.backend)
        if args.variants:
            variants = {k: v for k, v in variants.items() if k in args.variants.split(",") or k == "hooks batched"}
        with torch.no_grad():
            clean = case.run(1)
        outs, times, peaks = {}, {label: [] for label in variants}, {}
        cpu = {label: [] for label in variants}  # process CPU time: less sensitive to other load
        for label, fn in variants.items():  # warm-up (wrappers built, allocator primed); its output is compared
            outs[label] = fn(case, probes)
        for _ in range(args.rounds):
            for label, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(case, probes)
                _sync(device)
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
                if device.type == "cuda":
                    peaks[label] = torch.cuda.max_memory_allocated(device)
        if device.type == "cpu" and args.memory:
            peaks = {label: cpu_peak_bytes(lambda: fn(case, probes)) for label, fn in variants.items()}
        reference = outs["hooks batched"]
        effect = (reference - clean).abs().max().item()
        base = statistics.median(times["hooks batched"])
        base_cpu = statistics.median(cpu["hooks batched"])
        for label in variants:
            seconds = statistics.median(times[label])
            cpu_ratio = base_cpu / statistics.median(cpu[label])
            agree = (outs[label] - reference).abs().max().item() / max(effect, 1e-30)
            mem = f"{peaks[label] / 2**20:9.2f}" if label in peaks else f"{'n/a':>9}"
            print(f"{name:8} {n:4d} {label:16} {len(probes) / seconds:9.1f} {base / seconds:8.2f} "
                  f"{cpu_ratio:8.2f} {mem} {agree:10.1e}", flush=True)


def cases(args, device):
    """(model name, tokens, Case) for every --models x --tokens pair; HF models are skipped, with a line saying
    so, when transformers is not installed."""
    for name in args.models.split(","):
        if name.startswith("hf-") and not PEERS["transformers"]:
            print(f"{name}: skipped (transformers is not installed; pip install -e .[peers])")
            continue
        for n in (int(t) for t in args.tokens.split(",")):
            yield name, n, build_case(name, n, args, device)


def per_probe_overhead(args, device) -> None:
    """What one probe of each loop form costs on top of the plain forward it runs, in microseconds: the median,
    over PAIRS rounds, of (one probe) - (one plain forward at batch 1) measured back to back, with the variants'
    order shuffled each round. On a tiny model the forward is short, so the difference is the library's
    per-probe work (building, entering and leaving a trace / an nnsight trace / a hook, the interception and
    the edit) with little noise from the forward itself; compare it with the forward's own time at real sizes."""
    import random

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, d={args.dim}, "
          f"H={args.heads}, layers={args.layers}, {args.overhead} pairs (median of paired differences)")
    print("peers: " + ", ".join(f"{k} {_version(k)}" for k in PEERS))
    print(f"{'model':8} {'N':>4} {'variant':16} {'forward us':>10} {'+ us/probe':>11}")
    rng = random.Random(0)
    for name, n, case in cases(args, device):
        probe = [(min(1, case.layers - 1), min(1, case.heads - 1))]
        loops = {label: fn for label, fn in variants_for(case, args.backend).items() if "loop" in label}
        if args.variants:
            loops = {k: v for k, v in loops.items() if k in args.variants.split(",")}

        def plain():
            with torch.no_grad():
                case.run(1)

        for fn in loops.values():
            fn(case, probe)
        plain()
        extra = {label: [] for label in loops}
        forward = []
        for _ in range(args.overhead):
            order = list(loops)
            rng.shuffle(order)
            for label in order:
                _sync(device)
                t0 = time.perf_counter()
                plain()
                _sync(device)
                t1 = time.perf_counter()
                loops[label](case, probe)
                _sync(device)
                t2 = time.perf_counter()
                forward.append(t1 - t0)
                extra[label].append((t2 - t1) - (t1 - t0))
        for label in loops:
            print(f"{name:8} {n:4d} {label:16} {statistics.median(forward) * 1e6:10.0f} "
                  f"{statistics.median(extra[label]) * 1e6:11.0f}", flush=True)


def _version(module: str) -> str:
    if not PEERS[module]:
        return "not installed"
    from importlib.metadata import version

    return version(module.replace("_", "-") if module == "transformer_lens" else module)


if __name__ == "__main__":
    main()
