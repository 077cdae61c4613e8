#!/usr/bin/env python
"""Probe throughput: the probe engine against a competent hook loop, and what the engine skips.

One clean trajectory (16 midpoint steps = 32 evaluations) of a shipped model on a held-out mixture, and the
local-effect sweep of every single-head ablation and single-head logit-scale probe (values 0 and 2: uniform
and sharpened attention, i.e. temperatures inf and 1/2) at every attention site, branching at a few
evaluations. Local effect = the change of the predicted velocity at the branch evaluation. Variants,
interleaved (round robin, medians over rounds):

  engine              ProbeEngine.sweep, exact mode (bitwise batch invariant), prefix reuse on
  engine fast         the same with exact=False (all intra-op threads)
  engine no prefix    exact, prefix reuse off: every batch runs every layer
  engine N workers    exact, the probes spread over N single-threaded worker processes (--workers; the pool
                      is started before timing, its start-up time is printed separately)
  hook loop           what a competent hook user writes: one forward per probe at batch 1, torch SDPA at every
                      site; at the hooked site SDPA runs too and only the probed head is edited (its output
                      zeroed, or recomputed by SDPA with the scaled logit scale, or the mean of V for
                      logit scale 0). No attention map is materialised anywhere.
  batched hooks       the same hooks on batches of probes (one row per probe, rows indexed in the hook)

Also measured: the engine's cost per probe against one plain batched forward (SDPA, nothing probed) of only
the layers the batch recomputes, and the clean trajectory with captures against a plain sampler run.

    python benchmarks/probe_throughput.py --model small --evaluations 0,8,16,24
    python benchmarks/probe_throughput.py --model tiny --evaluations 8 --rounds 1   # quick
    python benchmarks/probe_throughput.py --workers 2 --workers-only   # exact with 2 workers vs fast, 2 threads
    python benchmarks/probe_throughput.py --clean-only --rounds 5   # clean trajectory vs plain sampler only
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from latentflow_fast.data import dataset_for
from latentflow_fast.models import load_model
from latentflow_fast.models.attention import sdpa
from latentflow_fast.ops import backend_cpu
from latentflow_fast.probe import Clip, Probe, ProbeEngine

LOGIT_SCALES = (0.0, 2.0)  # uniform, sharpened (temperature inf, 1/2)


def sweep_probes(sites, num_heads: int, evaluations) -> list[Probe]:
    """Every single-head ablation and logit-scale probe at every site and evaluation."""
    probes = []
    for e in evaluations:
        for site in sites:
            for h in range(num_heads):
                probes.append(Probe(site, "head_ablation", heads=(h,), evaluation=e))
                probes += [Probe(site, "logit_scale", heads=(h,), value=v, evaluation=e) for v in LOGIT_SCALES]
    return probes


def hooked_attention(rows_by_site):
    """A router handler: SDPA everywhere; at a hooked site, only the hooked rows' heads are edited."""
    def handler(site, q, k, v, mask):
        out = sdpa(q, k, v, mask)
        for r, p in rows_by_site.get(site, ()):
            h = p.heads[0]
            if p.intervention == "head_ablation":
                out[r, h] = 0.0
            elif p.value == 0.0:  # uniform attention over the unmasked keys: the mean of V
                keep = None if mask is None else mask[r].to(v.dtype)
                vv = v[r, h]
                out[r, h] = vv.mean(0) if keep is None else (keep[:, None] * vv).sum(0) / keep.sum()
            else:
                m = None if mask is None else mask[r:r + 1, None, None, :]
                scale = p.value / math.sqrt(q.shape[-1])
                out[r, h] = F.scaled_dot_product_attention(q[r:r + 1, h:h + 1].contiguous(),
                                                           k[r:r + 1, h:h + 1].contiguous(),
                                                           v[r:r + 1, h:h + 1].contiguous(),
                                                           attn_mask=m, scale=scale)[0, 0]
        return out
    return handler


def hooked_forward(model, inputs, state, t, probes):
    """One forward of len(probes) rows (row r carries probes[r]) with the hooks installed."""
    rows_by_site: dict = {}
    for r, p in enumerate(probes):
        rows_by_site.setdefault(p.site, []).append((r, p))
    router = model.attention_router
    handler = hooked_attention(rows_by_site)
    for site in rows_by_site:
        router.handlers[site] = handler
    try:
        R = state.shape[0]
        return model(state, torch.full((R,), t), inputs.mixture.expand(R, -1, -1), inputs.text.expand(R, -1, -1),
                     inputs.text_mask.expand(R, -1))
    finally:
        router.handlers.clear()


