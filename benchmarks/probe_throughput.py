"""Probe throughput: the batched engine vs hook-based probing as hook-library users write it today.

One clean trajectory of the tiny default model (16 midpoint steps = 32 evaluations), and a sweep of
layers x heads x evaluations x {head ablation, cross-attention text-token knockout, uniform self-attention}
measuring the local effect (change of the predicted velocity). Variants, measured interleaved (round robin,
medians over rounds):

  engine         ProbeEngine.sweep: probes as rows of one batch, fused probed attention, per-row arguments
                 (exact=True, the default: bitwise batch invariant, forwards on one intra-op thread)
  engine fast    the same with exact=False: forwards on all threads (last-bit batch dependence)
  hook loop      one forward per probe at batch 1; attention computed eagerly (materialised softmax) so that
                 hooks can edit the pattern / head outputs (what TransformerLens / nnsight / pyvene users run)
  batched hooks  the same eager hooks, but many probes per forward, hooks indexing batch rows

Also: the cost of a probed forward vs a plain (SDPA, nothing probed) forward at the same batch size.
The hook loop is timed on a subset of the probes (it is slow); probes/s is what is compared.

    python benchmarks/probe_throughput.py [--model tiny] [--batch-size 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from latentflow_fast.data.synthetic import EVAL_SEEDS, make_mixture
from latentflow_fast.models import load_model
from latentflow_fast.ops import backend_cpu
from latentflow_fast.probe import Clip, ProbeEngine, probe_grid, standard_probes
from latentflow_fast.probe.engine import expand_inputs


def eager_attention(q, k, v, key_padding_mask, edit_logits=None, edit_heads=None):
    """softmax(q k^T / sqrt(d)) v with the map materialised, and hook points on logits and head outputs."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)
    if edit_logits is not None:
        logits = edit_logits(logits)
    out = torch.softmax(logits, dim=-1) @ v
    if edit_heads is not None:
        out = edit_heads(out)
    return out


def hook_edits(rows):
    """Per-site edit functions for a list of (row index, probe): what a hook user writes by hand."""
    by_site: dict = {}
    for r, p in rows:
        by_site.setdefault(p.site, []).append((r, p))

    def make(site_rows):
        def edit_logits(logits):
            for r, p in site_rows:
                if p.intervention == "temperature":
                    heads = list(p.heads) if p.heads else slice(None)
                    scaled = logits[r, heads] * p.value
                    logits[r, heads] = torch.where(torch.isfinite(logits[r, heads]), scaled, logits[r, heads])
                elif p.intervention == "segment_knockout":
                    logits[r, :, :, list(p.segments)] = -math.inf
            return logits

        def edit_heads(out):
            for r, p in site_rows:
                heads = list(p.heads) if p.heads else slice(None)
                if p.intervention == "head_ablation":
                    out[r, heads] = 0.0
                elif p.intervention == "mean_ablation":  # (time-mean of the live output: a cheap stand-in)
                    out[r, heads] = out[r, heads].mean(dim=1, keepdim=True)
            return out

        return edit_logits, edit_heads

    return {site: make(site_rows) for site, site_rows in by_site.items()}


def hooked_forward(model, sites, inputs, state, t, rows):
    """Forward with eager attention at every site (hooks force it) and the rows' edits applied."""
    edits = hook_edits(rows)
    router = model.attention_router

    def handler(site, q, k, v, mask):
        edit_logits, edit_heads = edits.get(site, (None, None))
        return eager_attention(q, k, v, mask, edit_logits, edit_heads)

    for site in sites:
        router.handlers[site] = handler
    try:
        R = state.shape[0]
        time_ = torch.full((R,), t)
        return model(state, time_, inputs.mixture[:1].expand(R, -1, -1), inputs.text[:1].expand(R, -1, -1),
                     inputs.text_mask[:1].expand(R, -1))
    finally:
        router.handlers.clear()


