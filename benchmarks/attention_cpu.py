"""CPU probed attention vs torch SDPA and eager (materialised-map) probing, on every micro-kernel path.

    .venv/bin/python benchmarks/attention_cpu.py [--sizes 1024 4096 8192] [--repeats 5] [--threads 2]
                                                 [--isa all|avx512 avx2 generic] [--torch-isa native|avx2]

B=1, H=8, D=64, float32. The fused kernel runs on every micro-kernel path this CPU supports (or those
named by --isa; the path is switched per call through LATENTFLOW_CPU_ISA). All variants of all paths
are timed INTERLEAVED (round-robin over variants in every repeat, so a load change on a shared machine
hits all of them alike); the tables show medians of wall time, one table per path, ratios against the
one SDPA measurement of the same run.

--torch-isa avx2 restarts the script with torch limited to AVX2 (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2): on an AVX-512 machine this is the closest stand-in
for an AVX2-only CPU, where SDPA and the eager baseline cannot use AVX-512 either.

The "CPU s" column is the process CPU time (all threads) of the call, a load-robust companion of the wall
time on a shared machine (note: OpenMP spin-waits in SDPA count as CPU time too).

Peak extra memory is measured separately, one call per variant: the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs before the call) minus its RSS before the call. It counts every allocation
the call touches (torch's and the native kernel's own packing buffers), not just torch tensors. The script
re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 so that glibc serves every large buffer with fresh
pages (otherwise reused heap pages would hide allocations from RSS).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from latentflow_fast import cpu_info, probed_attention
from latentflow_fast.ops import backend_cpu

B, H, D, G = 1, 8, 64, 8


def make_inputs(n: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    return dict(
        q=q, k=k, v=v,
        segments=torch.linspace(0, n, G + 1).round().long(),
        logit_scale=torch.rand(B, H, generator=gen) + 0.5,
        segment_bias=torch.randn(B, H, G, generator=gen),
        head_gate=torch.rand(B, H, generator=gen) + 0.5,
        out_bias=torch.randn(B, H, D, generator=gen),
        out_patch=torch.randn(B, H, n, D, generator=gen),
        patch_mask=torch.arange(H).expand(B, H) % 4 == 0,  # 2 of 8 heads patched
    )


def sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])


def sdpa_causal(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def cpu_plain(x):
    return probed_attention(x["q"], x["k"], x["v"], backend="cpu")


def cpu_probe(x):
    """lse + entropy + segment_mass (G=8) with every intervention active."""
    return probed_attention(
        x["q"], x["k"], x["v"], backend="cpu", segments=x["segments"], logit_scale=x["logit_scale"],
        segment_bias=x["segment_bias"], head_gate=x["head_gate"], out_bias=x["out_bias"],
        out_patch=x["out_patch"], patch_mask=x["patch_mask"], capture=("lse", "entropy", "segment_mass"),
    )


def cpu_key_mass(x):
    return probed_attention(x["q"], x["k"], x["v"], backend="cpu", capture=("key_mass",))


def cpu_causal(x):
    """causal=True: key tiles past each query tile's diagonal are skipped (about half of the dense work)."""
    return probed_attention(x["q"], x["k"], x["v"], backend="cpu", causal=True)


