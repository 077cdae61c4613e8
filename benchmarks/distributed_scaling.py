"""Sweep throughput with 1 and 2 torchrun ranks (gloo on CPU, one thread per rank).

Runs the same `latentflow sweep` (tiny model, one clip, standard probes) with --nproc-per-node 1 and 2,
interleaved over rounds, each into a fresh folder, and prints probes/s and the scaling. "sweep s" is the
time rank 0 reports from the first clean trajectory to the merged table (model loading and process
start excluded); "wall s" is the whole command. It also checks that both tables are identical.

    python benchmarks/distributed_scaling.py [--model tiny] [--evaluations 0,4,...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from latentflow_fast.probe import ResultStore


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_sweep(ranks: int, out: Path, args) -> tuple[float, float, int]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", free_port(),
               "-m", "latentflow_fast.cli", "sweep", "--model", args.model, "--threads", "1", "--no-progress",
               "--steps", str(args.steps), "--evaluations", args.evaluations, "--kinds", args.kinds,
               "--batch-size", str(args.batch_size), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    match = re.search(r"(\d+) probe results .* in ([0-9.]+) s", result.stdout)
    if not match:
        raise RuntimeError(f"unexpected sweep output:\n{result.stdout}\n{result.stderr}")
    return float(match.group(2)), wall, int(match.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--evaluations", default="0,4,8,12,16,20,24,28")
    parser.add_argument("--kinds", default="head_ablation,text_knockout,uniform")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    times: dict = {1: [], 2: []}
    walls: dict = {1: [], 2: []}
    tables: dict = {}
    probes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for ranks in (1, 2):
                out = Path(tmp) / f"r{r}-n{ranks}"
                sweep_s, wall_s, probes = run_sweep(ranks, out, args)
                times[ranks].append(sweep_s)
                walls[ranks].append(wall_s)
                tables[ranks] = ResultStore(out / "results", rank=0).load()
    identical = tables[1].equals(tables[2])
    pd.testing.assert_frame_equal(tables[1], tables[2], check_exact=True)
    print(f"model {args.model}, {probes} probes per run, evaluations {args.evaluations}, "
          f"batch {args.batch_size}, 1 thread per rank, {args.rounds} rounds (medians)")
    print(f"{'ranks':>6}{'sweep s':>10}{'probes/s':>10}{'wall s':>10}{'speed-up':>10}")
    base = statistics.median(times[1])
    for ranks in (1, 2):
        med = statistics.median(times[ranks])
        print(f"{ranks:>6}{med:>10.2f}{probes / med:>10.1f}{statistics.median(walls[ranks]):>10.2f}{base / med:>10.2f}")
    print(f"tables identical (1 vs 2 ranks): {identical}")


if __name__ == "__main__":
    main()