def time_it(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hook-probes", type=int, default=96, help="probes timed for the hook loop")
    parser.add_argument("--min-probes", type=int, default=4096)
    parser.add_argument("--evaluations", default="all",
                        help='"all" or a comma list: time only probes branching at these evaluations')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    engine = ProbeEngine(model)
    fast = ProbeEngine(model, exact=False)
    m = make_mixture(EVAL_SEEDS.start)
    clip = Clip("bench", torch.from_numpy(m.mixture), m.sample_rate, m.prompt)
    traj = engine.trajectory(clip, steps=16, method="midpoint")
    L = traj.inputs.text.shape[1]
    probes = standard_probes(engine.sites, engine.num_heads, L, range(traj.num_evaluations),
                             ("head_ablation", "text_knockout", "uniform"))
    if len(probes) < args.min_probes:  # small models: add per-head temperatures and mean ablations
        probes += standard_probes(engine.sites, engine.num_heads, L, range(traj.num_evaluations), ("mean_ablation",))
        for value in (0.5, 2.0, 4.0):
            probes += probe_grid(engine.sites, engine.sites, {"intervention": "temperature", "value": value},
                                 range(traj.num_evaluations), heads=[(h,) for h in range(engine.num_heads)])
    if args.evaluations != "all":
        keep = {int(e) for e in args.evaluations.split(",")}
        probes = [p for p in probes if p.evaluation in keep]
    print(f"model {args.model}: {model.config.n_layers} layers x {model.config.n_heads} heads, "
          f"T={traj.states[0].shape[1]} frames, {traj.num_evaluations} evaluations, {len(probes)} probes, "
          f"batch {args.batch_size}, {args.threads} threads, backend {engine.backend}")
    print(f"# {backend_cpu.describe_path()}")

    subset = probes[:: max(1, len(probes) // args.hook_probes)][: args.hook_probes]
    R = args.batch_size
    batch = [p for p in probes if p.evaluation == 8][:R]
    state_R = traj.states[8].expand(len(batch), -1, -1).contiguous()
    inputs_R = expand_inputs(traj.inputs, len(batch))
    t8 = traj.schedule[8][1]

    def engine_sweep():
        engine.sweep(traj, probes, progress=False, batch_size=R)

    def engine_fast_sweep():
        fast.sweep(traj, probes, progress=False, batch_size=R)

    def hook_loop():
        with torch.no_grad():
            for p in subset:
                hooked_forward(model, engine.sites, traj.inputs, traj.states[p.evaluation],
                               traj.schedule[p.evaluation][1], [(0, p)])

    def batched_hooks():
        with torch.no_grad():
            by_eval: dict = {}
            for p in probes:
                by_eval.setdefault(p.evaluation, []).append(p)
            for e, group in by_eval.items():
                for i in range(0, len(group), R):
                    rows = group[i: i + R]
                    state = traj.states[e].expand(len(rows), -1, -1).contiguous()
                    hooked_forward(model, engine.sites, traj.inputs, state, traj.schedule[e][1], list(enumerate(rows)))

    def plain_forward():
        with torch.no_grad():
            model(state_R, torch.full((len(batch),), t8), inputs_R.mixture, inputs_R.text, inputs_R.text_mask)

    def probed_forward():
        engine.run_batch(traj, 8, batch)

    def probed_forward_fast():
        fast.run_batch(traj, 8, batch)

    variants = {"engine": (engine_sweep, len(probes)), "engine fast": (engine_fast_sweep, len(probes)),
                "hook loop": (hook_loop, len(subset)), "batched hooks": (batched_hooks, len(probes))}
    forwards = {"plain forward": plain_forward, "probed forward": probed_forward,
                "probed forward fast": probed_forward_fast}
    times: dict = {name: [] for name in list(variants) + list(forwards)}
    for _ in range(args.rounds):
        for name, (fn, _count) in variants.items():
            times[name].append(time_it(fn))
        for name, fn in forwards.items():
            times[name].append(statistics.median(time_it(fn) for _ in range(5)))

    rate = {name: count / statistics.median(times[name]) for name, (_fn, count) in variants.items()}
    print(f"\n{'variant':<16}{'probes':>8}{'median s':>12}{'probes/s':>12}{'engine x':>10}")
    for name, (_fn, count) in variants.items():
        med = statistics.median(times[name])
        print(f"{name:<16}{count:>8}{med:>12.3f}{rate[name]:>12.1f}{rate['engine'] / rate[name]:>10.2f}")
    plain = statistics.median(times["plain forward"])
    probed, probed_fast = statistics.median(times["probed forward"]), statistics.median(times["probed forward fast"])
    print(f"\nforward at batch {len(batch)}: plain {plain * 1e3:.1f} ms, probed {probed * 1e3:.1f} ms "
          f"({probed / plain:.3f}x), probed fast {probed_fast * 1e3:.1f} ms ({probed_fast / plain:.3f}x)")
    best = max(rate["engine"], rate["engine fast"])
    print(f"targets: engine >= 30x hook loop ({best / rate['hook loop']:.1f}x), "
          f">= 3x batched hooks ({best / rate['batched hooks']:.2f}x), "
          f"probed forward <= 1.15x plain ({min(probed, probed_fast) / plain:.3f}x)")


if __name__ == "__main__":
    main()
