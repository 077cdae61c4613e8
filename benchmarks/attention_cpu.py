"""CPU probed attention vs torch SDPA and eager (materialised-map) probing.

    .venv/bin/python benchmarks/attention_cpu.py [--sizes 1024 4096 8192] [--repeats 5] [--threads 2]

B=1, H=8, D=64, float32. Variants are timed INTERLEAVED (round-robin over variants in every repeat, so
a load change on a shared machine hits all of them alike); the table shows medians of wall time.

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

from latentflow_fast import probed_attention

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


VARIANTS = {
    "torch SDPA (no capture)": sdpa,
    "cpu, no capture": cpu_plain,
    "cpu, lse+entropy+seg_mass, all interventions": cpu_probe,
    "cpu, key_mass": cpu_key_mass,
    "eager capture (materialised map)": eager_probe,
}


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
    parser.add_argument("--eager-max-n", type=int, default=4096,
                        help="skip eager capture above this N (it needs several [H,N,N] float32 maps: ~2.1 GB each at 8192)")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring (memory method)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.set_num_threads(args.threads)

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, B={B} H={H} D={D} float32, G={G}")
    print(f"# load average at start: {load_average()}")
    header = (f"{'N':>6} | {'variant':<46} | {'median ms':>10} | {'x SDPA':>7} | {'GFLOP/s':>8} | "
              f"{'CPU s':>7} | {'CPU x SDPA':>10} | {'peak extra MB':>13}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        x = make_inputs(n)
        variants = {name: fn for name, fn in VARIANTS.items() if fn is not eager_probe or n <= args.eager_max_n}
        for fn in variants.values():  # warm-up
            fn(x)
        times = {name: [] for name in variants}
        cpu_times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(x)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
        medians = {name: statistics.median(t) for name, t in times.items()}
        cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
        flops = 4 * B * H * n * n * D  # QK^T and PV
        base = medians["torch SDPA (no capture)"]
        for name in VARIANTS:
            if name not in variants:
                print(f"{n:>6} | {name:<46} | skipped: needs several [H,N,N] float32 maps (2.1 GB each at N=8192)")
                continue
            mem = peak_extra_mb(variants[name], x)
            print(f"{n:>6} | {name:<46} | {medians[name] * 1e3:>10.1f} | {medians[name] / base:>7.2f} | "
                  f"{flops / medians[name] / 1e9:>8.1f} | {cpu_medians[name]:>7.3f} | "
                  f"{cpu_medians[name] / cpu_medians['torch SDPA (no capture)']:>10.2f} | {mem:>13.1f}")
        plain, km = medians["cpu, no capture"], medians["cpu, key_mass"]
        cpu_plain_s, cpu_km_s = cpu_medians["cpu, no capture"], cpu_medians["cpu, key_mass"]
        line = (f"# N={n}: key_mass pass adds {(km - plain) / plain:.2f}x of the forward time "
                f"({(cpu_km_s - cpu_plain_s) / cpu_plain_s:.2f}x in CPU time)")
        if "eager capture (materialised map)" in medians:
            line += f"; cpu probe is {medians['eager capture (materialised map)'] / medians['cpu, lse+entropy+seg_mass, all interventions']:.1f}x faster than eager"
        print(line)
    print(f"# load average at end: {load_average()}")


if __name__ == "__main__":
    main()