def eager_probe(x):
    """What hook-based probing does: materialise the [B, H, N, N] map, then reduce it (same statistics)."""
    q, k, v, bounds = x["q"], x["k"], x["v"], x["segments"].tolist()
    seg_of_key = torch.bucketize(torch.arange(k.shape[2]), x["segments"][1:], right=True)
    s = torch.matmul(q, k.transpose(-1, -2)) * (D**-0.5)
    s = s * x["logit_scale"][..., None, None] + x["segment_bias"][:, :, seg_of_key][:, :, None, :]
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-38))).sum(-1)
    seg_mass = torch.stack([p[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], dim=-1)
    o = torch.matmul(p, v)
    o = torch.where(x["patch_mask"][..., None, None], x["out_patch"], o)
    out = o * x["head_gate"][..., None, None] + x["out_bias"][:, :, None, :]
    return out, {"lse": lse, "entropy": entropy, "segment_mass": seg_mass}


# Variants run on every micro-kernel path (name -> function); SDPA and eager run once.
KERNEL_VARIANTS = {
    "cpu, no capture": cpu_plain,
    "cpu, lse+entropy+seg_mass, all interventions": cpu_probe,
    "cpu, key_mass": cpu_key_mass,
    "cpu, causal, no capture": cpu_causal,
}
SDPA = "torch SDPA (no capture)"
SDPA_CAUSAL = "torch SDPA is_causal (no capture)"
EAGER = "eager capture (materialised map)"
TORCH_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def on_isa(fn, isa: str):
    """fn run with the fused kernel forced onto micro-kernel path `isa`."""

    def run(x):
        before = os.environ.get(backend_cpu.ISA_ENV)
        os.environ[backend_cpu.ISA_ENV] = isa
        try:
            return fn(x)
        finally:
            if before is None:
                del os.environ[backend_cpu.ISA_ENV]
            else:
                os.environ[backend_cpu.ISA_ENV] = before

    return run


def cpu_flags() -> str:
    """The vector-ISA flags of /proc/cpuinfo that matter here (x86), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    wanted = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl")
    return " ".join(f"{name}={'yes' if name in flags else 'no'}" for name in wanted)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_mb(fn, x) -> float:
    """Peak RSS during one call minus RSS before it (MB); NaN where /proc/self/clear_refs is unavailable."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    result = fn(x)
    peak = _status_kb("VmHWM")
    del result
    return (peak - before) / 1024


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", nargs="+", default=["all"],
                        help="micro-kernel paths to time: all (every path this CPU runs) or some of avx512 avx2 generic")
    parser.add_argument("--torch-isa", choices=("native", "avx2"), default="native",
                        help="avx2: limit torch (SDPA, eager) to AVX2, standing in for an AVX2-only CPU")
    parser.add_argument("--eager-max-n", type=int, default=4096,
                        help="skip eager capture above this N (it needs several [H,N,N] float32 maps: ~2.1 GB each at 8192)")
    args = parser.parse_args()
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring (memory method)
    if args.torch_isa == "avx2":
        env.update(TORCH_AVX2_ENV)
    if any(os.environ.get(key) != value for key, value in env.items()):
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    supported = backend_cpu.supported_isas()
    isas = supported if args.isa == ["all"] else args.isa
    for isa in isas:
        if isa not in backend_cpu.ISA_NAMES:
            parser.error(f"--isa: unknown path {isa!r}; expected all or some of {', '.join(backend_cpu.ISA_NAMES)}")
        if isa not in supported:
            parser.error(f"--isa: this CPU cannot run the {isa} path (supported: {', '.join(supported)})")
    torch.set_num_threads(args.threads)

    info = cpu_info()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {info['cpu']}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, B={B} H={H} D={D} float32, G={G}")
    print(f"# CPU flags: {cpu_flags()}")
    print(f"# fused kernel: paths this CPU runs {', '.join(info['supported'])} (auto = {info['isa']}); timed: {', '.join(isas)}")
    print(f"# torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"
          + (" (limited with --torch-isa avx2)" if args.torch_isa == "avx2" else ""))
    print(f"# load average at start: {load_average()}")
    header = (f"{'N':>6} | {'path':<7} | {'variant':<46} | {'median ms':>10} | {'x SDPA':>7} | {'GFLOP/s':>8} | "
              f"{'CPU s':>7} | {'CPU x SDPA':>10} | {'peak extra MB':>13}")
    for n in args.sizes:
        x = make_inputs(n)
        variants = {("torch", SDPA): sdpa, ("torch", SDPA_CAUSAL): sdpa_causal}
        for isa in isas:
            for name, fn in KERNEL_VARIANTS.items():
                variants[(isa, name)] = on_isa(fn, isa)
        if n <= args.eager_max_n:
            variants[("torch", EAGER)] = eager_probe
        for fn in variants.values():  # warm-up
            fn(x)
        times = {key: [] for key in variants}
        cpu_times = {key: [] for key in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(x)
                times[key].append(time.perf_counter() - start)
                cpu_times[key].append(time.process_time() - start_cpu)
        med = {key: statistics.median(t) for key, t in times.items()}
        cpu_med = {key: statistics.median(t) for key, t in cpu_times.items()}
        flops = 4 * B * H * n * n * D  # QK^T and PV
        base, cpu_base = med[("torch", SDPA)], cpu_med[("torch", SDPA)]

        def row(key):
            mem = peak_extra_mb(variants[key], x)
            return (f"{n:>6} | {key[0]:<7} | {key[1]:<46} | {med[key] * 1e3:>10.1f} | {med[key] / base:>7.2f} | "
                    f"{flops / med[key] / 1e9:>8.1f} | {cpu_med[key]:>7.3f} | {cpu_med[key] / cpu_base:>10.2f} | {mem:>13.1f}")

        print()
        print(header)
        print("-" * len(header))
        print(row(("torch", SDPA)))
        print(row(("torch", SDPA_CAUSAL)))
        if ("torch", EAGER) in variants:
            print(row(("torch", EAGER)))
        else:
            print(f"{n:>6} | {'torch':<7} | {EAGER:<46} | skipped: needs several [H,N,N] float32 maps (2.1 GB each at N=8192)")
        for isa in isas:
            for name in KERNEL_VARIANTS:
                print(row((isa, name)))
        for isa in isas:
            plain, probe, km, causal = (med[(isa, name)] for name in KERNEL_VARIANTS)
            cpu_plain_s, cpu_km_s = cpu_med[(isa, "cpu, no capture")], cpu_med[(isa, "cpu, key_mass")]
            line = (f"# N={n} {isa}: no capture {plain / base:.2f}x SDPA, probe {probe / base:.2f}x SDPA; "
                    f"key_mass pass adds {(km - plain) / plain:.2f}x of the forward "
                    f"({(cpu_km_s - cpu_plain_s) / cpu_plain_s:.2f}x in CPU time)")
            if ("torch", EAGER) in med:
                line += f"; probe is {med[('torch', EAGER)] / probe:.1f}x faster than eager"
            print(line)
            cpu_causal_s = cpu_med[(isa, "cpu, causal, no capture")]
            print(f"# N={n} {isa}: causal / dense = {causal / plain:.2f} in wall time, "
                  f"{cpu_causal_s / cpu_plain_s:.2f} in CPU time (torch SDPA is_causal / dense: "
                  f"{med[('torch', SDPA_CAUSAL)] / base:.2f} wall, "
                  f"{cpu_med[('torch', SDPA_CAUSAL)] / cpu_base:.2f} CPU)")
    print(f"# load average at end: {load_average()}")


if __name__ == "__main__":
    main()
