"""Probed-attention kernels vs torch SDPA on a GPU: one command, one table.

    python benchmarks/attention_gpu.py                 # H100-class GPU: the full table (bf16)
    python benchmarks/attention_gpu.py --n 8192 --d 128
    python benchmarks/attention_gpu.py --smoke         # no GPU: tiny sizes on CPU, Triton interpreter

Fixed work B*H*N (default 16 heads x 16384 tokens), N in {1024, 4096, 8192, 16384}, D in {64, 128}.
Per (N, D) it times, interleaved round-robin with CUDA events (median over rounds):
  sdpa            torch SDPA, the fastest of its flash / cuDNN / memory-efficient backends
  <be> plain      probed kernel of backend <be> (triton, cuda if built), no capture, no intervention
  <be> probe      lse + entropy + segment_mass captured, logit_scale/segment_bias/head_gate/out_bias applied
  <be> key_mass   key_mass captured (forward storing lse + the deterministic second pass)
  triton-tma      on sm_90+: the Triton forward with K/V tiles through TMA descriptors (BlockConfig.tma)
TFLOP/s counts the forward's two matmuls, 4*B*H*N^2*D, for every row. Targets (docs/design.md):
  probe >= 0.9x SDPA at N=8192 D=128;  probe overhead <= 10% over plain;  key_mass pass <= 0.6x plain.
Without CUDA (and without --smoke) it prints why and exits 0 having measured nothing.

Profiling the kernels (stable names: latentflow_probed_attn_fwd, latentflow_probed_attn_key_mass):
    nsys profile -o probed python benchmarks/attention_gpu.py --n 8192 --d 128 --rounds 3
    ncu --kernel-name regex:latentflow_probed_attn --launch-skip 10 --launch-count 4 --set full \
        python benchmarks/attention_gpu.py --n 8192 --d 128 --rounds 3 --backends triton
Offline (no GPU): registers/spills/shared memory per config: python -m latentflow_fast.kernels.triton_codegen
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", help="sequence lengths (default 1024 4096 8192 16384)")
    parser.add_argument("--d", type=int, nargs="+", help="head dims (default 64 128)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16 * 16384, help="fixed work B*H*N")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (median taken)")
    parser.add_argument("--min-ms", type=float, default=2.0, help="each timing sample repeats a call for at least this long")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], help="probed backends to time if available")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script itself on CPU: tiny float32 sizes, Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.d = args.n or [32, 48], args.d or [16, 32]
        args.heads, args.tokens, args.rounds, args.min_ms = 2, 256, 2, 0.0
    args.n, args.d = args.n or [1024, 4096, 8192, 16384], args.d or [64, 128]
    return args


class Timer:
    """Times fn() in milliseconds: CUDA events on a GPU, perf_counter on CPU (smoke mode)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            begin, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin, end
        return time.perf_counter(), None

    def stop(self, token):
        begin, end = token
        if self.cuda:
            end.record()
            return lambda: begin.elapsed_time(end)
        elapsed = (time.perf_counter() - begin) * 1e3
        return lambda: elapsed


