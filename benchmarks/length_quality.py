#!/usr/bin/env python
"""Separation quality against input length: the tiny model was trained on crops of at most 2 s.

    python benchmarks/length_quality.py                      # lengths 2, 4, 8, 12, 19 s; 4 prompts
    python benchmarks/length_quality.py --lengths 2,19 --prompts 2

A long input is built from consecutive held-out mixtures whose prompt is the same class (each 2 s), so
target and residual stay well defined over the whole length; SI-SDRi is measured over the whole input.
Prints one row per length: median SI-SDRi over the prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentflow_fast import load_model  # noqa: E402
from latentflow_fast.data import make_mixture  # noqa: E402
from latentflow_fast.data.synthetic import EVAL_SEEDS  # noqa: E402
from latentflow_fast.metrics import si_sdr_improvement  # noqa: E402


def long_mixture(prompt: str, seconds: float, start_seed: int):
    """Consecutive 2 s held-out mixtures with this prompt, cut to `seconds`."""
    mixes, targets, seed, total, rate = [], [], start_seed, 0, None
    while total < seconds:
        m = make_mixture(seed)
        seed += 1
        if m.prompt != prompt:
            continue
        rate = m.sample_rate
        mixes.append(m.mixture)
        targets.append(m.target)
        total += len(m.mixture) / rate
    n = int(seconds * rate)
    return np.concatenate(mixes)[:n], np.concatenate(targets)[:n], rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--lengths", default="2,4,8,12,19")
    parser.add_argument("--prompts", type=int, default=4, help="number of prompts (classes) averaged")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    model = load_model(args.model)
    classes = ["sine tone", "chirp", "white noise", "click train", "square wave", "noise bursts"][: args.prompts]
    print(f"model {args.model}, {args.steps} midpoint steps, median over prompts {classes}")
    print(f"{'seconds':>8} {'median SI-SDRi (dB)':>20} {'per prompt':>40}")
    for seconds in [float(x) for x in args.lengths.split(",")]:
        values = []
        for i, prompt in enumerate(classes):
            mix, target, rate = long_mixture(prompt, seconds, EVAL_SEEDS.start + 1000 * i)
            out = model.separate(torch.from_numpy(mix), rate, prompt, steps=args.steps)
            values.append(float(si_sdr_improvement(out.target, torch.from_numpy(target), torch.from_numpy(mix))))
        print(f"{seconds:8.1f} {np.median(values):20.2f} {', '.join(f'{v:.1f}' for v in values):>40}", flush=True)


if __name__ == "__main__":
    main()
