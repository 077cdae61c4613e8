"""The fuller P6 frontier (issue 13): LSAC starting at 0 as well as after each layer's warm-up, refresh
N in {2, 4, 8}, cached outputs and maps, and naive step reduction with midpoint 8/12 and Euler 16/24 steps,
on the default 24 clips of `small`. The default protocol runs a reduced P6 grid to fit its 20-minute
budget; this script runs the rest (P3 + P6, about 20 min on 2 CPU cores).

    python benchmarks/p6_frontier.py --out runs/p6-frontier
"""

import argparse

from latentflow_fast.protocol.base import ProtocolConfig
from latentflow_fast.protocol.run import run_protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/p6-frontier", help="output folder (resumable)")
    parser.add_argument("--workers", type=int, default=2, help="clip-sharded processes")
    args = parser.parse_args()
    config = ProtocolConfig(experiments=("p6",), lsac_starts=("warmup", 0), lsac_refresh=(2, 4, 8),
                            naive_midpoint_steps=(8, 12), naive_euler_steps=(16, 24))
    run_protocol(config, args.out, progress=True, workers=args.workers)


if __name__ == "__main__":
    main()