CLEAN_CAPTURES = dict(capture=("entropy", "segment_mass"), capture_sites="*", cache_heads=())


def clean_only(model, clip, rounds: int) -> None:
    """The clean trajectory with the default captures (exact engine) against `model.separate`, interleaved."""
    engine = ProbeEngine(model)
    started = time.perf_counter()
    first = engine.trajectory(clip, steps=16, **CLEAN_CAPTURES)  # a fresh engine: includes the thread check
    first_s = time.perf_counter() - started
    fns = {"clean trajectory, captures": lambda: engine.trajectory(clip, steps=16, **CLEAN_CAPTURES),
           "plain sampler run": lambda: model.separate(clip.mixture, clip.sample_rate, clip.prompt, steps=16)}
    fns["plain sampler run"]()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    print(f"\n| run | median ms | rounds (ms) |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.0f} | {', '.join(f'{1e3 * t:.0f}' for t in ts)} |")
    ratios = [a / b for a, b in zip(*times.values())]
    print(f"\nfirst trajectory of a fresh engine (includes the one-evaluation thread check): {1e3 * first_s:.0f} ms; "
          f"the clean trajectory ran on {first.threads} intra-op thread(s)")
    print(f"target: clean trajectory with captures / plain sampler <= 1.3: "
          f"{statistics.median(times['clean trajectory, captures']) / statistics.median(times['plain sampler run']):.2f} "
          f"(medians); per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluations", default="0,8,16,24", help="comma list of branch evaluations")
    parser.add_argument("--hook-probes", type=int, default=64, help="probes timed in the batch-1 hook loop")
    parser.add_argument("--workers", type=int, default=None,
                        help="also time exact mode over this many worker processes (default: --threads; 1 = not)")
    parser.add_argument("--workers-only", action="store_true",
                        help="time only engine, engine fast and engine with workers (the exact/fast comparison)")
    parser.add_argument("--clean-only", action="store_true",
                        help="time only the clean trajectory with captures against the plain sampler run")
    args = parser.parse_args(argv)
    workers = args.threads if args.workers is None else args.workers
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    data = dataset_for(model)
    m = data.make_mixture(data.eval_seeds(1)[0])
    clip = Clip("bench", torch.from_numpy(m.mixture), m.sample_rate, m.prompt)
    if args.clean_only:
        print(f"model {args.model}: {model.config.n_layers} layers x {model.config.n_heads} heads, "
              f"D={model.config.dim}, {args.threads} threads, torch {torch.__version__}, {args.rounds} rounds")
        print(f"# {backend_cpu.describe_path()}")
        return clean_only(model, clip, args.rounds)
    engine = ProbeEngine(model)
    fast = ProbeEngine(model, exact=False)
    full = ProbeEngine(model, prefix_reuse=False)
    pooled = ProbeEngine(model, workers=workers) if workers > 1 else None
    traj = engine.trajectory(clip, steps=16, method="midpoint")
    evaluations = [int(e) for e in args.evaluations.split(",")]
    if any(not 0 <= e < traj.num_evaluations for e in evaluations):
        parser.error(f"--evaluations must lie in [0, {traj.num_evaluations})")
    probes = sweep_probes(engine.sites, engine.num_heads, evaluations)
    subset = probes[:: max(1, len(probes) // args.hook_probes)][: args.hook_probes]
    R = args.batch_size
    cpu = platform.processor() or platform.machine()
    print(f"model {args.model}: {model.config.n_layers} layers x {model.config.n_heads} heads, D={model.config.dim}, "
          f"T={traj.states[0].shape[1]} frames, evaluations {evaluations}, {len(probes)} probes, batch {R}, "
          f"{args.threads} threads, torch {torch.__version__}, {cpu}")
    print(f"# {backend_cpu.describe_path()}")

    def hook_loop():
        with torch.no_grad():
            for p in subset:
                hooked_forward(model, traj.inputs, traj.states[p.evaluation], traj.schedule[p.evaluation][1], [p])

    def batched_hooks():
        with torch.no_grad():
            by_eval: dict = {}
            for p in probes:
                by_eval.setdefault(p.evaluation, []).append(p)
            for e, group in by_eval.items():
                for i in range(0, len(group), R):
                    rows = group[i:i + R]
                    state = traj.states[e].expand(len(rows), -1, -1).contiguous()
                    hooked_forward(model, traj.inputs, state, traj.schedule[e][1], rows)

    variants = {
        "engine": (lambda: engine.sweep(traj, probes, progress=False, batch_size=R), len(probes)),
        "engine fast": (lambda: fast.sweep(traj, probes, progress=False, batch_size=R), len(probes)),
        "engine no prefix": (lambda: full.sweep(traj, probes, progress=False, batch_size=R), len(probes)),
        "hook loop": (hook_loop, len(subset)),
        "batched hooks": (batched_hooks, len(probes)),
    }
    if pooled is not None:
        from latentflow_fast.probe.workers import pool_for

        started = time.perf_counter()
        pool_for(pooled)  # worker start-up is paid once per engine, not per sweep: timed apart
        print(f"# {workers} worker processes started in {time.perf_counter() - started:.1f} s")
        variants[f"engine {workers} workers"] = (
            lambda: pooled.sweep(traj, probes, progress=False, batch_size=R), len(probes))
    if args.workers_only:
        variants = {k: v for k, v in variants.items() if k.startswith("engine") and k != "engine no prefix"}

    # engine cost per probe vs a plain batched forward of only the layers a batch recomputes
    layer = model.config.n_layers // 2
    e0 = evaluations[len(evaluations) // 2]
    site = f"layers.{layer}.self_attn"
    batch = [Probe(site, "head_ablation", heads=(i % engine.num_heads,), value=0.01 * i, evaluation=e0)
             for i in range(R)]
    hidden = traj.layer_inputs[e0][layer].expand(R, -1, -1).contiguous()
    state = traj.states[e0].expand(R, -1, -1).contiguous()

    def plain_partial():
        with torch.no_grad():
            model(state, torch.full((1,), traj.schedule[e0][1]), traj.inputs.mixture, traj.inputs.text,
                  traj.inputs.text_mask, start_layer=layer, hidden=hidden)

    forwards = {"probed batch (engine, exact)": lambda: engine.run_batch(traj, e0, batch),
                "probed batch (engine, fast)": lambda: fast.run_batch(traj, e0, batch),
                "plain forward of the same layers": plain_partial,
                "clean trajectory, captures": lambda: engine.trajectory(clip, **CLEAN_CAPTURES),
                "plain sampler run": lambda: model.separate(clip.mixture, clip.sample_rate, clip.prompt, steps=16)}
    times: dict = {name: [] for name in list(variants) + list(forwards)}
    if args.workers_only:
        forwards = {}
    for _ in range(args.rounds):
        for name, (fn, _count) in variants.items():
            times[name].append(timed(fn))
        for name, fn in forwards.items():
            times[name].append(statistics.median(timed(fn) for _ in range(3)))

    rate = {name: count / statistics.median(times[name]) for name, (_fn, count) in variants.items()}
    base = "hook loop" if "hook loop" in rate else "engine fast"
    print(f"\n| variant | probes timed | median s | probes/s | x {base} |\n|---|---|---|---|---|")
    for name, (_fn, count) in variants.items():
        print(f"| {name} | {count} | {statistics.median(times[name]):.3f} | {rate[name]:.1f} | "
              f"{rate[name] / rate[base]:.2f} |")
    if pooled is not None:
        print(f"\ntarget: exact mode with {workers} workers / fast mode ({args.threads} threads) >= 0.9: "
              f"{rate[f'engine {workers} workers'] / rate['engine fast']:.2f} "
              f"(exact in one process: {rate['engine'] / rate['engine fast']:.2f})")
        pooled.close()
    if args.workers_only:
        return
    med = {name: statistics.median(times[name]) for name in forwards}
    print(f"\n| forward | ms |\n|---|---|")
    for name in forwards:
        print(f"| {name} | {1e3 * med[name]:.1f} |")
    best = max(rate["engine"], rate["engine fast"])
    print(f"\ntargets: engine >= 3x hook loop: {best / rate['hook loop']:.2f}x | "
          f"engine batch / plain forward of the same layers <= 1.2: exact "
          f"{med['probed batch (engine, exact)'] / med['plain forward of the same layers']:.2f}, fast "
          f"{med['probed batch (engine, fast)'] / med['plain forward of the same layers']:.2f} | "
          f"prefix reuse >= 1.6x: {rate['engine'] / rate['engine no prefix']:.2f}x | "
          f"exact / fast: {rate['engine'] / rate['engine fast']:.2f} | "
          f"clean trajectory with captures / plain sampler <= 1.3: "
          f"{med['clean trajectory, captures'] / med['plain sampler run']:.2f}")


if __name__ == "__main__":
    main()
