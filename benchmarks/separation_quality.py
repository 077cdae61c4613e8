#!/usr/bin/env python
"""Separation quality of a shipped stand-in model on held-out synthetic mixtures.

    python benchmarks/separation_quality.py --model small            # 200 mixtures, every section
    python benchmarks/separation_quality.py --model tiny --sections quality
    python benchmarks/separation_quality.py --model small --count 40 --json out.json --figure steps.png

Held-out mixtures come from the evaluation seed range (>= 1_000_000_000), never used in training; the data
generator is the one the model was trained on (`small`: 4 s phrase-prompted scenes, `tiny`: 2 s clips).

Sections:
  quality      median SI-SDR improvement overall, per class and per complexity group; identity accuracy
               (the output is nearer, in SI-SDR, to the prompted source than to any other source)
  prompt       prompt sensitivity: the same mixture prompted with another present source's phrase; the
               share of outputs that then match that source (identity w.r.t. the new target)
  steps        SI-SDR and SI-SDRi at 1, 2, 4, 8, 16, 32 sampler steps, Euler and midpoint (a table and,
               with --figure, a plot against network evaluations)
  timing       one network evaluation at batch 1 (interleaved medians): this model on a 4 s clip against
               the tiny model on a 2 s clip
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentflow_fast.data import dataset_for  # noqa: E402
from latentflow_fast.metrics import identity_correct, si_sdr, si_sdr_improvement  # noqa: E402
from latentflow_fast.ops import backend_cpu, dit_cpu  # noqa: E402

SECTIONS = ("quality", "prompt", "steps", "timing")
STEP_COUNTS = (1, 2, 4, 8, 16, 32)
TARGETS = {"median_si_sdri_db": 10.0, "class_median_si_sdri_db": 6.0, "identity_accuracy": 0.95,
           "prompt_follow_rate": 0.90}


def _batches(data, count: int, batch_size: int, offset: int = 0):
    seeds = data.eval_seeds(count, offset)
    for start in range(0, count, batch_size):
        yield data.make_batch(seeds[start:start + batch_size])


def evaluate(model, data, count: int, steps: int = 16, method: str = "midpoint", seed: int = 0,
             batch_size: int = 20, offset: int = 0, counterfactual: bool = False) -> list[dict]:
    """One row per mixture. With ``counterfactual`` the prompt is another present source's phrase
    (source (target + 1) mod n) and the scores are against that source."""
    rows = []
    for batch in _batches(data, count, batch_size, offset):
        items = batch.items
        if counterfactual:
            targets = [(m.target_index + 1) % m.n_sources for m in items]
            prompts = [_phrase(m, i) for m, i in zip(items, targets)]
        else:
            targets = [m.target_index for m in items]
            prompts = list(batch.prompts)
        reference = np.stack([m.sources[i] for m, i in zip(items, targets)])
        out = model.separate(torch.from_numpy(batch.mixture), batch.sample_rate, prompts,
                             steps=steps, method=method, seed=seed)
        sdri = si_sdr_improvement(out.target, reference, batch.mixture)
        sdr = si_sdr(out.target, reference)
        ident = identity_correct(out.target, [m.sources for m in items], targets)
        for i, m in enumerate(items):
            rows.append({"seed": m.seed, "prompt": prompts[i], "target_class": m.classes[targets[i]],
                         "classes": list(m.classes), "si_sdri_db": float(sdri[i]), "si_sdr_db": float(sdr[i]),
                         "identity_correct": bool(ident[i]), **m.complexity})
    return rows


def _phrase(mixture, index: int) -> str:
    phrases = getattr(mixture, "phrases", None)  # the tiny data's prompt is the class name
    return phrases[index] if phrases is not None else mixture.classes[index]


def _stats(rows: list[dict]) -> dict:
    if not rows:
        return {"count": 0}
    sdri = np.array([r["si_sdri_db"] for r in rows])
    return {"count": len(rows), "median_si_sdri_db": float(np.median(sdri)), "mean_si_sdri_db": float(sdri.mean()),
            "median_si_sdr_db": float(np.median([r["si_sdr_db"] for r in rows])),
            "identity_accuracy": float(np.mean([r["identity_correct"] for r in rows]))}


def summarize(rows: list[dict]) -> dict:
    groups = {"all": rows,
              "2 sources": [r for r in rows if r["n_sources"] == 2],
              "3 sources": [r for r in rows if r["n_sources"] == 3],
              "gain spread < 6 dB": [r for r in rows if r["gain_spread_db"] < 6],
              "gain spread >= 6 dB": [r for r in rows if r["gain_spread_db"] >= 6]}
    for cls in sorted({r["target_class"] for r in rows}):
        groups[f"class: {cls}"] = [r for r in rows if r["target_class"] == cls]
    return {name: _stats(sel) for name, sel in groups.items()}


def format_table(summary: dict) -> str:
    lines = [f"| group | n | median SI-SDRi (dB) | mean SI-SDRi (dB) | median SI-SDR (dB) | identity |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if s["count"]:
            lines.append(f"| {name} | {s['count']} | {s['median_si_sdri_db']:.2f} | {s['mean_si_sdri_db']:.2f} | "
                         f"{s['median_si_sdr_db']:.2f} | {100 * s['identity_accuracy']:.1f}% |")
    return "\n".join(lines)


def steps_sweep(model, data, count: int, seed: int, batch_size: int) -> list[dict]:
    table = []
    for method in ("euler", "midpoint"):
        for steps in STEP_COUNTS:
            rows = evaluate(model, data, count, steps, method, seed, batch_size)
            s = _stats(rows)
            table.append({"method": method, "steps": steps, "evaluations": steps * (2 if method == "midpoint" else 1),
                          "median_si_sdr_db": s["median_si_sdr_db"], "median_si_sdri_db": s["median_si_sdri_db"],
                          "identity_accuracy": s["identity_accuracy"]})
            print(f"  {method:8s} {steps:2d} steps: median SI-SDR {s['median_si_sdr_db']:.2f} dB, "
                  f"SI-SDRi {s['median_si_sdri_db']:.2f} dB", flush=True)
    return table


def format_steps(table: list[dict]) -> str:
    lines = ["| method | steps | evaluations | median SI-SDR (dB) | median SI-SDRi (dB) | identity |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['steps']} | {r['evaluations']} | {r['median_si_sdr_db']:.2f} | "
                     f"{r['median_si_sdri_db']:.2f} | {100 * r['identity_accuracy']:.1f}% |")
    return "\n".join(lines)


def plot_steps(table: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, marker in (("euler", "o"), ("midpoint", "s")):
        rows = [r for r in table if r["method"] == method]
        ax.plot([r["evaluations"] for r in rows], [r["median_si_sdr_db"] for r in rows], marker=marker, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64])
    ax.set_xticklabels(["1", "2", "4", "8", "16", "32", "64"])
    ax.set_xlabel("network evaluations")
    ax.set_ylabel("median SI-SDR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_evaluations(model, reference, seconds: float, reference_seconds: float, repeats: int = 25) -> dict:
    """Median ms of one network evaluation at batch 1: both models, each with the DiT's fused CPU passes
    (ops/dit_cpu.py, the default) and without them (LATENTFLOW_FUSED_DIT=0), all four interleaved."""
    def inputs(m, secs):
        T = m.audio_codec.num_frames(int(secs * m.audio_codec.sample_rate))
        C = m.config.latent_dim
        gen = torch.Generator().manual_seed(0)
        prompt = dataset_for(m).make_mixture(dataset_for(m).eval_seeds(1)[0]).prompt
        text, mask = m.text_encoder([prompt])
        return (torch.randn(1, T, 2 * C, generator=gen), torch.tensor([0.5]), torch.randn(1, T, C, generator=gen),
                text, mask)

    args = {"model": inputs(model, seconds), "reference": inputs(reference, reference_seconds)}
    nets = {"model": model, "reference": reference}
    times = {(name, fused): [] for name in nets for fused in ("1", "0")}
    previous = os.environ.get(dit_cpu.FUSED_ENV)
    try:
        with torch.no_grad():
            for name, fused in times:
                os.environ[dit_cpu.FUSED_ENV] = fused
                nets[name](*args[name])  # warm-up
            for _ in range(repeats):
                for name, fused in times:
                    os.environ[dit_cpu.FUSED_ENV] = fused
                    t0 = time.perf_counter()
                    nets[name](*args[name])
                    times[(name, fused)].append(time.perf_counter() - t0)
    finally:
        if previous is None:
            os.environ.pop(dit_cpu.FUSED_ENV, None)
        else:
            os.environ[dit_cpu.FUSED_ENV] = previous
    med = {key: 1e3 * float(np.median(v)) for key, v in times.items()}
    return {"model_ms": med[("model", "1")], "reference_ms": med[("reference", "1")],
            "ratio": med[("model", "1")] / med[("reference", "1")],
            "unfused_model_ms": med[("model", "0")], "unfused_reference_ms": med[("reference", "0")],
            "unfused_ratio": med[("model", "0")] / med[("reference", "0")],
            "model_seconds": seconds, "reference_seconds": reference_seconds, "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help='"small", "tiny" or a local stand-in model directory')
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--offset", type=int, default=0, help="skip this many held-out seeds")
    p.add_argument("--steps", type=int, default=16, help="sampler steps of the quality and prompt sections")
    p.add_argument("--method", default="midpoint", choices=["midpoint", "euler"])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--steps-count", type=int, default=None,
                   help="held-out mixtures of the steps section (default: --count; it runs 189 evaluations each)")
    p.add_argument("--json", default=None, help="write every row and summary to this JSON file")
    p.add_argument("--figure", default=None, help="write the quality-vs-steps plot (PNG) here")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not sections or any(s not in SECTIONS for s in sections):
        p.error(f"--sections must be a comma list of {SECTIONS}, got {args.sections!r}")
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    torch.set_num_threads(args.threads)
    from latentflow_fast import load_model

    model = load_model(args.model)
    data = dataset_for(model)
    cpu = platform.processor() or platform.machine()
    print(f"model {args.model} ({sum(q.numel() for q in model.parameters()):,} parameters), data {data.__name__}, "
          f"{args.count} held-out mixtures, {args.threads} threads, torch {torch.__version__}, {cpu}", flush=True)
    print(f"# {backend_cpu.describe_path()}")
    result = {"args": vars(args)}
    if "quality" in sections:
        t0 = time.perf_counter()
        rows = evaluate(model, data, args.count, args.steps, args.method, args.seed, args.batch_size, args.offset)
        summary = summarize(rows)
        result.update(rows=rows, summary=summary, quality_wall_seconds=time.perf_counter() - t0)
        print(f"\n## quality ({args.method}, {args.steps} steps)\n" + format_table(summary))
        classes = {k: v for k, v in summary.items() if k.startswith("class: ")}
        worst = min(v["median_si_sdri_db"] for v in classes.values())
        checks = {"median SI-SDRi >= 10 dB": summary["all"]["median_si_sdri_db"] >= TARGETS["median_si_sdri_db"],
                  "every class median SI-SDRi >= 6 dB": worst >= TARGETS["class_median_si_sdri_db"],
                  "identity accuracy >= 95%": summary["all"]["identity_accuracy"] >= TARGETS["identity_accuracy"]}
        result["quality_checks"] = checks
        for name, ok in checks.items():
            print(f"target {name}: {'met' if ok else 'NOT met'}")
    if "prompt" in sections:
        rows = evaluate(model, data, args.count, args.steps, args.method, args.seed, args.batch_size, args.offset,
                        counterfactual=True)
        s = _stats(rows)
        result.update(counterfactual_rows=rows, prompt_follow_rate=s["identity_accuracy"])
        print(f"\n## prompt sensitivity\nprompted with another present source's phrase: the output matches that "
              f"source in {100 * s['identity_accuracy']:.1f}% of {s['count']} mixtures "
              f"(median SI-SDRi to it {s['median_si_sdri_db']:.2f} dB); target >= 90%: "
              f"{'met' if s['identity_accuracy'] >= TARGETS['prompt_follow_rate'] else 'NOT met'}")
    if "steps" in sections:
        print("\n## quality vs steps", flush=True)
        steps_count = args.count if args.steps_count is None else args.steps_count
        table = steps_sweep(model, data, steps_count, args.seed, args.batch_size)
        result["steps_count"] = steps_count
        result["steps"] = table
        print(format_steps(table))
        if args.figure:
            plot_steps(table, args.figure, f"{args.model}: {steps_count} held-out mixtures")
            print(f"figure: {args.figure}")
    if "timing" in sections:
        tiny = load_model("tiny")
        timing = time_evaluations(model, tiny, data.CLIP_SECONDS, 2.0)
        result["timing"] = timing
        print(f"\n## one evaluation, batch 1, {args.threads} threads (interleaved medians of {timing['repeats']})\n"
              f"{args.model} on a {timing['model_seconds']:.0f} s clip: {timing['model_ms']:.1f} ms; tiny on a 2 s "
              f"clip: {timing['reference_ms']:.1f} ms; ratio {timing['ratio']:.2f} (target <= 1)\n"
              f"without the fused CPU passes (LATENTFLOW_FUSED_DIT=0): {timing['unfused_model_ms']:.1f} ms and "
              f"{timing['unfused_reference_ms']:.1f} ms; ratio {timing['unfused_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
