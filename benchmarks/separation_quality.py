#!/usr/bin/env python
"""Separation quality of a model on held-out synthetic mixtures (docs/design.md, sections 4-5).

    python benchmarks/separation_quality.py                   # tiny model, 200 mixtures
    python benchmarks/separation_quality.py --count 50 --json out.json

Held-out mixtures come from the evaluation seed range (>= 1_000_000_000), never used in training.
Reports median SI-SDR improvement and identity accuracy, overall and per complexity group
(2 vs 3 sources; gain spread below / above 6 dB). Targets: median SI-SDRi >= 8 dB, identity >= 90%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentflow_fast.data import eval_seeds, make_batch  # noqa: E402
from latentflow_fast.metrics import identity_correct, si_sdr, si_sdr_improvement  # noqa: E402

TARGET_SI_SDRI_DB = 8.0
TARGET_IDENTITY = 0.90


def evaluate(model, count: int = 200, steps: int = 16, method: str = "midpoint", seed: int = 0,
             batch_size: int = 20, offset: int = 0) -> list[dict]:
    """One row per mixture: SI-SDRi, identity, output SI-SDR, classes, complexity."""
    rows = []
    seeds = eval_seeds(count, offset)
    for start in range(0, count, batch_size):
        batch = make_batch(seeds[start:start + batch_size])
        out = model.separate(torch.from_numpy(batch.mixture), batch.sample_rate, list(batch.prompts),
                             steps=steps, method=method, seed=seed)
        sdri = si_sdr_improvement(out.target, batch.target, batch.mixture)
        sdr = si_sdr(out.target, batch.target)
        ident = identity_correct(out.target, [m.sources for m in batch.items],
                                 [m.target_index for m in batch.items])
        for i, m in enumerate(batch.items):
            rows.append({
                "seed": m.seed, "prompt": m.prompt, "classes": list(m.classes),
                "si_sdri_db": float(sdri[i]), "si_sdr_db": float(sdr[i]), "identity_correct": bool(ident[i]),
                **m.complexity,
            })
    return rows


def summarize(rows: list[dict]) -> dict:
    def stats(sel):
        if not sel:
            return {"count": 0}
        sdri = np.array([r["si_sdri_db"] for r in sel])
        return {"count": len(sel), "median_si_sdri_db": float(np.median(sdri)),
                "mean_si_sdri_db": float(np.mean(sdri)),
                "median_si_sdr_db": float(np.median([r["si_sdr_db"] for r in sel])),
                "identity_accuracy": float(np.mean([r["identity_correct"] for r in sel]))}

    groups = {
        "all": rows,
        "2 sources": [r for r in rows if r["n_sources"] == 2],
        "3 sources": [r for r in rows if r["n_sources"] == 3],
        "gain spread < 6 dB": [r for r in rows if r["gain_spread_db"] < 6],
        "gain spread >= 6 dB": [r for r in rows if r["gain_spread_db"] >= 6],
    }
    prompts = sorted({r["prompt"] for r in rows})
    groups.update({f"prompt: {p}": [r for r in rows if r["prompt"] == p] for p in prompts})
    return {name: stats(sel) for name, sel in groups.items()}


def format_table(summary: dict) -> str:
    lines = [f"{'group':<26} {'n':>4} {'median SI-SDRi':>15} {'mean SI-SDRi':>13} {'identity':>9}"]
    for name, s in summary.items():
        if not s["count"]:
            continue
        lines.append(f"{name:<26} {s['count']:>4} {s['median_si_sdri_db']:>12.2f} dB {s['mean_si_sdri_db']:>10.2f} dB "
                     f"{100 * s['identity_accuracy']:>8.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help='"tiny" or a local model directory')
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--offset", type=int, default=0, help="skip this many held-out seeds (to split a run)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--method", default="midpoint", choices=["midpoint", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write rows + summary to this JSON file")
    args = p.parse_args(argv)
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    torch.set_num_threads(args.threads)
    from latentflow_fast import load_model

    model = load_model(args.model)
    t0 = time.perf_counter()
    rows = evaluate(model, args.count, args.steps, args.method, args.seed, offset=args.offset)
    wall = time.perf_counter() - t0
    summary = summarize(rows)
    print(f"model {args.model}: {args.count} held-out mixtures, {args.method} {args.steps} steps, seed {args.seed} "
          f"({wall:.1f}s, {args.threads} threads)")
    print(format_table(summary))
    overall = summary["all"]
    ok = overall["median_si_sdri_db"] >= TARGET_SI_SDRI_DB and overall["identity_accuracy"] >= TARGET_IDENTITY
    print(f"targets (median SI-SDRi >= {TARGET_SI_SDRI_DB} dB, identity >= {100 * TARGET_IDENTITY:.0f}%): "
          f"{'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall_seconds": wall, "summary": summary,
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