def sdpa_candidates(torch):
    """(name, callable) for each SDPA backend usable on these shapes; callers keep the fastest."""
    F = torch.nn.functional
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return [("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v))]
    out = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            def run(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            out.append((f"sdpa[{name.split('_')[0].lower()}]", run))
    return out


def make_plans(torch, build_plan, B, H, N, D, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, device=device).to(dtype) for _ in range(3))
    segments = torch.tensor(sorted({0, min(77, N - 1), N // 2, N}), device=device)  # text prefix, audio halves
    G = segments.numel() - 1
    idx = torch.arange(B * H, device=device)
    interventions = dict(
        logit_scale=(1.0 + 0.25 * (idx % 3)).reshape(B, H).float(),
        segment_bias=torch.randn(B, H, G, generator=gen, device=device),
        head_gate=(idx % 5 != 0).reshape(B, H).float(),
        out_bias=torch.randn(B, H, D, generator=gen, device=device),
    )
    plans = {
        "plain": build_plan(q, k, v),
        "probe": build_plan(q, k, v, segments=segments, capture=("lse", "entropy", "segment_mass"), **interventions),
        "key_mass": build_plan(q, k, v, capture=("key_mass",)),
    }
    return (q, k, v), plans


def time_variants(timer, variants, rounds, min_ms):
    """Median ms per call of each variant, timed round-robin so drift hits every variant alike."""
    inner = {}
    for name, fn in variants.items():  # warm-up (compiles kernels) and calibrate repeats per sample
        fn()
        timer.sync()
        token = timer.start()
        fn()
        once = timer.stop(token)
        timer.sync()
        inner[name] = max(1, math.ceil(min_ms / max(once(), 1e-3)))
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        pending = []
        for name, fn in variants.items():
            token = timer.start()
            for _ in range(inner[name]):
                fn()
            pending.append((name, timer.stop(token)))
        timer.sync()
        for name, elapsed in pending:
            samples[name].append(elapsed() / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def rel_error(torch, a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is imported
    sys.path.insert(0, str(ROOT))
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("attention_gpu: no CUDA device here, nothing measured. This benchmark times GPU kernels; run it on a "
              "GPU machine (or use --smoke to check the script on CPU under the Triton interpreter).")
        return 0
    from latentflow_fast.ops import backends, build_plan

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    if args.smoke:
        torch.set_num_threads(1)
    timer = Timer(torch, device)
    probed = [b for b in args.backends if backends.unavailable_reason(b, device.type) is None]
    skipped = {b: backends.unavailable_reason(b, device.type) for b in args.backends if b not in probed}

    # On sm_90+ the Triton forward is also timed with TMA loads (BlockConfig.tma), so that one run gives the
    # evidence to switch the tile table's rows (backend_triton._TILES) on or off.
    from latentflow_fast.ops import backend_triton
    from dataclasses import replace

    def tma_config(plan):
        pad = backend_triton._pow2
        return replace(backend_triton.forward_config(pad(plan.head_dim), pad(plan.value_dim), plan.q.dtype,
                                                     torch.cuda.get_device_capability(device)), tma=True)

    timed_backends = list(probed)
    if "triton" in probed and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        timed_backends.append("triton-tma")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        where = "CPU, Triton interpreter (smoke test of the script: timings mean nothing)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    print(f"# probed attention vs SDPA on {where}")
    print(f"# torch {torch.__version__}, triton {triton_version}, dtype {str(dtype).replace('torch.', '')}, "
          f"B*H*N = {args.tokens}, H = {args.heads}, median of {args.rounds} interleaved rounds")
    for name, reason in skipped.items():
        print(f"# backend {name} not timed: {reason}")
    print()
    header = ("N", "D", "B", "variant", "ms", "TFLOP/s", "x SDPA", "vs plain", "target", "check")
    rows = []
    misses = 0
    for N in args.n:
        for D in args.d:
            B = max(1, args.tokens // (args.heads * N))
            (q, k, v), plans = make_plans(torch, build_plan, B, args.heads, N, D, dtype, device)
            flops = 4.0 * B * args.heads * N * N * D

            # SDPA: keep the fastest backend that runs on these shapes.
            sdpa_times = {}
            for name, fn in sdpa_candidates(torch):
                try:
                    fn(q, k, v)
                    timer.sync()
                except Exception:  # backend not supported for this dtype/shape/device
                    continue
                sdpa_times[name] = time_variants(timer, {name: lambda fn=fn: fn(q, k, v)}, 3, args.min_ms)[name]
            candidates = dict(sdpa_candidates(torch))
            if not sdpa_times:  # no restricted backend ran: let SDPA choose
                candidates["sdpa[default]"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
                sdpa_times["sdpa[default]"] = 0.0
            sdpa_name = min(sdpa_times, key=sdpa_times.get)
            sdpa_fn = candidates[sdpa_name]
            expected = sdpa_fn(q, k, v)

            variants = {sdpa_name: lambda: sdpa_fn(q, k, v)}
            checks = {sdpa_name: "-"}
            for be in probed:
                run = backends.runner(be)
                for kind, plan in plans.items():
                    variants[f"{be} {kind}"] = lambda run=run, plan=plan: run(plan)
                err = rel_error(torch, run(plans["plain"])[0], expected)
                ok = err <= (1e-5 if dtype == torch.float32 else 2e-2)
                checks.update({f"{be} {kind}": "ok" if ok else f"BAD {err:.1e}" for kind in plans})
            if "triton-tma" in timed_backends:  # the Hopper variant: K/V tiles through TMA descriptors
                tma_run = lambda plan: backend_triton.run(plan, tma_config(plan))
                for kind, plan in plans.items():
                    variants[f"triton-tma {kind}"] = lambda plan=plan: tma_run(plan)
                err = rel_error(torch, tma_run(plans["plain"])[0], expected)
                checks.update({f"triton-tma {kind}": "ok" if err <= 2e-2 else f"BAD {err:.1e}" for kind in plans})
            times = time_variants(timer, variants, args.rounds, args.min_ms)

            for name, ms in times.items():
                tflops = flops / (ms * 1e-3) / 1e12
                vs_sdpa = times[sdpa_name] / ms
                vs_plain, target = "", ""
                if name != sdpa_name:
                    be, kind = name.split(" ")
                    plain = times[f"{be} plain"]
                    if kind == "probe":
                        overhead = ms / plain - 1.0
                        vs_plain = f"+{overhead * 100:.1f}%"
                        goals = [("overhead<=10%", overhead <= 0.10)]
                        if N == 8192 and D == 128:
                            goals.append((">=0.9x SDPA", vs_sdpa >= 0.9))
                        target = ", ".join(f"{g} {'PASS' if ok else 'MISS'}" for g, ok in goals)
                        misses += sum(not ok for _, ok in goals)
                    elif kind == "key_mass":
                        pass_ratio = (ms - plain) / plain
                        vs_plain = f"pass {pass_ratio:.2f}x"
                        target = f"pass<=0.6x {'PASS' if pass_ratio <= 0.6 else 'MISS'}"
                        misses += pass_ratio > 0.6
                rows.append((N, D, B, name, f"{ms:.3f}", f"{tflops:.1f}", f"{vs_sdpa:.2f}", vs_plain, target,
                             checks[name]))
            del q, k, v, plans, expected

    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    print("TFLOP/s = 4*B*H*N^2*D / time (forward matmuls) for every row; 'pass' = (key_mass - plain) / plain.")
    # Evidence for the dispatch table (latentflow_fast.ops.backends.GPU_DISPATCH): the faster probed
    # backend per shape and variant, from this run's medians.
    timed = {(r[0], r[1], r[3]): float(r[4]) for r in rows}
    winners = []
    for N in args.n:
        for D in args.d:
            for kind in ("plain", "probe", "key_mass"):
                candidates = {be: timed[(N, D, f"{be} {kind}")] for be in timed_backends
                              if (N, D, f"{be} {kind}") in timed}
                if len(candidates) > 1:
                    best = min(candidates, key=candidates.get)
                    ratios = ", ".join(f"{be} {ms / candidates[best]:.2f}x" for be, ms in sorted(candidates.items()))
                    winners.append(f"#   N={N} D={D} {kind}: {best} ({ratios})")
    if winners:
        print(f"# dispatch evidence on {where}, {str(dtype).replace('torch.', '')} (time relative to the faster):")
        print("\n".join(winners))
    if args.smoke:
        print("smoke run: CPU + Triton interpreter, timings are meaningless; the table format and plumbing are checked.")
    else:
        print(f"targets missed: {misses}" if misses else "all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
